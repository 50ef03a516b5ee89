"""llama-quantize's type names (`--type Q4_K_M`) and what each one means.

The table is QUANT_OPTIONS of tools/quantize/quantize.cpp (llama-cpp-python 0.3.36's
llama.cpp), in its order, so names, aliases and numeric ftypes parse exactly as they do for
`llama-quantize`. Per-tensor decisions (mixtures, fallbacks) are not here: they come from
llama.cpp itself, see `llama_quant.target_types`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

from ..errors import QuantizeError


@dataclass(frozen=True)
class QuantType:
    """One llama-quantize type: its name, llama_ftype value and quantize.cpp's description."""

    name: str
    ftype: int
    description: str

    @property
    def only_copy(self) -> bool:
        """COPY re-writes tensors unchanged (llama_model_quantize_params.only_copy)."""
        return self.name == "COPY"

    @property
    def default_type(self) -> int:
        """The ggml type most tensors get (llama_ftype_get_default_type)."""
        return FTYPE_DEFAULT_TYPE[self.ftype]

    @property
    def needs_imatrix(self) -> bool:
        """llama.cpp refuses this type without an importance matrix (see FTYPES_NEEDING_IMATRIX)."""
        return self.ftype in FTYPES_NEEDING_IMATRIX and not self.only_copy


# llama_ftype values (include/llama.h), as gguf-py names them (plain ints: they are written as UINT32).
ALL_F32 = int(F.ALL_F32)
MOSTLY_F16 = int(F.MOSTLY_F16)
MOSTLY_Q4_0 = int(F.MOSTLY_Q4_0)
MOSTLY_Q4_1 = int(F.MOSTLY_Q4_1)
MOSTLY_Q8_0 = int(F.MOSTLY_Q8_0)
MOSTLY_Q5_0 = int(F.MOSTLY_Q5_0)
MOSTLY_Q5_1 = int(F.MOSTLY_Q5_1)
MOSTLY_Q2_K = int(F.MOSTLY_Q2_K)
MOSTLY_Q3_K_S = int(F.MOSTLY_Q3_K_S)
MOSTLY_Q3_K_M = int(F.MOSTLY_Q3_K_M)
MOSTLY_Q3_K_L = int(F.MOSTLY_Q3_K_L)
MOSTLY_Q4_K_S = int(F.MOSTLY_Q4_K_S)
MOSTLY_Q4_K_M = int(F.MOSTLY_Q4_K_M)
MOSTLY_Q5_K_S = int(F.MOSTLY_Q5_K_S)
MOSTLY_Q5_K_M = int(F.MOSTLY_Q5_K_M)
MOSTLY_Q6_K = int(F.MOSTLY_Q6_K)
MOSTLY_IQ2_XXS = int(F.MOSTLY_IQ2_XXS)
MOSTLY_IQ2_XS = int(F.MOSTLY_IQ2_XS)
MOSTLY_Q2_K_S = int(F.MOSTLY_Q2_K_S)
MOSTLY_IQ3_XS = int(F.MOSTLY_IQ3_XS)
MOSTLY_IQ3_XXS = int(F.MOSTLY_IQ3_XXS)
MOSTLY_IQ1_S = int(F.MOSTLY_IQ1_S)
MOSTLY_IQ4_NL = int(F.MOSTLY_IQ4_NL)
MOSTLY_IQ3_S = int(F.MOSTLY_IQ3_S)
MOSTLY_IQ3_M = int(F.MOSTLY_IQ3_M)
MOSTLY_IQ2_S = int(F.MOSTLY_IQ2_S)
MOSTLY_IQ2_M = int(F.MOSTLY_IQ2_M)
MOSTLY_IQ4_XS = int(F.MOSTLY_IQ4_XS)
MOSTLY_IQ1_M = int(F.MOSTLY_IQ1_M)
MOSTLY_BF16 = int(F.MOSTLY_BF16)
MOSTLY_TQ1_0 = int(F.MOSTLY_TQ1_0)
MOSTLY_TQ2_0 = int(F.MOSTLY_TQ2_0)
MOSTLY_MXFP4_MOE = int(F.MOSTLY_MXFP4_MOE)
MOSTLY_Q1_0 = int(F.MOSTLY_Q1_0)
MOSTLY_Q2_0 = 41  # newer than gguf-py 0.19's LlamaFileType

