"""Named recipes that scale to any depth: `--preset NAME[:key=value,...]`.

Each preset is a function of the source block count that returns ordinary mergekit slices,
so presets print, record and verify exactly like hand-written YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RecipeError
from . import archs
from .recipe import MergeConfig, Recipe, normalize_config

# What writes into the residual stream: attention output and FFN down projection, named as the
# HF checkpoint names them (mergekit's filters see HF names only). Llama-shaped families and
# mergekit 0.1.5's stacked experts (mlp.experts.down_proj) are reached by o_proj / down_proj;
# experts.w2 is Mixtral's older name. Families whose HF names differ (Falcon's
# self_attention.dense, GPT-2's c_proj, InternLM2's wo/w2, ...) add their own names.
RESIDUAL_FILTERS = ("o_proj", "down_proj", "experts.w2")
RESIDUAL_KINDS = ("attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp")


def zero_out_residual(arch: str | None = None) -> dict[str, Any]:
    """Scale rules that zero every tensor writing into the residual stream of `arch`'s blocks."""
    names = list(RESIDUAL_FILTERS)
    for kind in RESIDUAL_KINDS:
        hf = archs.hf_name(arch, kind)
        if hf and not any(f in hf for f in names):
            names.append(hf)
    return {"scale": [*({"filter": f, "value": 0.0} for f in names), {"value": 1.0}]}


def _overlap_halves(n: int, opts: dict[str, int], arch: str | None = None) -> list[tuple[int, int]]:
    """The seed recipe: [0, n/2] + [n/4, 3n/4] + [n/2, n]; 80 layers -> 120 (karakuri 70B -> 103B)."""
    if n < 4:
        raise RecipeError(f"preset overlap-halves needs at least 4 layers, the model has {n}")
    half, quarter = n // 2, n // 4
    return [(0, half), (quarter, quarter + half), (n - half, n)]


def _solar(n: int, opts: dict[str, int], arch: str | None = None) -> list[tuple[int, int]]:
    """SOLAR depth up-scaling: two copies, the first without its last m layers, the second without its first m."""
    m = opts.get("drop", n // 4)
    if not 0 < m < n:
        raise RecipeError(f"preset solar: drop={m} must be between 1 and {n - 1}")
    return [(0, n - m), (m, n)]


def _llama_pro(n: int, opts: dict[str, int], arch: str | None = None) -> list[Any]:
    """LLaMA-Pro block expansion: after every k layers, a copy of the last one whose o_proj and
    down_proj are zero, so the new block is an identity map until it is trained."""
    k = opts.get("every", max(1, n // 8))
    if not 0 < k <= n:
        raise RecipeError(f"preset llama-pro: every={k} must be between 1 and {n}")
    out: list[Any] = []
    for start in range(0, n, k):
        end = min(start + k, n)
        out.append((start, end))
        out.append(((end - 1, end), zero_out_residual(arch)))
    return out


@dataclass(frozen=True)
class Preset:
    name: str
    build: Callable[[int, dict[str, int], str | None], list[Any]]  # (depth, options, architecture)
    options: tuple[str, ...]
    summary: str


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("overlap-halves", _overlap_halves, (), "seed recipe: [0,n/2]+[n/4,3n/4]+[n/2,n], 1.5x depth (70B -> "
                                                      "103B)"),
        Preset("solar", _solar, ("drop",), "SOLAR depth up-scaling: [0,n-m]+[m,n], m=n/4 by default (drop=M)"),
        Preset("llama-pro", _llama_pro, ("every",),
               "LLaMA-Pro block expansion: a zero-residual copy after every k=n/8 layers (every=K)"),
    )
}


def parse_preset(spec: str) -> tuple[Preset, dict[str, int]]:
    name, _, rest = spec.partition(":")
    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        raise RecipeError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    opts: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or key not in preset.options:
            allowed = ", ".join(f"{o}=N" for o in preset.options) or "no options"
            raise RecipeError(f"preset {preset.name}: bad option {item!r} ({allowed})")
        try:
            opts[key] = int(val)
        except ValueError:
            raise RecipeError(f"preset {preset.name}: option {key} takes a whole number, got {val!r}") from None
    return preset, opts


def preset_recipe(spec: str, n_layers: int, model: str = "source", arch: str | None = None) -> Recipe:
    """Expand a preset for a model with `n_layers` blocks into a normalized recipe."""
    preset, opts = parse_preset(spec)
    slices = []
    for item in preset.build(n_layers, opts, arch):
        params = None
        if isinstance(item[0], tuple):
            item, params = item
        src: dict[str, Any] = {"model": model, "layer_range": list(item)}
        if params:
            src["parameters"] = params
        slices.append({"sources": [src]})
    cfg = MergeConfig.model_validate({"merge_method": "passthrough", "slices": slices})
    return normalize_config(cfg, f"--preset {spec}")
