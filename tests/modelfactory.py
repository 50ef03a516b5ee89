"""Tiny, deterministic GGUF models that llama.cpp really loads and runs.

Every test in the project builds its fixtures here, so the files imitate what
``convert_hf_to_gguf.py`` writes for a Llama (tensor names, metadata keys and
their GGUF value types, a SentencePiece vocab with byte fallback) while staying
a few MB in size.

Architectures are described by ONE table (:data:`ARCHS`): per layer, the GGUF
tensor kinds (checked against gguf-py's own ``MODEL_TENSORS[arch]``, so a kind
llama.cpp does not know for that architecture fails at import), shape rules
(:data:`_SHAPES`, per-arch overrides) and the hparams llama.cpp requires, as
plain values or rules of the dimensions. ``llama`` mirrors convert's output
exactly; every other entry carries the tensors and keys its llama.cpp loader
needs (all load and run). Adding an architecture means adding an
:class:`ArchSpec` entry: tests/test_archs.py then covers it.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
)
from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
from gguf.quants import quantize
from gguf.utility import size_label

if TYPE_CHECKING:
    import llama_cpp

__all__ = [
    "ARCHS",
    "ArchSpec",
    "Dims",
    "DTYPES",
    "KV",
    "build_vocab",
    "eval_logits",
    "load_llama",
    "make_model",
    "shard_paths",
    "tensor_names",
]

#: A metadata entry as passed to ``GGUFWriter.add_key_value``: (value, type, array sub-type).
KV = tuple[Any, GGUFValueType, "GGUFValueType | None"]

TensorOrder = Literal["natural", "hf"]

#: Supported 2-D weight types -> (GGML tensor type, general.file_type).
DTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

CONTEXT_LENGTH = 256
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5

# ChatML: the control tokens live at the end of the vocab, like tokens added by a chat fine-tune.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# llama.cpp looks this token up unconditionally when general.name contains "phi3"/"phi-3"
# (llama-vocab.cpp, unordered_map::at -> load failure), so every vocab carries it.
ENDOFTEXT = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Dims:
    """Model dimensions; shapes below are numpy shapes (rows=out, cols=in), GGUF stores them reversed."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_embd_head: int = 0  # 0: n_embd // n_head (else written as attention.key_length/value_length)
    n_expert: int = 0  # experts per layer for architectures that list ffn_*_exps tensors themselves
    # per-layer values (DeciLM / Nemotron-NAS): one entry per layer, written as arrays
    head_counts: tuple[int, ...] = ()
    head_counts_kv: tuple[int, ...] = ()
    ff_lengths: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.n_embd_head or self.n_embd // self.n_head

    def layer(self, il: int) -> Dims:
        """These dimensions as layer ``il`` sees them (per-layer head counts and FFN widths)."""
        return replace(self,
                       n_head=self.head_counts[il] if self.head_counts else self.n_head,
                       n_head_kv=self.head_counts_kv[il] if self.head_counts_kv else self.n_head_kv,
                       n_ff=self.ff_lengths[il] if self.ff_lengths else self.n_ff)


ShapeFn = Callable[[Dims], tuple[int, ...]]
U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING

# Shape rules for every tensor kind any registered architecture uses (per-arch overrides allowed).
_SHAPES: dict[str, ShapeFn] = {
    "token_embd.weight": lambda d: (d.n_vocab, d.n_embd),
    "output_norm.weight": lambda d: (d.n_embd,),
    "output.weight": lambda d: (d.n_vocab, d.n_embd),
    "attn_norm.weight": lambda d: (d.n_embd,),
    "ffn_norm.weight": lambda d: (d.n_embd,),
    "post_attention_norm.weight": lambda d: (d.n_embd,),
    "post_ffw_norm.weight": lambda d: (d.n_embd,),
    "attn_q_norm.weight": lambda d: (d.head_dim,),
    "attn_k_norm.weight": lambda d: (d.head_dim,),
    "attn_q.weight": lambda d: (d.n_head * d.head_dim, d.n_embd),
    "attn_k.weight": lambda d: (d.n_head_kv * d.head_dim, d.n_embd),
    "attn_v.weight": lambda d: (d.n_head_kv * d.head_dim, d.n_embd),
    "attn_q.bias": lambda d: (d.n_head * d.head_dim,),
    "attn_k.bias": lambda d: (d.n_head_kv * d.head_dim,),
    "attn_v.bias": lambda d: (d.n_head_kv * d.head_dim,),
    "attn_qkv.weight": lambda d: ((d.n_head + 2 * d.n_head_kv) * d.head_dim, d.n_embd),
    "attn_output.weight": lambda d: (d.n_embd, d.n_head * d.head_dim),
    "ffn_gate.weight": lambda d: (d.n_ff, d.n_embd),
    "ffn_up.weight": lambda d: (d.n_ff, d.n_embd),
    "ffn_down.weight": lambda d: (d.n_embd, d.n_ff),
    # LayerNorm biases, projection biases (falcon, starcoder2, phimoe, gpt-oss, ...)
    "attn_norm.bias": lambda d: (d.n_embd,),
    "attn_norm_2.weight": lambda d: (d.n_embd,),
    "attn_output_norm.weight": lambda d: (d.n_embd,),
    "attn_norm_2.bias": lambda d: (d.n_embd,),
    "ffn_norm.bias": lambda d: (d.n_embd,),
    "output_norm.bias": lambda d: (d.n_embd,),
    "output.bias": lambda d: (d.n_vocab,),
    "attn_qkv.bias": lambda d: ((d.n_head + 2 * d.n_head_kv) * d.head_dim,),
    "attn_output.bias": lambda d: (d.n_embd,),
    "ffn_up.bias": lambda d: (d.n_ff,),
    "ffn_gate.bias": lambda d: (d.n_ff,),
    "ffn_down.bias": lambda d: (d.n_embd,),
    "attn_sinks.weight": lambda d: (d.n_head,),
    "position_embd.weight": lambda d: (CONTEXT_LENGTH, d.n_embd),  # learned absolute positions (GPT-2)
    "token_embd_norm.weight": lambda d: (d.n_embd,),
    "token_embd_norm.bias": lambda d: (d.n_embd,),
    # experts listed by the architecture itself (Dims.n_expert), router, shared expert
    "ffn_gate_inp.weight": lambda d: (d.n_expert, d.n_embd),
    "ffn_gate_inp.bias": lambda d: (d.n_expert,),
    "ffn_gate_exps.weight": lambda d: (d.n_expert, d.n_ff, d.n_embd),
    "ffn_up_exps.weight": lambda d: (d.n_expert, d.n_ff, d.n_embd),
    "ffn_down_exps.weight": lambda d: (d.n_expert, d.n_embd, d.n_ff),
    "ffn_gate_exps.bias": lambda d: (d.n_expert, d.n_ff),
    "ffn_up_exps.bias": lambda d: (d.n_expert, d.n_ff),
    "ffn_down_exps.bias": lambda d: (d.n_expert, d.n_embd),
    "ffn_gate_inp_shexp.weight": lambda d: (d.n_embd,),
    "ffn_gate_shexp.weight": lambda d: (d.n_ff, d.n_embd),
    "ffn_up_shexp.weight": lambda d: (d.n_ff, d.n_embd),
    "ffn_down_shexp.weight": lambda d: (d.n_embd, d.n_ff),
}