QUANT_TYPES: tuple[QuantType, ...] = (
    QuantType("Q1_0", MOSTLY_Q1_0, " 1.125 bpw quantization"),
    QuantType("Q2_0", MOSTLY_Q2_0, " 2.25 bpw quantization (group 64)"),
    QuantType("Q4_0", MOSTLY_Q4_0, " 4.34G, +0.4685 ppl @ Llama-3-8B"),
    QuantType("Q4_1", MOSTLY_Q4_1, " 4.78G, +0.4511 ppl @ Llama-3-8B"),
    QuantType("MXFP4_MOE", MOSTLY_MXFP4_MOE, " MXFP4 MoE"),
    QuantType("Q5_0", MOSTLY_Q5_0, " 5.21G, +0.1316 ppl @ Llama-3-8B"),
    QuantType("Q5_1", MOSTLY_Q5_1, " 5.65G, +0.1062 ppl @ Llama-3-8B"),
    QuantType("IQ2_XXS", MOSTLY_IQ2_XXS, " 2.06 bpw quantization"),
    QuantType("IQ2_XS", MOSTLY_IQ2_XS, " 2.31 bpw quantization"),
    QuantType("IQ2_S", MOSTLY_IQ2_S, " 2.5  bpw quantization"),
    QuantType("IQ2_M", MOSTLY_IQ2_M, " 2.7  bpw quantization"),
    QuantType("IQ1_S", MOSTLY_IQ1_S, " 1.56 bpw quantization"),
    QuantType("IQ1_M", MOSTLY_IQ1_M, " 1.75 bpw quantization"),
    QuantType("TQ1_0", MOSTLY_TQ1_0, " 1.69 bpw ternarization"),
    QuantType("TQ2_0", MOSTLY_TQ2_0, " 2.06 bpw ternarization"),
    QuantType("Q2_K", MOSTLY_Q2_K, " 2.96G, +3.5199 ppl @ Llama-3-8B"),
    QuantType("Q2_K_S", MOSTLY_Q2_K_S, " 2.96G, +3.1836 ppl @ Llama-3-8B"),
    QuantType("IQ3_XXS", MOSTLY_IQ3_XXS, " 3.06 bpw quantization"),
    QuantType("IQ3_S", MOSTLY_IQ3_S, " 3.44 bpw quantization"),
    QuantType("IQ3_M", MOSTLY_IQ3_M, " 3.66 bpw quantization mix"),
    QuantType("Q3_K", MOSTLY_Q3_K_M, "alias for Q3_K_M"),
    QuantType("IQ3_XS", MOSTLY_IQ3_XS, " 3.3 bpw quantization"),
    QuantType("Q3_K_S", MOSTLY_Q3_K_S, " 3.41G, +1.6321 ppl @ Llama-3-8B"),
    QuantType("Q3_K_M", MOSTLY_Q3_K_M, " 3.74G, +0.6569 ppl @ Llama-3-8B"),
    QuantType("Q3_K_L", MOSTLY_Q3_K_L, " 4.03G, +0.5562 ppl @ Llama-3-8B"),
    QuantType("IQ4_NL", MOSTLY_IQ4_NL, " 4.50 bpw non-linear quantization"),
    QuantType("IQ4_XS", MOSTLY_IQ4_XS, " 4.25 bpw non-linear quantization"),
    QuantType("Q4_K", MOSTLY_Q4_K_M, "alias for Q4_K_M"),
    QuantType("Q4_K_S", MOSTLY_Q4_K_S, " 4.37G, +0.2689 ppl @ Llama-3-8B"),
    QuantType("Q4_K_M", MOSTLY_Q4_K_M, " 4.58G, +0.1754 ppl @ Llama-3-8B"),
    QuantType("Q5_K", MOSTLY_Q5_K_M, "alias for Q5_K_M"),
    QuantType("Q5_K_S", MOSTLY_Q5_K_S, " 5.21G, +0.1049 ppl @ Llama-3-8B"),
    QuantType("Q5_K_M", MOSTLY_Q5_K_M, " 5.33G, +0.0569 ppl @ Llama-3-8B"),
    QuantType("Q6_K", MOSTLY_Q6_K, " 6.14G, +0.0217 ppl @ Llama-3-8B"),
    QuantType("Q8_0", MOSTLY_Q8_0, " 7.96G, +0.0026 ppl @ Llama-3-8B"),
    QuantType("F16", MOSTLY_F16, "14.00G, +0.0020 ppl @ Mistral-7B"),
    QuantType("BF16", MOSTLY_BF16, "14.00G, -0.0050 ppl @ Mistral-7B"),
    QuantType("F32", ALL_F32, "26.00G              @ 7B"),
    # quantize.cpp: COPY comes after F32 so that ftype 0 finds F32.
    QuantType("COPY", ALL_F32, "only copy tensors, no quantizing"),
)

# llama_ftype_get_default_type (src/llama-quant.cpp); ggml type ids from ggml.h.
FTYPE_DEFAULT_TYPE: dict[int, int] = {
    MOSTLY_Q4_0: 2, MOSTLY_Q4_1: 3, MOSTLY_Q5_0: 6, MOSTLY_Q5_1: 7, MOSTLY_Q8_0: 8,
    MOSTLY_F16: 1, MOSTLY_BF16: 30, ALL_F32: 0, MOSTLY_Q1_0: 41, MOSTLY_Q2_0: 42,
    MOSTLY_MXFP4_MOE: 39,
    MOSTLY_Q2_K_S: 10, MOSTLY_Q2_K: 10, MOSTLY_IQ3_XS: 21,
    MOSTLY_Q3_K_S: 11, MOSTLY_Q3_K_M: 11, MOSTLY_Q3_K_L: 11,
    MOSTLY_Q4_K_S: 12, MOSTLY_Q4_K_M: 12, MOSTLY_Q5_K_S: 13, MOSTLY_Q5_K_M: 13, MOSTLY_Q6_K: 14,
    MOSTLY_TQ1_0: 34, MOSTLY_TQ2_0: 35,
    MOSTLY_IQ2_XXS: 16, MOSTLY_IQ2_XS: 17, MOSTLY_IQ2_S: 17, MOSTLY_IQ2_M: 22,
    MOSTLY_IQ3_XXS: 18, MOSTLY_IQ1_S: 19, MOSTLY_IQ1_M: 29,
    MOSTLY_IQ4_NL: 20, MOSTLY_IQ4_XS: 23, MOSTLY_IQ3_S: 21, MOSTLY_IQ3_M: 21,
}

