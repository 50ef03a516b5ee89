"""What we know about each architecture's per-layer metadata, from llama.cpp's loader.

A frankenmerge moves layers, so any hyper-parameter that llama.cpp reads *per layer* must
move with them, and any that it derives from a layer's *position* (or from the layer count)
changes meaning. This module says, per architecture, which is which:

- `SUPPORTED`: architectures with a fixture test (tests/test_archs.py) that llama.cpp loads
  after an upscale, with identical logits for an identity recipe. Their positional rules are
  either re-expressed per layer (sliding-window patterns become a per-layer BOOL array, which
  llama.cpp's `load_swa_pattern` reads first) or checked against the plan (`check_layout`).
- `REFUSED`: every other architecture llama.cpp knows (src/llama-arch.cpp, vendored llama.cpp
  of llama-cpp-python 0.3.36), with the reason. Many are plain transformer stacks that would
  very likely work; they stay refused until a fixture proves it (the safer default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..format.source import SourceModel

# Keys (after "{arch}.") that llama.cpp reads with get_key_or_arr / get_arr over n_layer:
# a scalar applies to every layer, an array is one value per layer and is re-indexed with them.
PER_LAYER_KEYS = (
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "expert_used_count",
    "expert_feed_forward_length",
    "attention.sliding_window_pattern",
    "attention.rope_pattern",
    "attention.recurrent_layers",
    "attention.indexer.types",
    "attention.compress_ratios",
    "swiglu_clamp_exp",
    "swiglu_clamp_shexp",
)

# Keys whose meaning depends on layer positions; an upscale that moves layers cannot keep them
# unless the architecture lets us re-express them per layer (see Arch.swa).
POSITIONAL_KEYS = (
    "attention.sliding_window_pattern",  # scalar form: every n-th layer is full attention
    "full_attention_interval",
    "leading_dense_block_count",
    "nextn_predict_layers",
    "no_rope_layer_step",
    "interleave_moe_layer_step",
    "dense_block_count",
    "moe_every_n_layers",
    "rescale_every_n_layers",
    "deepstack_mapping",  # vision features injected into fixed layers (Granite Vision, Qwen3-VL)
)

# Positional keys whose value 0 means "nothing positional here" (converters write them anyway).
ZERO_IS_NEUTRAL = ("leading_dense_block_count", "nextn_predict_layers", "dense_block_count",
                   "moe_every_n_layers", "rescale_every_n_layers")

SWA_KEY = "attention.sliding_window_pattern"
SWA_WINDOW_KEY = "attention.sliding_window"


@dataclass(frozen=True)
class SwaRule:
    """llama.cpp's `load_swa_pattern(ml, n_pattern, dense_first)` for an architecture.

    Without a per-layer array, layer il is sliding-window when
    `il % n < n - 1` (dense_first=False: the last layer of each group is full attention) or
    `il % n != 0` (dense_first=True), n from `{arch}.attention.sliding_window_pattern` or the
    default. `needs_window`: the arch only uses the pattern when `attention.sliding_window` > 0.
    """

    default: int
    dense_first: bool = False
    needs_window: bool = False


LayoutCheck = Callable[[str, Mapping[str, "SourceModel"], Sequence[tuple[str, int]]], None]


@dataclass(frozen=True)
class Arch:
    name: str
    note: str = ""
    swa: SwaRule | None = None
    # GGUF tensor kind -> HF name, where this arch's HF checkpoint differs from llama's naming
    # (mergekit filters such as `o_proj` or `post_feedforward_layernorm` match HF names).
    hf_names: Mapping[str, str] = field(default_factory=dict)
    # convert_hf_to_gguf stores these norms as 1 + w (Gemma): a GGUF-side scale is not mergekit's
    offset_norms: bool = False
    checks: tuple[LayoutCheck, ...] = ()


# --------------------------------------------------------------------------- layout checks


def _layer_count_attention_scale(n_layer_27b: int) -> LayoutCheck:
    """gemma2/gemma3 pick the query scale from the layer count: the "27B" count (46 / 62 layers)
    uses 1/sqrt(n_embd/n_head), every other count 1/sqrt(head_dim) (models/gemma2.cpp, gemma3.cpp).
    No metadata key overrides it, so the output must stay on the source's side of that count
    unless both formulas agree."""

    def check(arch: str, models: Mapping[str, SourceModel], layers: Sequence[tuple[str, int]]) -> None:
        out_n = len(layers)
        for name in dict.fromkeys(m for m, _ in layers):
            m = models[name]
            n_embd = int(m.arch_get("embedding_length"))
            n_head = m.arch_get("attention.head_count")
            n_head0 = int(n_head[0] if isinstance(n_head, list) else n_head)
            head_dim = int(m.arch_get("attention.key_length") or n_embd // n_head0)
            if n_embd // n_head0 == head_dim:
                continue  # both scales are the same number
            if (m.block_count == n_layer_27b) != (out_n == n_layer_27b):
                src, out = ((f"1/sqrt({n_embd // n_head0}) (n_embd/n_head)", f"1/sqrt({head_dim}) (head_dim)")
                            if m.block_count == n_layer_27b else
                            (f"1/sqrt({head_dim}) (head_dim)", f"1/sqrt({n_embd // n_head0}) (n_embd/n_head)"))
                raise RecipeError(
                    f"{arch}: llama.cpp picks the attention scale from the layer count ({n_layer_27b} layers = "
                    f"the 27B model); a {out_n}-layer output of {name!r} ({m.block_count} layers) would scale "
                    f"queries by {out} instead of {src} in every layer; choose a depth "
                    f"{'of' if m.block_count == n_layer_27b else 'other than'} {n_layer_27b}")
    return check


def _command_r_qk_norm(arch: str, models: Mapping[str, SourceModel], layers: Sequence[tuple[str, int]]) -> None:
    """command-r loads attn_q_norm/attn_k_norm in every layer when n_layer >= 64 (Command R+),
    and never below (models/command-r.cpp); the output's depth must agree with its tensors."""
    out_n = len(layers)
    for i, (name, j) in enumerate(layers):
        has = "attn_q_norm.weight" in models[name].blocks.get(j, {})
        if has != (out_n >= 64):
            what = ("has attn_q_norm/attn_k_norm (Command R+), which llama.cpp only loads in models of 64 or more "
                    "layers"
                    if has else
                    "has no attn_q_norm/attn_k_norm, which llama.cpp requires in every layer of a model of 64 or more "
                    "layers")
            raise RecipeError(f"command-r: source layer {j} of {name!r} {what}; the output has {out_n} layers "
                              f"(output layer {i}); keep the output "
                              f"{'at 64 layers or more' if has else 'below 64 layers'}")