# GGUF name -> HF name as read by convert_hf_to_gguf (per-arch overrides allowed).
_HF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "output_norm.bias": "model.norm.bias",
    "output.bias": "lm_head.bias",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _no_hparams(d: Dims) -> dict[str, KV]:
    return {}


#: Arch-specific metadata: a rule of the dimensions, or a table of key -> (value or rule, type[, sub-type]).
HParams = Callable[[Dims], dict[str, KV]] | dict[str, tuple]
GLOBALS = ("token_embd.weight", "output_norm.weight", "output.weight")


def _arch_kinds(arch: str) -> set[str] | None:
    """GGUF tensor kinds gguf-py's constants list for `arch` (blk.{bid}.X -> X), None if gguf-py has no entry."""
    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None or key not in MODEL_TENSORS:
        return None
    return {TENSOR_NAMES[t].replace("blk.{bid}.", "") for t in MODEL_TENSORS[key]}


@dataclass(frozen=True)
class ArchSpec:
    """One row of the table: an architecture's per-layer tensors, global tensors, tying rule and hparams.

    ``hparams`` gives arch-specific keys *without* the ``{arch}.`` prefix, either as a function of
    the dimensions or as a dict ``{key: (value | rule(Dims), type[, sub_type])}``; they are written
    after ``general.file_type`` (where convert_hf_to_gguf puts LlamaModel's). ``defaults`` are
    make_model arguments this architecture needs to load at all (e.g. olmoe's k-norm over all
    heads wants n_head_kv == n_head); ``fixture`` are the extra make_model arguments the
    per-architecture test (tests/test_archs.py) uses to show its layer rules (per-layer arrays,
    enough layers for a sliding-window period).
    """

    name: str
    layer_suffixes: frozenset[str]
    hparams: HParams = _no_hparams
    always_tied: bool = False  # the loader has no output.weight slot at all
    norm_eps_key: str = "attention.layer_norm_rms_epsilon"
    shapes: dict[str, ShapeFn] = field(default_factory=dict)
    hf_names: dict[str, str] = field(default_factory=dict)
    norm_gain: dict[str, float] = field(default_factory=dict)  # init scale of some norm weights
    default_experts: int = 0  # MoE-only architectures: experts when make_model is given none
    global_tensors: tuple[str, ...] = GLOBALS
    defaults: dict[str, Any] = field(default_factory=dict)
    fixture: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = _arch_kinds(self.name)
        if kinds is None:
            return
        globals_ = {t for t in self.global_tensors if not (self.always_tied and t.startswith("output."))}
        layer = set(self.layer_suffixes)
        if self.default_experts and not self.native_experts:  # make_model rewrites the dense FFN
            layer = {_DENSE_TO_EXPERTS.get(t, t) for t in layer} | {"ffn_gate_inp.weight"}
        unknown = sorted(s for s in layer | globals_ if s.rpartition(".")[0] not in kinds)
        if unknown:
            raise ValueError(f"{self.name}: gguf-py's MODEL_TENSORS has no {unknown}")

    def shape(self, suffix: str) -> ShapeFn:
        return self.shapes.get(suffix) or _SHAPES[suffix]

    def hf_name(self, suffix: str) -> str:
        return self.hf_names.get(suffix) or _HF_NAMES.get(suffix) or suffix

    @property
    def native_experts(self) -> bool:
        """True when the layer list holds the experts itself (no dense-to-MoE rewrite by make_model)."""
        return "ffn_gate_inp.weight" in self.layer_suffixes

    def metadata(self, d: Dims) -> dict[str, KV]:
        if callable(self.hparams):
            return self.hparams(d)
        out: dict[str, KV] = {}
        for key, (value, *types) in self.hparams.items():
            out[key] = (value(d) if callable(value) else value, types[0], types[1] if len(types) > 1 else None)
        return out

    @property
    def layer_tensors(self) -> tuple[str, ...]:
        """Per-layer order == alphabetical HF order (safetensors keys are sorted), as convert writes."""
        return tuple(sorted(self.layer_suffixes, key=self.hf_name))


_DENSE_TO_EXPERTS = {"ffn_gate.weight": "ffn_gate_exps.weight", "ffn_up.weight": "ffn_up_exps.weight",
                     "ffn_down.weight": "ffn_down_exps.weight"}
_QKV_KINDS = {"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_q_norm", "attn_k_norm", "attn_sinks"}


def _present(d: Dims, suffix: str) -> bool:
    """Whether a layer with these (per-layer) dimensions has the tensor, as DeciLM's loader decides:
    no heads -> no attention at all, heads without KV heads -> a linear map (attn_norm, attn_output),
    FFN width 0 -> no FFN tensors."""
    kind = suffix.rpartition(".")[0]
    if kind.startswith("ffn_"):
        return d.n_ff > 0
    if kind in _QKV_KINDS:
        return d.n_head > 0 and d.n_head_kv > 0
    if kind.startswith("attn_"):
        return d.n_head > 0
    return True


