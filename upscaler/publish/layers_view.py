"""`layers` for people: the per-layer chart and the least-changing spans, within the terminal's width."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..checks.layer_influence import LayerInfluence
from .charts import Bar, bar_chart, fit, save_png

__all__ = ["layer_lines", "save_layers_plot"]


def layer_lines(r: LayerInfluence, text_label: str, width: int = 80, encoding: str | None = "utf-8") -> list[str]:
    """Header, one bar per layer (its angular distance), then the least-changing span of each length."""
    name = Path(r.path).name
    out = [fit(f"layers: {name} ({r.arch}, {r.n_layer} layers, {r.n_embd} wide)", width),
           fit(f"measured on {r.n_tokens} tokens of {text_label}, in windows of {r.n_ctx}", width),
           fit("angular distance, layer input to output (0: unchanged, 0.5: orthogonal)", width)]
    pl = r.per_layer
    bars = [Bar(str(i), m, f"{m:.4f} ± {u:.4f}") for i, (m, u) in enumerate(zip(pl.mean, pl.uncertainty))]
    out += bar_chart(bars, width=width, floor=0.0, encoding=encoding)
    out.append("")
    out.append(fit("least-changing spans (the cheapest to repeat or drop, by this measure):", width))
    for n, s in sorted(r.spans.items()):
        i = s.least()
        where = f"layer {i}" if n == 1 else f"layers {i}-{i + n - 1}"
        out.append(fit(f"  {n} layer{'s' if n > 1 else ' '}  {where:<14} {s.mean[i]:.4f} ± {s.uncertainty[i]:.4f}",
                        width))
    return out


def save_layers_plot(r: LayerInfluence, path: str | Path, title: str, force: bool = False) -> Path:
    """Distance over the first layer of each span, one line per span length, as a PNG."""
    labels = [str(i) for i in range(r.n_layer)]
    series: dict[str, Sequence[float]] = {}
    errors: dict[str, Sequence[float]] = {}
    for n, s in sorted(r.spans.items()):
        pad = [math.nan] * (r.n_layer - len(s.mean))
        key = "1 layer" if n == 1 else f"{n} layers"
        series[key] = s.mean + pad
        errors[key] = s.uncertainty + pad
    return save_png(path, title=title, labels=labels, series=series, errors=errors,
                    xlabel="first layer of the span", ylabel="angular distance (input to output)", force=force)