def _fixed_kinds(rule: str, kind: Callable[[int, int], Any], kind_names: tuple[str, str]) -> LayoutCheck:
    """For hard-coded positional rules without a per-layer form: allow a plan only when every
    output position has the same kind as its source layer had."""

    def check(arch: str, models: Mapping[str, SourceModel], layers: Sequence[tuple[str, int]]) -> None:
        out_n = len(layers)
        for i, (name, j) in enumerate(layers):
            src_kind, out_kind = kind(j, models[name].block_count), kind(i, out_n)
            if src_kind != out_kind:
                raise RecipeError(
                    f"{arch}: llama.cpp fixes layer kinds by position ({rule}) and has no per-layer form for it; "
                    f"source layer {j} of {name!r} ({kind_names[src_kind]}) would land at output layer {i} "
                    f"({kind_names[out_kind]}); keep slice offsets aligned to the pattern")
    return check


def _first_layer_heads(arch: str, models: Mapping[str, SourceModel], layers: Sequence[tuple[str, int]]) -> None:
    """llama.cpp derives the head size (without attention.key_length) and whether the model has
    attention at all (n_rot, head sizes are 0 when layer 0 has no heads) from *layer 0's* head
    count (llama-model.cpp load_hparams: n_head()). DeciLM's head counts vary by layer, so the
    output's first layer must give what each source's first layer gave."""

    def heads(m: SourceModel, il: int) -> int:
        h = m.arch_get("attention.head_count")
        return int(h[il] if isinstance(h, list) else h)

    out_name, out_j = layers[0]
    out_heads = heads(models[out_name], out_j)
    for name in dict.fromkeys(n for n, _ in layers):
        m = models[name]
        src = heads(m, 0)
        n_embd = int(m.arch_get("embedding_length"))
        key_length = m.arch_get("attention.key_length")
        if src == out_heads:
            continue
        if out_heads == 0 or src == 0:
            what = "has no attention heads" if out_heads == 0 else f"has {out_heads} heads"
            raise RecipeError(
                f"{arch}: llama.cpp takes the head size from the first layer's head count; output layer 0 "
                f"(source layer {out_j} of {out_name!r}) {what} while layer 0 of {name!r} has {src}, so every "
                f"attention layer would get {'no head size' if out_heads == 0 else 'a different one'}; "
                "start the output with a layer that has attention heads, as the source does")
        if key_length is None and n_embd // out_heads != n_embd // src:
            raise RecipeError(
                f"{arch}: without attention.key_length llama.cpp takes the head size from the first layer "
                f"(n_embd / {out_heads} = {n_embd // out_heads} instead of n_embd / {src} = {n_embd // src}); "
                "start the output with a layer that has the source's first-layer head count")