_LLAMA_LAYER = frozenset({
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
})
_QK_NORM = frozenset({"attn_q_norm.weight", "attn_k_norm.weight"})
_ATTN = frozenset({"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"})
_FFN = frozenset({"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"})
_NORMS = frozenset({"attn_norm.weight", "ffn_norm.weight"})
_LN_BIAS = frozenset({"attn_norm.weight", "attn_norm.bias", "ffn_norm.weight", "ffn_norm.bias"})
_LN_GLOBALS = ("token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight")
_GPT_MLP = frozenset({"ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias"})
_GPT_BLOCK = _GPT_MLP | {"attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_qkv.bias", "attn_output.weight",
                         "attn_output.bias", "ffn_norm.weight", "ffn_norm.bias"}
_POST_NORMS = frozenset({"post_attention_norm.weight", "post_ffw_norm.weight"})
_EXPERTS = frozenset({"ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"})
_EXPERT_BIAS = frozenset({"ffn_gate_inp.bias", "ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias"})
_SHARED_EXPERT = frozenset({"ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
                            "ffn_down_shexp.weight"})
_QKV_BIAS = frozenset({"attn_q.bias", "attn_k.bias", "attn_v.bias"})
_GEMMA_HF = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Gemma multiplies input embeddings by sqrt(n_embd); with tied (small) embeddings and
# unit post-norms the residual stays dominated by the input token and the model
# predicts its own input almost surely. Louder post-norms restore a spread-out output.
_GEMMA_GAIN = {"post_attention_norm.weight": 8.0, "post_ffw_norm.weight": 8.0}
GEMMA1_GAIN = 4.0  # no post-norms in Gemma 1: louder pre-norms let the layers outweigh the scaled input token
SLIDING_WINDOW = 32  # far below CONTEXT_LENGTH so sliding-window layers really behave differently


def _kv_len(d: Dims) -> dict[str, KV]:
    return {"attention.key_length": (d.head_dim, U32, None), "attention.value_length": (d.head_dim, U32, None)}


def _llama_hp(d: Dims) -> dict[str, KV]:
    return {"vocab_size": (d.n_vocab, U32, None), "rope.dimension_count": (d.head_dim, U32, None)}


def _gemma2_hp(d: Dims) -> dict[str, KV]:
    return {**_kv_len(d), "attn_logit_softcapping": (50.0, F32, None),
            "final_logit_softcapping": (30.0, F32, None), "attention.sliding_window": (SLIDING_WINDOW, U32, None)}


def _gemma3_hp(d: Dims) -> dict[str, KV]:
    return {**_kv_len(d), "attention.sliding_window": (SLIDING_WINDOW, U32, None)}


def _cohere2_hp(d: Dims) -> dict[str, KV]:
    return {"logit_scale": (1.0, F32, None), "attention.sliding_window": (SLIDING_WINDOW, U32, None)}


