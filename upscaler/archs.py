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

from .errors import RecipeError

if TYPE_CHECKING:
    from .source import SourceModel

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


# --------------------------------------------------------------------------- the table

_GEMMA_HF = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_MIXTRAL_HF = {  # llama with experts (Mixtral): mergekit sees block_sparse_moe.*
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.w1",
    "ffn_down_exps": "block_sparse_moe.experts.w2",
    "ffn_up_exps": "block_sparse_moe.experts.w3",
}

_QWEN_MOE_HF = {  # Qwen2/3 MoE checkpoints: mlp.gate router, mlp.experts.N.{gate,up,down}_proj
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}

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
    "baichuan": "llama.cpp picks RoPE (7B, 32 layers) or ALiBi (13B, 40 layers) from the layer count",
    "exaone4": "llama.cpp enables sliding-window attention only at exactly 64 layers (32B)",
    "smallthinker": "no-RoPE and sliding-window layers are derived from position and from the layer count",
    "qwen3vl": "vision features are injected into fixed layers (deepstack); refused until a fixture test covers it",
    "qwen3vlmoe": "vision features are injected into fixed layers (deepstack); refused until a fixture test covers it",
    "graniteswitch": "adapter routing (per-adapter token ids, LoRA banks) is not a plain layer stack",
    "apertus": "per-layer xIELU arrays live under unprefixed keys (xielu.*); refused until a fixture test covers it",
    # plain stacks, untested
    **{a: _UNTESTED for a in (
        "deci", "falcon", "gpt2", "gptneox", "mpt", "starcoder", "refact", "bloom", "stablelm", "qwen",
        "qwen2vl", "phi2", "plamo", "codeshell", "orion", "internlm2", "minicpm3", "starcoder2",
        "xverse", "olmo", "openelm", "chatglm", "glm4", "bitnet", "jais", "jais2", "nemotron", "exaone",
        "chameleon", "plm", "arcee", "ernie4_5", "hunyuan-dense", "hunyuan_vl", "seed_oss", "cogvlm", "pangu-embedded",
        "maincoder", "talkie")},
    **{a: _UNTESTED_MOE for a in (
        "grok", "qwen2moe", "phimoe", "dbrx", "olmoe", "arctic", "granitemoe", "hunyuan-moe",
        "hy_v3", "grovemoe", "minimax-m2")},
    **{a: _UNTESTED_SWA for a in (
        "plamo3", "olmo2", "muse-glimmer", "mellum", "gpt-oss", "mimo2", "step35", "spark2_5", "maple",
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