# --------------------------------------------------------------------------- the table

_GEMMA_HF = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_MIXTRAL_HF = {  # llama with experts (Mixtral), as mergekit 0.1.5 names them (_data/architectures/mixtral.json):
    "ffn_gate_inp": "mlp.gate",  # stacked experts, gate and up fused in one HF tensor (no ".weight")
    "ffn_gate_exps": "mlp.experts.gate_up_proj",
    "ffn_up_exps": "mlp.experts.gate_up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}

_QWEN_MOE_HF = dict(_MIXTRAL_HF)  # Qwen2/3 MoE: the same names in mergekit 0.1.5 (qwen3_moe.json)
_QWEN2_MOE_HF = {**_QWEN_MOE_HF,  # plus the shared expert and its sigmoid gate
                 "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
                 "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                 "ffn_up_shexp": "mlp.shared_expert.up_proj",
                 "ffn_down_shexp": "mlp.shared_expert.down_proj"}
_GRANITE_MOE_HF = {  # gate and up fused in HF (input_linear), split by convert_hf_to_gguf
    "ffn_gate_inp": "block_sparse_moe.router.layer",
    "ffn_gate_exps": "block_sparse_moe.input_linear",
    "ffn_up_exps": "block_sparse_moe.input_linear",
    "ffn_down_exps": "block_sparse_moe.output_linear",
    "ffn_gate_shexp": "shared_mlp.input_linear",
    "ffn_up_shexp": "shared_mlp.input_linear",
    "ffn_down_shexp": "shared_mlp.output_linear",
}

_GPT2_HF = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "attn_norm": "ln_1", "ffn_norm": "ln_2",
            "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_NEOX_HF = {"attn_qkv": "attention.query_key_value", "attn_output": "attention.dense",
            "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}

SUPPORTED: dict[str, Arch] = {
    a.name: a for a in (
        Arch("llama", "Llama 1/2/3, Mistral, Mixtral-style experts, Yi, Karakuri and other llama-shaped models; "
                      "rope_freqs (Llama 3) is global and copied", hf_names=_MIXTRAL_HF),
        Arch("qwen2", "QKV biases move with their layer"),
        Arch("qwen3", "per-head q/k norms move with their layer"),
        Arch("gemma", "Gemma 2B/7B: llama-shaped, tied embeddings; norms stored as 1+w, so scaling them is "
                      "refused (llama.cpp has no layer-count rule for it)",
             offset_norms=True),
        Arch("gemma2", "sliding-window layers (every other layer by default) re-expressed as a per-layer "
                       "array; tied embeddings; norms stored as 1+w, so scaling them is refused; "
                       "46 layers means the 27B attention scale in llama.cpp",
             swa=SwaRule(2), hf_names=_GEMMA_HF, offset_norms=True,
             checks=(_layer_count_attention_scale(46),)),
        Arch("gemma3", "sliding-window layers (5 of every 6 by default) re-expressed as a per-layer array; "
                       "norms stored as 1+w, so scaling them is refused; 62 layers means the 27B attention scale",
             swa=SwaRule(6, needs_window=True), hf_names=_GEMMA_HF, offset_norms=True,
             checks=(_layer_count_attention_scale(62),)),
        Arch("phi3", "fused attn_qkv (HF qkv_proj) and gate+up (HF gate_up_proj); llama.cpp disables "
                     "Phi-3's sliding window; rope_factors_long/short are global",
             hf_names={"ffn_up": "mlp.gate_up_proj"}),
        Arch("command-r", "parallel attention/FFN blocks, tied embeddings; q/k norms exist exactly when "
                          "the model has 64 layers or more (Command R+), so the depth must stay on that side",
             checks=(_command_r_qk_norm,)),
        Arch("granite", "residual/embedding/attention/logit scales are global keys and stay exact"),
        Arch("cohere2", "Command R7B / Command A: sliding-window layers (3 of every 4) re-expressed as a "
                        "per-layer array; tied embeddings",
             swa=SwaRule(4)),
        Arch("mistral3", "Mistral Small 3.x, Magistral, Devstral, Ministral 3 as current convert_hf_to_gguf "
                         "writes them (older conversions are `llama`); llama-shaped", hf_names=_MIXTRAL_HF),
        Arch("qwen3moe", "Qwen3 MoE (30B-A3B, 235B-A22B): qwen3's layers with a router and stacked experts in "
                         "every layer, which move with their layer; mergekit's down_proj filter reaches the experts",
             hf_names=_QWEN_MOE_HF),
        Arch("smollm3", "every 4th layer has no RoPE, hard-coded by position: allowed when every layer keeps "
                        "its kind (slice offsets multiple of 4 apart), refused otherwise",
             checks=(_fixed_kinds("every 4th layer has no RoPE", lambda il, n: int((il + 1) % 4 != 0),
                                  ("no-RoPE layer", "RoPE layer")),)),
        Arch("olmo", "OLMo 1: non-parametric LayerNorm (no norm tensors at all), llama-shaped projections"),
        Arch("olmo2", "OLMo 2 / OLMo 3: norms after attention and FFN, q/k norms; OLMo 3's sliding-window "
                      "layers (3 of every 4 by default) re-expressed as a per-layer array",
             swa=SwaRule(4, needs_window=True)),
        Arch("starcoder2", "LayerNorms and projections with biases (zeroed with their weights); GELU MLP "
                           "(HF c_fc / c_proj)", hf_names={"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}),
        Arch("stablelm", "StableLM 2 / Zephyr: LayerNorms with biases, QKV biases, partial rotary"),
        Arch("falcon", "Falcon 7B/40B: fused QKV, parallel attention and MLP (HF self_attention.dense, "
                       "mlp.dense_4h_to_h)",
             hf_names={"attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
                       "attn_norm_2": "ln_mlp", "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}),
        Arch("internlm2", "llama-shaped; HF names attention.wqkv / attention.wo / feed_forward.w1-w3",
             hf_names={"attn_q": "attention.wqkv", "attn_k": "attention.wqkv", "attn_v": "attention.wqkv",
                       "attn_output": "attention.wo", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
                       "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}),
        Arch("exaone", "EXAONE 3.x: llama-shaped; HF names attn.attention.out_proj, mlp.c_fc_0/c_fc_1/c_proj",
             hf_names={"attn_q": "attn.attention.q_proj", "attn_k": "attn.attention.k_proj",
                       "attn_v": "attn.attention.v_proj", "attn_output": "attn.attention.out_proj",
                       "attn_norm": "ln_1", "ffn_norm": "ln_2", "ffn_gate": "mlp.c_fc_0", "ffn_up": "mlp.c_fc_1",
                       "ffn_down": "mlp.c_proj"}),
        Arch("glm4", "GLM-4 (0414) / GLM-Z1: norms after attention and FFN, fused gate+up (HF gate_up_proj); "
                     "nextn_predict_layers > 0 (MTP layers after the last block) is refused",
             hf_names={"post_attention_norm": "post_self_attn_layernorm", "post_ffw_norm": "post_mlp_layernorm",
                       "ffn_up": "mlp.gate_up_proj"}),
        Arch("qwen2moe", "Qwen1.5/Qwen2 MoE: routed experts plus a shared expert and its gate, all moving with "
                         "their layer; mergekit's down_proj filter reaches both", hf_names=_QWEN2_MOE_HF),
        Arch("olmoe", "OLMoE: q/k norms and experts in every layer", hf_names=_QWEN_MOE_HF),
        Arch("granitemoe", "Granite MoE (and MoE-shared): granite's global scales; experts under HF "
                           "block_sparse_moe.input_linear / output_linear", hf_names=_GRANITE_MOE_HF),
        Arch("phimoe", "Phi-3.5-MoE: LayerNorms and attention with biases, output bias (global), Mixtral-style "
                       "experts", hf_names=_MIXTRAL_HF),
        Arch("gpt-oss", "attention sinks and biased experts move with their layer; sliding-window layers (every "
                        "other layer) re-expressed as a per-layer array",
             swa=SwaRule(2),
             hf_names={"attn_sinks": "self_attn.sinks", "ffn_gate_inp": "mlp.router",
                       "ffn_gate_exps": "mlp.experts.gate_up_proj", "ffn_up_exps": "mlp.experts.gate_up_proj",
                       "ffn_down_exps": "mlp.experts.down_proj"}),
        Arch("phi2", "Phi-2 / Phi-1.5: parallel attention and MLP, biases everywhere, output bias (global)",
             hf_names={"attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}),
        Arch("gptneox", "GPT-NeoX / Pythia: fused QKV, biases, parallel residual (a global flag)",
             hf_names=_NEOX_HF),
        Arch("gpt2", "learned position embeddings are global (sized by the context, not the depth)",
             hf_names=_GPT2_HF),
        Arch("starcoder", "StarCoder 1 / SantaCoder: GPT-2 blocks with multi-query attention", hf_names=_GPT2_HF),
        Arch("bloom", "ALiBi (per head, not per layer); LayerNorm on the embeddings is global",
             hf_names={k: v.replace("attention.", "self_attention.") for k, v in _NEOX_HF.items()}),
        Arch("mpt", "ALiBi (per head, not per layer); no biases",
             hf_names={"attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj", "attn_norm": "norm_1",
                       "ffn_norm": "norm_2", "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}),
        Arch("qwen", "Qwen (1): fused QKV with bias; HF names attn.c_attn / attn.c_proj / mlp.w1, w2, c_proj",
             hf_names={"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "attn_norm": "ln_1",
                       "ffn_norm": "ln_2", "ffn_up": "mlp.w1", "ffn_gate": "mlp.w2", "ffn_down": "mlp.c_proj"}),
        Arch("nemotron", "Nemotron / Minitron: LayerNorm1P stored as 1 + w, so a recipe scaling norms is refused; "
                         "ReLU^2 MLP", offset_norms=True),
        Arch("arcee", "Arcee AFM: llama-shaped attention, ReLU^2 MLP without gate"),
        Arch("seed_oss", "Seed-OSS: QKV biases, llama-shaped"),
        Arch("xverse", "llama-shaped"),
        Arch("orion", "llama-shaped with LayerNorm biases"),
        Arch("chatglm", "ChatGLM3 / GLM-4-9B (older conversions): fused QKV with bias, fused gate+up",
             hf_names={"attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
                       "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}),
        Arch("openelm", "per-layer query/KV head counts and FFN widths re-indexed with their layers; "
                        "tied embeddings",
             hf_names={"attn_qkv": "attn.qkv_proj", "attn_output": "attn.out_proj", "attn_q_norm": "attn.q_norm",
                       "attn_k_norm": "attn.k_norm", "ffn_gate": "ffn.proj_1", "ffn_up": "ffn.proj_1",
                       "ffn_down": "ffn.proj_2"},
             checks=(_first_layer_heads,)),
        Arch("refact", "llama-shaped with ALiBi (per head, not per layer)"),
        Arch("codeshell", "GPT-2-style biased blocks with RoPE", hf_names=_GPT2_HF),
        Arch("dbrx", "fused QKV, a norm between attention and the experts, experts in every layer",
             hf_names={"attn_qkv": "norm_attn_norm.attn.Wqkv", "attn_output": "norm_attn_norm.attn.out_proj",
                       "attn_norm": "norm_attn_norm.norm_1", "attn_output_norm": "norm_attn_norm.norm_2",
                       "ffn_gate_inp": "ffn.router.layer", "ffn_gate_exps": "ffn.experts.mlp.w1",
                       "ffn_up_exps": "ffn.experts.mlp.v1", "ffn_down_exps": "ffn.experts.mlp.w2"}),
        Arch("ernie4_5", "ERNIE 4.5 dense (0.3B): llama-shaped"),
        Arch("hunyuan-dense", "Hunyuan dense (0.5B-7B): per-head q/k norms move with their layer",
             hf_names={"attn_q_norm": "self_attn.query_layernorm", "attn_k_norm": "self_attn.key_layernorm"}),
        Arch("hunyuan-moe", "Hunyuan-A13B: q/k norms, routed experts and a shared expert in every layer",
             hf_names={"attn_q_norm": "self_attn.query_layernorm", "attn_k_norm": "self_attn.key_layernorm",
                       "ffn_gate_inp": "mlp.gate.wg", "ffn_gate_exps": "mlp.experts.gate_proj",
                       "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj",
                       "ffn_gate_shexp": "mlp.shared_mlp.gate_proj", "ffn_up_shexp": "mlp.shared_mlp.up_proj",
                       "ffn_down_shexp": "mlp.shared_mlp.down_proj"}),
        Arch("qwen2vl", "Qwen2-VL's language model: qwen2's layers; the multimodal RoPE sections are global"),
        Arch("jais", "GPT-2 blocks with a gated MLP and ALiBi (per head, not per layer)",
             hf_names={**_GPT2_HF, "ffn_gate": "mlp.c_fc2"}),
        Arch("deci", "DeciLM / Llama-Nemotron (NAS): per-layer head counts and FFN widths re-indexed with their "
                     "layers; the first output layer must have attention heads when the source's does "
                     "(llama.cpp sizes every head from layer 0)",
             checks=(_first_layer_heads,)),
    )
}

# ---- reasons, grouped as in the README table

_UNTESTED = ("a plain layer stack as far as llama.cpp's loader shows (no positional metadata), but untested: "
             "refused until a fixture test covers it")
_UNTESTED_MOE = ("MoE in every layer, no positional metadata in llama.cpp's loader, but untested: "
                 "refused until a fixture test covers it")
_UNTESTED_SWA = ("its sliding-window pattern could be re-expressed per layer (llama.cpp reads a per-layer array), "
                 "but it is refused until a fixture test covers it")
_LEAD = ("leading dense blocks / interleaved MoE layers are fixed by position "
         "(leading_dense_block_count, interleave_moe_layer_step) and llama.cpp has no per-layer form for them")
_HYBRID = ("hybrid recurrent/attention stack: which layers are recurrent is positional or tied to per-layer "
           "head counts; refused until a fixture test covers it")
_RECURRENT = "recurrent (state-space / RWKV) layers; refused until a fixture test covers it"
_EMBED = "embedding / encoder model (bidirectional), not a generative stack to upscale"

REFUSED: dict[str, str] = {
    # not a decoder-only stack of blk.N layers llama.cpp generates with
    "clip": "multimodal projector (mmproj) file, not a language model",
    "gptj": "llama.cpp has no loader for it (unsupported model architecture)",
    "t5": "encoder-decoder: layers are enc.blk.N / dec.blk.N",
    "t5encoder": "encoder-only T5: layers are enc.blk.N",
    "wavtokenizer-dec": "audio decoder: posnet/convnext stacks, not blk.N layers",
    "pockettts": "text-to-speech model; refused until a fixture test covers it",
    "qwen3tts": "text-to-speech model; refused until a fixture test covers it",
    "eagle3": "speculative-decoding draft head bound to a target model's layer ids (target_layers)",
    "dflash": "speculative-decoding draft bound to a target model's layer ids (target_layers)",
    "gemma4-assistant": "draft model bound to its target's layers (per-layer sliding-window array, KV sharing)",
    "hrm_text": "hierarchical reasoning model: the block count must equal layers_per_stack * h_cycles * (l_cycles+1)",
    "nanbeige": "looped model: physical layers are re-run num_loops times; stacking changes the loop body",
    "bert": _EMBED, "modern-bert": _EMBED, "nomic-bert": _EMBED, "nomic-bert-moe": _EMBED,
    "neo-bert": _EMBED, "jina-bert-v2": _EMBED, "jina-bert-v3": _EMBED, "eurobert": _EMBED,
    "gemma-embedding": _EMBED, "llama-embed": _EMBED,
    "dream": "diffusion language model (non-causal); refused until a fixture test covers it",
    "llada": "diffusion language model (non-causal); refused until a fixture test covers it",
    "llada-moe": "diffusion language model (non-causal); refused until a fixture test covers it",
    "rnd1": "diffusion language model (non-causal); refused until a fixture test covers it",
    # recurrent and hybrid
    "mamba": _RECURRENT, "mamba2": _RECURRENT, "rwkv6": _RECURRENT,
    "rwkv6qwen2": _RECURRENT, "rwkv7": _RECURRENT, "arwkv7": _RECURRENT,
    "jamba": _HYBRID, "falcon-h1": _HYBRID, "plamo2": _HYBRID, "granitehybrid": _HYBRID,
    "nemotron_h": _HYBRID, "nemotron_h_moe": _HYBRID, "lfm2": _HYBRID, "lfm2moe": _HYBRID,
    "qwen3next": "recurrent/attention layer kinds are positional (full_attention_interval) and it has MTP layers; "
                 "refused until a fixture test covers it",
    "qwen35": _HYBRID, "qwen35moe": _HYBRID, "qwen4exp": _HYBRID, "kimi-linear": _HYBRID, "kimi-k3": _HYBRID,
    "glm5-next": _HYBRID, "bailingmoe3": _HYBRID,
    "minimax-01": "hybrid lightning/softmax attention; the lightning-attention decay depends on il/(n_layer-1)",
    # positional rules without a per-layer form
    "llama4": "interleaved no-RoPE and MoE layers are fixed by position (every 4th layer)",
    "deepseek": _LEAD, "deepseek2": _LEAD + "; MTP layers sit after the last block",
    "deepseek2-ocr": _LEAD, "deepseek32": _LEAD, "deepseek4": _LEAD + "; per-layer compression",
    "mistral4": _LEAD, "glm4moe": _LEAD, "glm-dsa": _LEAD, "bailingmoe": _LEAD, "bailingmoe2": _LEAD,
    "dots1": _LEAD, "dots3note": _LEAD, "ernie4_5-moe": _LEAD, "paddleocr": _LEAD, "hy_v4": _LEAD,
    "minimax-m3": _LEAD, "afmoe": _LEAD, "laguna": _LEAD, "exaone-moe": _LEAD, "cohere2moe": _LEAD,
    "gemma3n": "per-layer embeddings live in global tensors sized by n_layer (per_layer_token_embd), "
               "AltUp and KV sharing from layer 20 are positional",
    "gemma4": "per-layer embeddings live in global tensors sized by n_layer, and KV sharing is counted from the end",
    "minicpm": "llama.cpp computes the residual scale from the layer count (1.4/sqrt(n_layer)); "
               "a deeper model would rescale every layer",
    "minicpm3": "llama.cpp computes the residual scale from the layer count (scale_depth/sqrt(n_layer)); "
                "a deeper model would rescale every layer",
    "baichuan": "llama.cpp picks RoPE (7B, 32 layers) or ALiBi (13B, 40 layers) from the layer count",
    "exaone4": "llama.cpp enables sliding-window attention only at exactly 64 layers (32B)",
    "smallthinker": "no-RoPE and sliding-window layers are derived from position and from the layer count",
    "qwen3vl": "vision features are injected into fixed layers (deepstack); refused until a fixture test covers it",
    "qwen3vlmoe": "vision features are injected into fixed layers (deepstack); refused until a fixture test covers it",
    "graniteswitch": "adapter routing (per-adapter token ids, LoRA banks) is not a plain layer stack",
    "apertus": "per-layer xIELU arrays live under unprefixed keys (xielu.*); refused until a fixture test covers it",
    # plain stacks, untested
    **{a: _UNTESTED for a in (
        "plamo", "bitnet", "jais2", "chameleon", "plm",
        "hunyuan_vl", "cogvlm", "pangu-embedded", "maincoder", "talkie")},
    **{a: _UNTESTED_MOE for a in (
        "grok", "arctic",
        "hy_v3", "grovemoe", "minimax-m2")},
    **{a: _UNTESTED_SWA for a in (
        "plamo3", "muse-glimmer", "mellum", "mimo2", "step35", "spark2_5", "maple",
        "granite_swa")},
}


def lookup(arch: str) -> Arch | None:
    return SUPPORTED.get(arch)


def refusal(arch: str) -> str:
    reason = REFUSED.get(arch, "not an architecture llama.cpp knows, or not yet classified by gguf-upscale")
    return (f"architecture {arch!r} is not supported: {reason} "
            f"(supported: {', '.join(sorted(SUPPORTED))})")


def hf_name(arch: str | None, kind: str) -> str | None:
    """The HF name of a GGUF tensor kind where `arch` differs from llama's naming, else None."""
    a = SUPPORTED.get(arch or "")
    return a.hf_names.get(kind) if a else None


def is_offset_norm(arch: str | None, suffix: str) -> bool:
    """True for norm weights that convert_hf_to_gguf stored as 1 + w (so scaling them is not mergekit's scale)."""
    a = SUPPORTED.get(arch or "")
    return bool(a and a.offset_norms and suffix.rpartition(".")[0].endswith("norm"))


def check_layout(arch: str, models: Mapping[str, SourceModel], layers: Sequence[tuple[str, int]]) -> None:
    """Refuse (RecipeError) output layouts llama.cpp would interpret differently from the source."""
    a = SUPPORTED.get(arch)
    for check in (a.checks if a else ()):
        check(arch, models, layers)


def swa_rule(arch: str) -> SwaRule | None:
    """The arch's load_swa_pattern rule when gguf-upscale re-expresses it per layer."""
    a = SUPPORTED.get(arch)
    return a.swa if a else None


def swa_layers(arch: str, kvs: Mapping[str, Any], n_layer: int) -> list[bool] | None:
    """Which layers llama.cpp treats as sliding-window in a model with metadata values `kvs`,
    or None when the arch re-expresses no pattern (no rule, or sliding window disabled)."""
    rule = swa_rule(arch)
    if rule is None:
        return None
    if rule.needs_window and not kvs.get(f"{arch}.{SWA_WINDOW_KEY}"):
        return None
    value = kvs.get(f"{arch}.{SWA_KEY}")
    if isinstance(value, (list, tuple)):  # llama.cpp: get_arr into a zero-filled array, no length check
        flags = [bool(v) for v in value[:n_layer]]
        return flags + [False] * (n_layer - len(flags))
    n = rule.default if value is None else int(value)
    if rule.dense_first:
        return [n == 0 or il % n != 0 for il in range(n_layer)]
    return [n == 0 or il % n < n - 1 for il in range(n_layer)]