def _granite_hp(d: Dims) -> dict[str, KV]:
    return {**_llama_hp(d), "logit_scale": (1.0, F32, None), "residual_scale": (0.5, F32, None),
            "embedding_scale": (1.0, F32, None), "attention.scale": (1.0 / d.head_dim**0.5, F32, None)}


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in [
        ArchSpec("llama", _LLAMA_LAYER, _llama_hp),
        ArchSpec("qwen2", _LLAMA_LAYER | _QKV_BIAS),
        ArchSpec("qwen3", _LLAMA_LAYER | _QK_NORM, _kv_len),
        ArchSpec("gemma2", _LLAMA_LAYER | {"post_attention_norm.weight", "post_ffw_norm.weight"}, _gemma2_hp,
                 always_tied=True, hf_names=_GEMMA_HF, norm_gain=_GEMMA_GAIN),
        ArchSpec("gemma3", _LLAMA_LAYER | _QK_NORM | {"post_attention_norm.weight", "post_ffw_norm.weight"},
                 _gemma3_hp, hf_names=_GEMMA_HF, norm_gain=_GEMMA_GAIN,
                 fixture={"n_layer": 6}),  # its default pattern (5 sliding, 1 full) shows
        ArchSpec("phi3",
                 frozenset({"attn_norm.weight", "attn_qkv.weight", "attn_output.weight",
                            "ffn_norm.weight", "ffn_up.weight", "ffn_down.weight"}),
                 lambda d: {"rope.dimension_count": (d.head_dim, U32, None)},
                 shapes={"ffn_up.weight": lambda d: (2 * d.n_ff, d.n_embd)},  # gate and up fused
                 hf_names={"ffn_up.weight": "mlp.gate_up_proj.weight"}),
        ArchSpec("command-r", _LLAMA_LAYER - {"ffn_norm.weight"},  # parallel attn/FFN on one LayerNorm
                 lambda d: {"logit_scale": (1.0, F32, None)},
                 always_tied=True, norm_eps_key="attention.layer_norm_epsilon"),
        ArchSpec("granite", _LLAMA_LAYER, _granite_hp),
        # Command R7B / Command A: command-r's tensors, sliding-window layers (3 of 4; full ones have no RoPE)
        ArchSpec("cohere2", _LLAMA_LAYER - {"ffn_norm.weight"}, _cohere2_hp,
                 always_tied=True, norm_eps_key="attention.layer_norm_epsilon"),
        ArchSpec("mistral3", _LLAMA_LAYER, lambda d: {"rope.dimension_count": (d.head_dim, U32, None)}),
        # llama.cpp: every 4th layer without RoPE (hard-coded); 8 layers so slices 4 apart keep it in place
        ArchSpec("smollm3", _LLAMA_LAYER, fixture={"n_layer": 8}),
        # Gemma (1): llama's layers, always tied, embeddings scaled by sqrt(n_embd), norms stored as 1 + w
        ArchSpec("gemma", _LLAMA_LAYER, _kv_len, always_tied=True,
                 norm_gain={"attn_norm.weight": GEMMA1_GAIN, "ffn_norm.weight": GEMMA1_GAIN}),
        # Qwen3 MoE: qwen3's layers, FFN replaced by a router and stacked experts (make_model n_expert > 0)
        ArchSpec("qwen3moe", _LLAMA_LAYER | _QK_NORM,
                 lambda d: {**_kv_len(d), "expert_feed_forward_length": (d.n_ff, U32, None)}, default_experts=4,
                 fixture={"n_expert": 4, "n_expert_used": 2}),
        # ---- families below: tensor kinds from llama.cpp's loaders (src/models/<arch>.cpp)
        # OLMo (1): non-parametric LayerNorm, so no norm tensors at all, not even output_norm
        ArchSpec("olmo", _ATTN | _FFN, global_tensors=("token_embd.weight", "output.weight"),
                 norm_eps_key="attention.layer_norm_epsilon"),
        # OLMo 2 / OLMo 3: norms after attention and FFN, q/k norms over all heads; OLMo 3's
        # sliding-window layers (3 of 4, the pattern llama.cpp assumes) are in the fixture
        ArchSpec("olmo2", _ATTN | _FFN | _POST_NORMS | _QK_NORM,
                 shapes={"attn_q_norm.weight": lambda d: (d.n_head * d.head_dim,),
                         "attn_k_norm.weight": lambda d: (d.n_head_kv * d.head_dim,)},
                 hparams={"attention.sliding_window": (SLIDING_WINDOW, U32)}),
        # StarCoder2: LayerNorms with biases, biased projections, GELU MLP (c_fc / c_proj in HF)
        ArchSpec("starcoder2", _ATTN | _QKV_BIAS | _LN_BIAS | {"attn_output.bias", "ffn_up.weight", "ffn_up.bias",
                                                              "ffn_down.weight", "ffn_down.bias"},
                 global_tensors=_LN_GLOBALS, norm_eps_key="attention.layer_norm_epsilon",
                 hf_names={"ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
                           "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias"}),
        # StableLM (2): LayerNorms with biases, QKV biases, partial rotary (25 % of each head)
        ArchSpec("stablelm", _LLAMA_LAYER | _QKV_BIAS | _LN_BIAS, global_tensors=_LN_GLOBALS,
                 norm_eps_key="attention.layer_norm_epsilon",
                 hparams={"rope.dimension_count": (lambda d: d.head_dim // 4, U32)}),
        # Falcon 7B: one LayerNorm feeding attention and MLP in parallel, fused QKV, multi-query
        ArchSpec("falcon", frozenset({"attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_output.weight",
                                      "ffn_up.weight", "ffn_down.weight"}),
                 global_tensors=_LN_GLOBALS, norm_eps_key="attention.layer_norm_epsilon",
                 fixture={"n_head_kv": 1},
                 hf_names={"attn_norm.weight": "input_layernorm.weight", "attn_norm.bias": "input_layernorm.bias",
                           "attn_qkv.weight": "self_attention.query_key_value.weight",
                           "attn_output.weight": "self_attention.dense.weight",
                           "ffn_up.weight": "mlp.dense_h_to_4h.weight", "ffn_down.weight": "mlp.dense_4h_to_h.weight"}),
        ArchSpec("internlm2", _LLAMA_LAYER),  # llama-shaped (convert splits wqkv into q/k/v)
        ArchSpec("exaone", _LLAMA_LAYER, {"rope.dimension_count": (lambda d: d.head_dim, U32)}),
        # GLM-4 (0414): QKV biases, norms after attention and FFN, gate+up fused, half-rotary heads
        ArchSpec("glm4", (_LLAMA_LAYER | _QKV_BIAS | _POST_NORMS) - {"ffn_gate.weight"},
                 {"rope.dimension_count": (lambda d: d.head_dim // 2, U32)},
                 shapes={"ffn_up.weight": lambda d: (2 * d.n_ff, d.n_embd)},
                 hf_names={"ffn_up.weight": "mlp.gate_up_proj.weight"}),
        # Qwen1.5/Qwen2 MoE: routed experts plus a shared expert with its own sigmoid gate
        ArchSpec("qwen2moe", _ATTN | _QKV_BIAS | _NORMS | _EXPERTS | _SHARED_EXPERT,
                 {"expert_feed_forward_length": (lambda d: d.n_ff, U32),
                  "expert_shared_feed_forward_length": (lambda d: d.n_ff, U32)},
                 default_experts=4, fixture={"n_expert": 4, "n_expert_used": 2}),
        # OLMoE: q/k norms over the whole projection (so all heads are KV heads), experts in every layer
        ArchSpec("olmoe", _ATTN | _NORMS | _EXPERTS | _QK_NORM,
                 shapes={"attn_q_norm.weight": lambda d: (d.n_head * d.head_dim,),
                         "attn_k_norm.weight": lambda d: (d.n_head_kv * d.head_dim,)},
                 default_experts=4, defaults={"n_head_kv": 4}, fixture={"n_expert": 4, "n_expert_used": 2}),
        # Granite MoE (3.0 1B-A400M, 3B-A800M): granite's scales, experts in every layer
        ArchSpec("granitemoe", _ATTN | _NORMS | _EXPERTS,
                 lambda d: {**_granite_hp(d), "expert_feed_forward_length": (d.n_ff, U32, None)},
                 default_experts=4, fixture={"n_expert": 4, "n_expert_used": 2}),
        # Phi-3.5-MoE: LayerNorms with biases, biased attention, output bias, Mixtral-style experts
        ArchSpec("phimoe", _ATTN | _QKV_BIAS | _LN_BIAS | _EXPERTS | {"attn_output.bias"},
                 global_tensors=_LN_GLOBALS + ("output.bias",),
                 hparams={"rope.dimension_count": (lambda d: d.head_dim, U32)},
                 default_experts=4, fixture={"n_expert": 4, "n_expert_used": 2}),
        # gpt-oss: attention sinks, biased attention and experts, sliding window on every other layer
        ArchSpec("gpt-oss", _ATTN | _QKV_BIAS | _EXPERTS | _EXPERT_BIAS
                 | {"attn_norm.weight", "post_attention_norm.weight", "attn_output.bias", "attn_sinks.weight"},
                 lambda d: {**_kv_len(d), "expert_feed_forward_length": (d.n_ff, U32, None),
                            "attention.sliding_window": (SLIDING_WINDOW, U32, None)},
                 default_experts=4, fixture={"n_expert": 4, "n_expert_used": 2}),
        # ---- more plain stacks (biased GPT-style blocks, ALiBi, ReLU^2 MLPs, ...)
        ArchSpec("phi2", _ATTN | _QKV_BIAS | _GPT_MLP | {"attn_norm.weight", "attn_norm.bias", "attn_output.bias"},
                 {"rope.dimension_count": (lambda d: d.head_dim // 2, U32)},  # parallel attn/MLP, partial RoPE
                 global_tensors=_LN_GLOBALS + ("output.bias",), norm_eps_key="attention.layer_norm_epsilon"),
        ArchSpec("gptneox", _GPT_BLOCK, {"use_parallel_residual": (True, GGUFValueType.BOOL),
                                         "rope.dimension_count": (lambda d: d.head_dim // 4, U32)},
                 global_tensors=_LN_GLOBALS, norm_eps_key="attention.layer_norm_epsilon"),
        ArchSpec("gpt2", _GPT_BLOCK, global_tensors=_LN_GLOBALS[:1] + ("position_embd.weight",) + _LN_GLOBALS[1:],
                 norm_eps_key="attention.layer_norm_epsilon"),
        ArchSpec("starcoder", _GPT_BLOCK,  # StarCoder 1 / SantaCoder: GPT-2 blocks with multi-query attention
                 global_tensors=_LN_GLOBALS[:1] + ("position_embd.weight",) + _LN_GLOBALS[1:],
                 norm_eps_key="attention.layer_norm_epsilon", fixture={"n_head_kv": 1}),
        ArchSpec("bloom", _GPT_BLOCK,  # ALiBi, LayerNorm on the embeddings
                 global_tensors=("token_embd.weight", "token_embd_norm.weight", "token_embd_norm.bias")
                 + _LN_GLOBALS[1:], norm_eps_key="attention.layer_norm_epsilon"),
        ArchSpec("mpt", frozenset({"attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight",
                                   "ffn_up.weight", "ffn_down.weight"}),
                 {"attention.max_alibi_bias": (8.0, F32)}, norm_eps_key="attention.layer_norm_epsilon"),
        # Qwen (1): fused QKV with bias over all heads, FFN width stored doubled (the loader halves it)
        ArchSpec("qwen", frozenset({"attn_norm.weight", "attn_qkv.weight", "attn_qkv.bias", "attn_output.weight",
                                    "ffn_norm.weight"}) | _FFN,
                 {"rope.dimension_count": (lambda d: d.head_dim, U32)},
                 shapes={"ffn_gate.weight": lambda d: (d.n_ff // 2, d.n_embd),
                         "ffn_up.weight": lambda d: (d.n_ff // 2, d.n_embd),
                         "ffn_down.weight": lambda d: (d.n_embd, d.n_ff // 2)},
                 defaults={"n_head_kv": 4}),
        # Nemotron (Minitron): LayerNorm1P (stored as 1 + w) with biases, ReLU^2 MLP without gate
        ArchSpec("nemotron", _ATTN | _LN_BIAS | {"ffn_up.weight", "ffn_down.weight"}, global_tensors=_LN_GLOBALS,
                 norm_eps_key="attention.layer_norm_epsilon"),
        ArchSpec("arcee", _ATTN | _NORMS | {"ffn_up.weight", "ffn_down.weight"},  # AFM: ReLU^2 MLP without gate
                 {"rope.dimension_count": (lambda d: d.head_dim, U32)}),
        ArchSpec("seed_oss", _ATTN | _QKV_BIAS | _FFN | {"attn_norm.weight", "post_attention_norm.weight"}, _kv_len),
        ArchSpec("xverse", _LLAMA_LAYER),
        ArchSpec("orion", _LLAMA_LAYER | _LN_BIAS, global_tensors=_LN_GLOBALS,
                 norm_eps_key="attention.layer_norm_epsilon"),
        # ChatGLM3 / GLM-4-9B (older conversions): fused QKV with bias, gate+up fused, half-rotary heads
        ArchSpec("chatglm", _NORMS | {"attn_qkv.weight", "attn_qkv.bias", "attn_output.weight", "ffn_up.weight",
                                      "ffn_down.weight"},
                 {"rope.dimension_count": (lambda d: d.head_dim // 2, U32)},
                 shapes={"ffn_up.weight": lambda d: (2 * d.n_ff, d.n_embd)}),
        # OpenELM: per-layer query/KV head counts and FFN widths, per-head q/k norms, tied embeddings
        ArchSpec("openelm", _NORMS | _FFN | {"attn_qkv.weight", "attn_output.weight"} | _QK_NORM, _kv_len,
                 always_tied=True, global_tensors=("token_embd.weight", "output_norm.weight"),
                 fixture={"n_embd_head": 64, "head_counts": [2, 4, 4, 8], "head_counts_kv": [1, 2, 4, 2],
                          "ff_lengths": [256, 512, 768, 512]}),
        ArchSpec("refact", _LLAMA_LAYER),  # llama-shaped with ALiBi
        ArchSpec("codeshell", _GPT_BLOCK, norm_eps_key="attention.layer_norm_epsilon", global_tensors=_LN_GLOBALS),
        # DBRX: fused QKV, a norm between attention and the experts (attn_output_norm), experts in every layer
        ArchSpec("dbrx", _NORMS - {"ffn_norm.weight"} | _EXPERTS
                 | {"attn_qkv.weight", "attn_output.weight", "attn_output_norm.weight"},
                 {"attention.clamp_kqv": (8.0, F32)}, norm_eps_key="attention.layer_norm_epsilon",
                 default_experts=4, fixture={"n_expert": 4, "n_expert_used": 2}),
        ArchSpec("ernie4_5", _LLAMA_LAYER, {"rope.dimension_count": (lambda d: d.head_dim, U32)}),  # dense ERNIE 4.5
        ArchSpec("hunyuan-dense", _LLAMA_LAYER | _QK_NORM, _kv_len),  # Hunyuan 0.5B-7B: per-head q/k norms
        # Hunyuan-A13B: q/k norms, routed experts and a shared expert (no shared-expert gate)
        ArchSpec("hunyuan-moe", _ATTN | _NORMS | _QK_NORM | _EXPERTS | (_SHARED_EXPERT - {"ffn_gate_inp_shexp.weight"}),
                 lambda d: {**_kv_len(d), "expert_feed_forward_length": (d.n_ff, U32, None),
                            "expert_shared_feed_forward_length": (d.n_ff, U32, None)},
                 default_experts=4, fixture={"n_expert": 4, "n_expert_used": 2}),
        # Qwen2-VL's language model: qwen2's layers, multimodal RoPE sections (global, 4 entries)
        ArchSpec("qwen2vl", _LLAMA_LAYER | _QKV_BIAS,
                 {"rope.dimension_sections": (lambda d: [d.head_dim // 8, d.head_dim * 3 // 16,
                                                         d.head_dim * 3 // 16, 0],
                                              GGUFValueType.ARRAY, GGUFValueType.INT32)}),
        # JAIS: GPT-2 blocks with a SwiGLU MLP (gate with bias), ALiBi
        ArchSpec("jais", _GPT_BLOCK | {"ffn_gate.weight", "ffn_gate.bias"}, {"attention.max_alibi_bias": (8.0, F32)},
                 global_tensors=_LN_GLOBALS, norm_eps_key="attention.layer_norm_epsilon"),
        # DeciLM / Llama-Nemotron (NAS): per-layer head counts and FFN widths; a layer may have no
        # attention (0 heads), a linear map instead of attention (0 KV heads) or no FFN (width 0)
        ArchSpec("deci", _LLAMA_LAYER, lambda d: {**_llama_hp(d), **_kv_len(d)},
                 fixture={"n_layer": 6, "n_embd_head": 64, "head_counts": [4, 0, 4, 4, 4, 4],
                          "head_counts_kv": [2, 0, 0, 1, 4, 2], "ff_lengths": [512, 256, 768, 0, 512, 256]}),
    ]
}


def tensor_names(
    arch: str = "llama", n_layer: int = 4, *, tied: bool = False, order: TensorOrder = "natural",
    dims: Dims | None = None,
) -> list[str]:
    """Tensor names in file order.

    ``natural``: token_embd, blk.0 … blk.N-1 (numeric), output_norm, output.
    ``hf``: exactly convert_hf_to_gguf's order for a single-file checkpoint, i.e. sorted by
    HF name (lm_head first, then layers 0, 1, 10, 11, …, 2, …). ``dims`` with per-layer
    head counts / FFN widths leaves out the tensors a layer does not have (DeciLM).
    """
    spec = ARCHS[arch]
    tied = tied or spec.always_tied
    globals_ = [t for t in spec.global_tensors if not (tied and t.startswith("output."))]
    layers = [f"blk.{i}.{t}" for i in range(n_layer) for t in spec.layer_tensors
              if dims is None or _present(dims.layer(i), t)]
    if order == "natural":
        return globals_[:1] + layers + globals_[1:]
    if order != "hf":
        raise ValueError(f"unknown tensor order {order!r}")

    def hf_name(name: str) -> str:
        if name.startswith("blk."):
            return f"model.layers.{name.split('.')[1]}.{spec.hf_name(_suffix(name))}"
        return spec.hf_name(name)

    return sorted(globals_ + layers, key=hf_name)


def _suffix(name: str) -> str:
    """``blk.7.attn_q.weight`` -> ``attn_q.weight``; global tensor names are their own suffix."""
    return name.split(".", 2)[2] if name.startswith("blk.") else name


# --------------------------------------------------------------------------- tokenizer

_WORDS = (
    "the and of to in is it that for you was with on as have be at one this from by not or "
    "but all we can an will my are they hello world model layer token llama merge upscale test "
    "frank cat dog sun day good new time year people way"
).split()
_JAPANESE = "日本語"  # a few CJK pieces as normal tokens; everything else uses byte fallback


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int


def _filler() -> Iterator[str]:
    """Endless supply of plausible SentencePiece pieces used to pad the vocab."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for n in itertools.count(2):
        for combo in itertools.product(letters, repeat=n):
            piece = "".join(combo)
            yield piece
            yield "\u2581" + piece


def build_vocab(n_vocab: int) -> Vocab:
    """A SentencePiece ("llama") vocab: <unk> <s> </s>, 256 bytes, pieces, then 3 control tokens.

    Layout matches Llama-2's (bytes at ids 3..258) so byte fallback tokenizes any UTF-8
    text. Piece scores decrease with id like a real SentencePiece model; every word gets
    all its "▁"-prefixed prefixes so SPM's bigram merging can actually reach it.
    """
    specials = [("<unk>", TokenType.UNKNOWN), ("<s>", TokenType.CONTROL), ("</s>", TokenType.CONTROL)]
    byte_tokens = [(f"<0x{b:02X}>", TokenType.BYTE) for b in range(256)]
    controls_tail = [(t, TokenType.CONTROL) for t in (ENDOFTEXT, IM_START, IM_END)]
    n_pieces = n_vocab - len(specials) - len(byte_tokens) - len(controls_tail)
    if n_pieces < 1:
        raise ValueError(f"n_vocab={n_vocab} too small: need at least {n_vocab - n_pieces + 1}")

    pieces: dict[str, None] = {"\u2581": None}
    pieces.update((chr(c), None) for c in range(33, 127))
    pieces.update((ch, None) for ch in _JAPANESE)
    for word in _WORDS:
        pieces.update(("\u2581" + word[:k], None) for k in range(1, len(word) + 1))
    taken = {t for t, _ in specials + byte_tokens + controls_tail}
    filler = _filler()
    while len(pieces) < n_pieces:
        piece = next(filler)
        if piece not in pieces and piece not in taken:
            pieces[piece] = None
    piece_list = list(pieces)[:n_pieces]

    tokens = [t for t, _ in specials + byte_tokens] + piece_list + [t for t, _ in controls_tail]
    types = (
        [int(tt) for _, tt in specials + byte_tokens]
        + [int(TokenType.NORMAL)] * len(piece_list)
        + [int(tt) for _, tt in controls_tail]
    )
    scores = [0.0] * (len(specials) + len(byte_tokens)) + [-float(i) for i in range(len(piece_list))]
    scores += [0.0] * len(controls_tail)
    assert len(tokens) == len(set(tokens)) == n_vocab  # llama.cpp asserts unique token texts
    return Vocab(tokens=tokens, scores=scores, types=types, bos_id=1, eos_id=2, unk_id=0)


# --------------------------------------------------------------------------- weights


def _rng(seed: int, name: str) -> np.random.Generator:
    """Per-tensor RNG: stable across runs/processes (crc32, not hash()) and distinct per layer."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _weight(name: str, shape: tuple[int, ...], seed: int, *, tied: bool, gain: float = 1.0) -> np.ndarray:
    """float32 weights scaled so activations stay O(1) and logits have std ~2.

    Norms ~1 (+5% noise so duplicated layers are distinguishable), biases ~0.1,
    projections std 1/sqrt(fan_in), output std 2/sqrt(n_embd) → a peaked but far
    from one-hot next-token distribution. A tied model reuses token_embd as output,
    so then its embeddings get the output scale.
    """
    rng = _rng(seed, name)
    x = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(".bias"):
        return 0.1 * x
    if len(shape) == 1:
        return np.float32(gain) * (1.0 + 0.05 * x)
    fan_in = shape[-1]
    if name == "output.weight" or (name == "token_embd.weight" and tied):
        return x * np.float32(2.0 / np.sqrt(fan_in))
    if name == "token_embd.weight":
        return x
    return x * np.float32(1.0 / np.sqrt(fan_in))


def _encode(w: np.ndarray, qtype: GGMLQuantizationType, *, bias: bool = False) -> np.ndarray:
    """F32/F16 as numpy floats; BF16/Q8_0 as raw bytes (bit-exact with ggml's reference code)."""
    if w.ndim == 1 or qtype == GGMLQuantizationType.F32 or bias:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return w.astype(np.float16)
    return quantize(w, qtype)


# --------------------------------------------------------------------------- metadata


def _coerce_kv(key: str, value: Any) -> KV:
    """Normalise an ``extra_kv`` value; plain ints are refused because their GGUF type is ambiguous."""
    if isinstance(value, tuple):
        if len(value) == 2:
            return (value[0], value[1], None)
        if len(value) == 3:
            return value  # type: ignore[return-value]
        raise ValueError(f"{key}: expected (value, GGUFValueType[, sub_type]), got {value!r}")
    if isinstance(value, bool):
        return (value, GGUFValueType.BOOL, None)
    if isinstance(value, str):
        return (value, GGUFValueType.STRING, None)
    if isinstance(value, float):
        return (value, GGUFValueType.FLOAT32, None)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return (value, GGUFValueType.ARRAY, GGUFValueType.STRING)
    raise TypeError(
        f"{key}: give {type(value).__name__} values as (value, GGUFValueType, sub_type) so the GGUF type is explicit"
    )


def _per_layer(values: Sequence[int], scalar: int) -> KV:
    return (list(values), GGUFValueType.ARRAY, GGUFValueType.INT32) if values else (scalar, U32, None)


def _metadata(
    spec: ArchSpec, dims: Dims, *, name: str, dtype: str, n_params: int, vocab: Vocab
) -> dict[str, KV]:
    """Keys in convert_hf_to_gguf's order (exact for llama), with its value types (UINT32 counts)."""
    a = spec.name
    u32, f32, s, b = U32, F32, STR, GGUFValueType.BOOL
    arr = GGUFValueType.ARRAY
    basename = name.replace(" ", "-")
    kv: dict[str, KV] = {
        # general.architecture is written by GGUFWriter itself, first.
        "general.type": ("model", s, None),
        "general.name": (name, s, None),
        "general.basename": (basename, s, None),
        "general.size_label": (size_label(n_params, n_params, 0, 0), s, None),
        "general.license": ("apache-2.0", s, None),
        "general.base_model.count": (1, u32, None),
        "general.base_model.0.name": (f"{name} Base", s, None),
        "general.base_model.0.repo_url": (f"https://huggingface.co/example/{basename}-Base", s, None),
        f"{a}.block_count": (dims.n_layer, u32, None),
        f"{a}.context_length": (CONTEXT_LENGTH, u32, None),
        f"{a}.embedding_length": (dims.n_embd, u32, None),
        # per-layer values as convert writes them (add_array of Python ints: INT32 elements)
        f"{a}.feed_forward_length": _per_layer(dims.ff_lengths, dims.n_ff),
        f"{a}.attention.head_count": _per_layer(dims.head_counts, dims.n_head),
        f"{a}.attention.head_count_kv": _per_layer(dims.head_counts_kv, dims.n_head_kv),
        f"{a}.rope.freq_base": (ROPE_FREQ_BASE, f32, None),
        f"{a}.{spec.norm_eps_key}": (RMS_EPS, f32, None),
        "general.file_type": (int(DTYPES[dtype][1]), u32, None),
        **({f"{a}.attention.key_length": (dims.head_dim, u32, None),
            f"{a}.attention.value_length": (dims.head_dim, u32, None)} if dims.n_embd_head else {}),
        **{f"{a}.{k}": v for k, v in spec.metadata(dims).items()},
        # convert_hf_to_gguf writes this for every output type, F16 included.
        "general.quantization_version": (GGML_QUANT_VERSION, u32, None),
        "tokenizer.ggml.model": ("llama", s, None),
        "tokenizer.ggml.pre": ("default", s, None),
        "tokenizer.ggml.tokens": (vocab.tokens, arr, s),
        "tokenizer.ggml.scores": (vocab.scores, arr, f32),
        "tokenizer.ggml.token_type": (vocab.types, arr, GGUFValueType.INT32),
        "tokenizer.ggml.bos_token_id": (vocab.bos_id, u32, None),
        "tokenizer.ggml.eos_token_id": (vocab.eos_id, u32, None),
        "tokenizer.ggml.unknown_token_id": (vocab.unk_id, u32, None),
        "tokenizer.ggml.add_bos_token": (True, b, None),
        "tokenizer.ggml.add_eos_token": (False, b, None),
        "tokenizer.chat_template": (CHAT_TEMPLATE, s, None),
    }
    return kv


# --------------------------------------------------------------------------- public API


def shard_paths(path: Path | str, n_shards: int) -> list[Path]:
    """File names GGUFWriter / llama.cpp use for a split model (``stem-00001-of-0000N.gguf``)."""
    p = Path(path)
    if n_shards <= 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i:05d}-of-{n_shards:05d}.gguf") for i in range(1, n_shards + 1)]


def make_model(
    path: Path | str,
    *,
    arch: str = "llama",
    n_layer: int = 4,
    n_embd: int = 256,
    n_ff: int = 512,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_vocab: int = 512,
    dtype: str = "F16",
    tied: bool = False,
    seed: int = 0,
    name: str = "Tiny Llama",
    split_max_size: int = 0,
    extra_kv: dict[str, Any] | None = None,
    tensor_order: TensorOrder = "natural",
    n_embd_head: int = 0,
    n_expert: int = 0,
    n_expert_used: int = 2,
    head_counts: Sequence[int] = (),
    head_counts_kv: Sequence[int] = (),
    ff_lengths: Sequence[int] = (),
) -> Path:
    """Write a random but loadable GGUF model and return its path (first shard if split).

    ``dtype`` applies to 2-D weights; 1-D norms are always F32. ``extra_kv`` adds or
    overrides metadata: values are ``(value, GGUFValueType[, sub_type])`` tuples, or plain
    str/float/bool/list[str]; ``None`` deletes a key (to build broken models).
    ``split_max_size`` (bytes) splits via GGUFWriter; if the model fits in one shard a
    single unsplit file is written. ``n_embd_head`` sets a head size other than
    n_embd / n_head (as Gemma's), written as ``attention.key_length``/``value_length``.
    ``n_expert`` > 0 replaces each layer's FFN by Mixtral-style experts (ffn_gate_inp and
    ffn_{gate,up,down}_exps, ``expert_count``/``expert_used_count``); architectures whose
    table entry lists experts themselves get ``n_expert`` (or their default) stacked experts.
    ``n_head_kv`` defaults to 2 (or what the architecture needs). ``head_counts``,
    ``head_counts_kv`` and ``ff_lengths`` give one value per layer (DeciLM), written as
    arrays; a layer with 0 heads / 0 KV heads / FFN width 0 gets no such tensors.
    """
    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; known: {sorted(ARCHS)}")
    if n_head_kv is None:
        n_head_kv = ARCHS[arch].defaults.get("n_head_kv", 2)
    for what, values in (("head_counts", head_counts), ("head_counts_kv", head_counts_kv),
                         ("ff_lengths", ff_lengths)):
        if values and len(values) != n_layer:
            raise ValueError(f"{what} needs one value per layer ({n_layer}), got {len(values)}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; known: {sorted(DTYPES)}")
    if (n_embd % n_head and not n_embd_head) or n_head % n_head_kv:
        raise ValueError("n_embd must be divisible by n_head, and n_head by n_head_kv")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    spec = ARCHS[arch]
    tied = tied or spec.always_tied
    n_expert = n_expert or spec.default_experts
    dims = Dims(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_embd_head,
                n_expert if spec.native_experts else 0, tuple(head_counts), tuple(head_counts_kv), tuple(ff_lengths))
    qtype = DTYPES[dtype][0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    names = tensor_names(arch, n_layer, tied=tied, order=tensor_order, dims=dims)
    shapes = {n: spec.shape(_suffix(n))(dims.layer(int(n.split(".")[1])) if n.startswith("blk.") else dims)
              for n in names}
    if n_expert and not spec.native_experts:
        names, shapes = _moe_layers(names, shapes, dims, n_expert)
    n_params = sum(int(np.prod(s)) for s in shapes.values())

    kv = _metadata(spec, dims, name=name, dtype=dtype, n_params=n_params, vocab=build_vocab(n_vocab))
    if n_expert:
        kv[f"{arch}.expert_count"] = (n_expert, U32, None)
        kv[f"{arch}.expert_used_count"] = (n_expert_used, U32, None)
    for key, value in (extra_kv or {}).items():
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = _coerce_kv(key, value)

    writer = GGUFWriter(path, arch, split_max_size=split_max_size)
    try:
        for key, (value, vtype, sub_type) in kv.items():
            writer.add_key_value(key, value, vtype, sub_type)
        for tname in names:
            gain = spec.norm_gain.get(_suffix(tname), 1.0)
            data = _encode(_weight(tname, shapes[tname], seed, tied=tied, gain=gain), qtype,
                           bias=tname.endswith(".bias"))
            raw = qtype if data.dtype == np.uint8 else None
            writer.add_tensor(tname, data, raw_dtype=raw)
        n_shards = len(writer.tensors)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return shard_paths(path, n_shards)[0]


def _moe_layers(names: list[str], shapes: dict[str, tuple[int, ...]], dims: Dims,
                n_expert: int) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Dense FFN tensors -> router + stacked experts (numpy shapes: experts first)."""
    moe = _DENSE_TO_EXPERTS
    out_names: list[str] = []
    out_shapes: dict[str, tuple[int, ...]] = {}
    for n in names:
        suffix = _suffix(n)
        if not n.startswith("blk.") or suffix not in moe:
            out_names.append(n)
            out_shapes[n] = shapes[n]
            continue
        block = n[: -len(suffix) - 1]
        if suffix == "ffn_down.weight":
            out_names.append(f"{block}.ffn_gate_inp.weight")
            out_shapes[f"{block}.ffn_gate_inp.weight"] = (n_expert, dims.n_embd)
        new = f"{block}.{moe[suffix]}"
        out_names.append(new)
        out_shapes[new] = (n_expert, *shapes[n])
    return out_names, out_shapes


def load_llama(path: Path | str, **kw: Any) -> llama_cpp.Llama:
    """Open a model the way every test compares logits: small ctx, all logits kept, 2 threads,
    weights on plain CPU buffers like every evaluation of the project (upscaler.checks.llama_params)."""
    from upscaler.checks.llama_params import open_llama

    params: dict[str, Any] = dict(n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    params.update(kw)
    return open_llama(path, **params)


def eval_logits(llm: llama_cpp.Llama, tokens: Sequence[int]) -> np.ndarray:
    """Logits for every position, shape [len(tokens), n_vocab], from a fresh KV cache."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)
