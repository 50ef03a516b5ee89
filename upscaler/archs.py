"""What we know about each architecture's per-layer metadata, from llama.cpp's loader.

A frankenmerge moves layers, so any hyper-parameter that llama.cpp reads *per layer* must
move with them, and any that it derives from a layer's *position* changes meaning. This table
says, per architecture, which is which; everything not listed is refused with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Keys (after "{arch}.") that llama.cpp reads with get_key_or_arr / get_arr over n_layer:
# a scalar applies to every layer, an array is one value per layer and is re-indexed with them.
PER_LAYER_KEYS = (
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "expert_used_count",
    "expert_feed_forward_length",
    "attention.sliding_window_pattern",
    "attention.recurrent_layers",
    "attention.indexer_types",
    "attention.compress_ratios",
    "swiglu_clamp_exp",
    "swiglu_clamp_shexp",
)

# Keys whose meaning depends on layer positions; an upscale that moves layers cannot keep them
# unless the architecture lets us re-express them per layer (see Arch.swa_default).
POSITIONAL_KEYS = (
    "attention.sliding_window_pattern",  # scalar form: every n-th layer is full attention
    "full_attention_interval",
    "leading_dense_block_count",
    "nextn_predict_layers",
    "no_rope_layer_step",
    "interleave_moe_layer_step",
    "dense_block_count",
)


@dataclass(frozen=True)
class Arch:
    name: str
    # llama.cpp's default sliding-window pattern for this arch (load_swa_pattern(ml, n, dense_first));
    # None means the arch has no sliding-window layers.
    swa_default: int | None = None
    swa_dense_first: bool = False
    note: str = ""
    tied_ok: bool = True
    extra_positional: tuple[str, ...] = field(default_factory=tuple)


SUPPORTED: dict[str, Arch] = {
    a.name: a for a in (
        Arch("llama", note="Llama 1/2/3, Mistral, Yi, Karakuri and other llama-shaped models"),
        Arch("qwen2"),
        Arch("qwen3"),
    )
}

REFUSED: dict[str, str] = {
    "llama4": "interleaved no-RoPE and MoE layers are fixed by position (every 4th layer)",
    "deepseek2": "leading dense blocks and MLA layers are positional",
    "qwen3next": "recurrent/attention layer kinds are positional",
    "mamba": "state-space layers: stacking them is not a passthrough merge llama.cpp can express",
}


def lookup(arch: str) -> Arch | None:
    return SUPPORTED.get(arch)


def refusal(arch: str) -> str:
    reason = REFUSED.get(arch, "not yet supported by gguf-upscale")
    return (f"architecture {arch!r} is not supported: {reason} "
            f"(supported: {', '.join(sorted(SUPPORTED))})")
