"""Tiny, deterministic GGUF models that llama.cpp really loads and runs.

Every test in the project builds its fixtures here, so the files imitate what
``convert_hf_to_gguf.py`` writes for a Llama (tensor names, metadata keys and
their GGUF value types, a SentencePiece vocab with byte fallback) while staying
a few MB in size.

Architectures are described by a table (:data:`ARCHS`): per-layer tensors with
shape rules plus the hparams llama.cpp requires. ``llama`` mirrors convert's
output exactly; qwen2, qwen3, gemma2, gemma3, phi3, command-r, granite, cohere2, mistral3 and smollm3 carry
the tensors and keys their llama.cpp loaders need (all load and run). Adding an
architecture means adding an :class:`ArchSpec` entry and a load test.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
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

    @property
    def head_dim(self) -> int:
        return self.n_embd_head or self.n_embd // self.n_head


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
}

# GGUF name -> HF name as read by convert_hf_to_gguf (per-arch overrides allowed).
_HF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
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


@dataclass(frozen=True)
class ArchSpec:
    """What one architecture needs: its per-layer tensors, tying rule and extra hparams.

    ``hparams`` returns arch-specific keys *without* the ``{arch}.`` prefix; they are
    written after ``general.file_type`` (where convert_hf_to_gguf puts LlamaModel's).
    """

    name: str
    layer_suffixes: frozenset[str]
    hparams: Callable[[Dims], dict[str, KV]] = _no_hparams
    always_tied: bool = False  # the loader has no output.weight slot at all
    norm_eps_key: str = "attention.layer_norm_rms_epsilon"
    shapes: dict[str, ShapeFn] = field(default_factory=dict)
    hf_names: dict[str, str] = field(default_factory=dict)
    norm_gain: dict[str, float] = field(default_factory=dict)  # init scale of some norm weights
    default_experts: int = 0  # MoE-only architectures: experts when make_model is given none

    def shape(self, suffix: str) -> ShapeFn:
        return self.shapes.get(suffix) or _SHAPES[suffix]

    def hf_name(self, suffix: str) -> str:
        return self.hf_names.get(suffix) or _HF_NAMES[suffix]

    @property
    def layer_tensors(self) -> tuple[str, ...]:
        """Per-layer order == alphabetical HF order (safetensors keys are sorted), as convert writes."""
        return tuple(sorted(self.layer_suffixes, key=self.hf_name))


_LLAMA_LAYER = frozenset({
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
})
_QK_NORM = frozenset({"attn_q_norm.weight", "attn_k_norm.weight"})
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
                 _gemma3_hp, hf_names=_GEMMA_HF, norm_gain=_GEMMA_GAIN),
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
        ArchSpec("smollm3", _LLAMA_LAYER),  # llama.cpp: every 4th layer without RoPE (hard-coded)
        # Gemma (1): llama's layers, always tied, embeddings scaled by sqrt(n_embd), norms stored as 1 + w
        ArchSpec("gemma", _LLAMA_LAYER, _kv_len, always_tied=True,
                 norm_gain={"attn_norm.weight": GEMMA1_GAIN, "ffn_norm.weight": GEMMA1_GAIN}),
        # Qwen3 MoE: qwen3's layers, FFN replaced by a router and stacked experts (make_model n_expert > 0)
        ArchSpec("qwen3moe", _LLAMA_LAYER | _QK_NORM,
                 lambda d: {**_kv_len(d), "expert_feed_forward_length": (d.n_ff, U32, None)}, default_experts=4),
    ]
}


def tensor_names(
    arch: str = "llama", n_layer: int = 4, *, tied: bool = False, order: TensorOrder = "natural"
) -> list[str]:
    """Tensor names in file order.

    ``natural``: token_embd, blk.0 … blk.N-1 (numeric), output_norm, output.
    ``hf``: exactly convert_hf_to_gguf's order for a single-file checkpoint, i.e. sorted by
    HF name (lm_head first, then layers 0, 1, 10, 11, …, 2, …).
    """
    spec = ARCHS[arch]
    tied = tied or spec.always_tied
    globals_ = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    layers = [f"blk.{i}.{t}" for i in range(n_layer) for t in spec.layer_tensors]
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


def _encode(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """F32/F16 as numpy floats; BF16/Q8_0 as raw bytes (bit-exact with ggml's reference code)."""
    if w.ndim == 1 or qtype == GGMLQuantizationType.F32:
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
        f"{a}.feed_forward_length": (dims.n_ff, u32, None),
        f"{a}.attention.head_count": (dims.n_head, u32, None),
        f"{a}.attention.head_count_kv": (dims.n_head_kv, u32, None),
        f"{a}.rope.freq_base": (ROPE_FREQ_BASE, f32, None),
        f"{a}.{spec.norm_eps_key}": (RMS_EPS, f32, None),
        "general.file_type": (int(DTYPES[dtype][1]), u32, None),
        **({f"{a}.attention.key_length": (dims.head_dim, u32, None),
            f"{a}.attention.value_length": (dims.head_dim, u32, None)} if dims.n_embd_head else {}),
        **{f"{a}.{k}": v for k, v in spec.hparams(dims).items()},
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
    n_head_kv: int = 2,
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
) -> Path:
    """Write a random but loadable GGUF model and return its path (first shard if split).

    ``dtype`` applies to 2-D weights; 1-D norms are always F32. ``extra_kv`` adds or
    overrides metadata: values are ``(value, GGUFValueType[, sub_type])`` tuples, or plain
    str/float/bool/list[str]; ``None`` deletes a key (to build broken models).
    ``split_max_size`` (bytes) splits via GGUFWriter; if the model fits in one shard a
    single unsplit file is written. ``n_embd_head`` sets a head size other than
    n_embd / n_head (as Gemma's), written as ``attention.key_length``/``value_length``.
    ``n_expert`` > 0 replaces each layer's FFN by Mixtral-style experts (ffn_gate_inp and
    ffn_{gate,up,down}_exps, ``expert_count``/``expert_used_count``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; known: {sorted(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; known: {sorted(DTYPES)}")
    if (n_embd % n_head and not n_embd_head) or n_head % n_head_kv:
        raise ValueError("n_embd must be divisible by n_head, and n_head by n_head_kv")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    spec = ARCHS[arch]
    tied = tied or spec.always_tied
    n_expert = n_expert or spec.default_experts
    dims = Dims(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_embd_head)
    qtype = DTYPES[dtype][0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    names = tensor_names(arch, n_layer, tied=tied, order=tensor_order)
    shapes = {n: spec.shape(_suffix(n))(dims) for n in names}
    if n_expert:
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
            data = _encode(_weight(tname, shapes[tname], seed, tied=tied, gain=gain), qtype)
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
    moe = {"ffn_gate.weight": "ffn_gate_exps.weight", "ffn_up.weight": "ffn_up_exps.weight",
           "ffn_down.weight": "ffn_down_exps.weight"}
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
    """Open a model the way every test compares logits: small ctx, all logits kept, 2 threads."""
    import llama_cpp

    params: dict[str, Any] = dict(n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    params.update(kw)
    return llama_cpp.Llama(model_path=str(path), **params)


def eval_logits(llm: llama_cpp.Llama, tokens: Sequence[int]) -> np.ndarray:
    """Logits for every position, shape [len(tokens), n_vocab], from a fresh KV cache."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)