# quantize.cpp no longer decides this itself: llama-quant.cpp refuses to write any tensor
# (token_embd/output excepted) whose chosen type is IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS,
# or Q2_K inside a Q2_K_S file, without an imatrix. These ftypes choose such types for the
# ordinary layer tensors of every model (IQ3_XS: attn_q/attn_k become IQ3_XXS).
# tests/test_llama_quant.py checks the set against llama.cpp's dry run for every type.
FTYPES_NEEDING_IMATRIX: frozenset[int] = frozenset({
    MOSTLY_IQ1_S, MOSTLY_IQ1_M, MOSTLY_IQ2_XXS, MOSTLY_IQ2_XS, MOSTLY_IQ2_S, MOSTLY_IQ2_M,
    MOSTLY_IQ3_XXS, MOSTLY_IQ3_XS, MOSTLY_Q2_K_S,
})

# ggml tensor types (ggml_type ids) that llama.cpp only quantizes with an importance matrix
# (llama-quant.cpp tensor_requires_imatrix; Q2_K also, but only inside a Q2_K_S file):
# IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ2_S, IQ1_M.
TENSOR_TYPES_NEEDING_IMATRIX: frozenset[int] = frozenset(int(t) for t in (
    Q.IQ2_XXS, Q.IQ2_XS, Q.IQ3_XXS, Q.IQ1_S, Q.IQ2_S, Q.IQ1_M))

_GIB_PER_LLAMA3_8B = 2**30 * 8 / 8.03e9  # GiB of a Llama-3-8B file -> bits per weight

# Typical bits per weight of a whole file, for size estimates when the exact mixture is not
# computed (llama_quant.target_types gives exact sizes). Sources: quantize.cpp's descriptions
# (bpw as stated, or Llama-3-8B file sizes in GiB over its 8.03e9 weights); MXFP4_MOE and the
# float types from their ggml block sizes. Small-vocab and upscaled models land close to these.
APPROX_BPW: dict[str, float] = {
    "Q1_0": 1.125, "Q2_0": 2.25, "MXFP4_MOE": 4.25,
    "IQ2_XXS": 2.06, "IQ2_XS": 2.31, "IQ2_S": 2.5, "IQ2_M": 2.7, "IQ1_S": 1.56, "IQ1_M": 1.75,
    "TQ1_0": 1.69, "TQ2_0": 2.06, "IQ3_XXS": 3.06, "IQ3_S": 3.44, "IQ3_M": 3.66, "IQ3_XS": 3.3,
    "IQ4_NL": 4.50, "IQ4_XS": 4.25,
    **{name: round(gib * _GIB_PER_LLAMA3_8B, 2) for name, gib in {
        "Q4_0": 4.34, "Q4_1": 4.78, "Q5_0": 5.21, "Q5_1": 5.65, "Q2_K": 2.96, "Q2_K_S": 2.96,
        "Q3_K_S": 3.41, "Q3_K_M": 3.74, "Q3_K_L": 4.03, "Q4_K_S": 4.37, "Q4_K_M": 4.58,
        "Q5_K_S": 5.21, "Q5_K_M": 5.33, "Q6_K": 6.14, "Q8_0": 7.96}.items()},
    "F16": 16.0, "BF16": 16.0, "F32": 32.0,
}


def quant_type_names() -> list[str]:
    """Every accepted name, in quantize.cpp's order."""
    return [q.name for q in QUANT_TYPES]


def parse_quant_type(value: str | int | QuantType) -> QuantType:
    """`q4_k_m`, `Q4_K_M` or llama-quantize's numeric ftype (`15`) -> QuantType, like try_parse_ftype."""
    if isinstance(value, QuantType):
        return value
    text = str(value).strip()
    for q in QUANT_TYPES:
        if q.name.upper() == text.upper():
            return q
    if text.lstrip("+-").isdigit():
        for q in QUANT_TYPES:
            if q.ftype == int(text):
                return q
    raise QuantizeError(f"unknown quantization type {str(value)!r}; valid types: {', '.join(quant_type_names())}")


def approx_bits_per_weight(name: str | QuantType) -> float:
    """Typical bits per weight of a file of this type (see APPROX_BPW); COPY keeps the source size."""
    q = parse_quant_type(name)
    if q.only_copy:
        raise QuantizeError("COPY keeps every tensor's type, so its size is the source's")
    # aliases share their target's numbers
    canonical = next(o.name for o in QUANT_TYPES if o.ftype == q.ftype and "alias" not in o.description)
    return APPROX_BPW[canonical]
