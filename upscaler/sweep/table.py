"""A sweep's results for people: the ranked table, a chart in candidate order, the best plan.

Everything fits the width it is given (80 columns at least): the candidate column takes
what the figures leave and long labels end in an ellipsis.
"""

from __future__ import annotations

import math
from typing import Any

from ..publish.charts import Bar, bar_chart, fit, save_png
from ..publish.report import human_bytes
from .runner import CandidateResult, SweepResult, paired_ratio

__all__ = ["best_lines", "chart_lines", "result_line", "save_plot", "table_lines"]


def _ppl(c: CandidateResult) -> str:
    s = c.scores.stats if c.scores else None
    return f"{s.perplexity:.2f} ± {s.perplexity_uncertainty:.2f}" if s else ""


def result_line(c: CandidateResult) -> str:
    """One finished candidate, as the sweep reports it while running."""
    if c.scores is None:
        return f"{c.label}: {c.error}"
    s = c.scores.stats
    return (f"{c.label}: PPL {s.perplexity:.2f}, KL {s.kl_divergence:.4f}, top-1 {s.top1_agreement * 100:.1f}% "
            f"({c.block_count} layers; built in {c.build_seconds:.1f} s, scored in {c.eval_seconds:.1f} s)")


def table_lines(result: SweepResult, width: int = 80) -> list[str]:
    """The source line, then candidates ranked by perplexity (failed ones last, with their error)."""
    ref = result.reference
    out = []
    if ref is not None:
        name = result.source.rsplit("/", 1)[-1]
        out.append(fit(f"source {name}: {ref.n_layer} layers, PPL {ref.perplexity:.2f} ± "
                        f"{ref.perplexity_uncertainty:.2f}", width))
        out.append(fit(f"scored on {ref.n_scored} tokens of {result.text} (context {ref.n_ctx}, "
                        f"{ref.windows_mode} windows)", width))
    ranked = result.ranked()
    if not ranked:
        return out
    rows = []
    for i, c in enumerate(ranked, 1):
        s = c.scores.stats if c.scores else None
        label = c.label + (" (=source)" if c.is_source else "")
        rows.append((str(i) if s else "-", label, str(c.block_count), human_bytes(c.size) if c.size else "",
                     _ppl(c), f"{s.kl_divergence:.4f}" if s else "", f"{s.top1_agreement * 100:.1f}%" if s else ""))
    head = ("#", "candidate", "layers", "size", "PPL", "KL", "top-1")
    fixed = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    others = sum(w for j, w in enumerate(fixed) if j != 1) + 2 * (len(head) - 1)
    fixed[1] = max(9, min(fixed[1], width - others))
    right = {0, 2, 3, 4, 5, 6}

    def line(cells: tuple[str, ...]) -> str:
        parts = [(f"{cell:>{w}}" if j in right else f"{fit(cell, w):<{w}}") for j, (cell, w) in
                 enumerate(zip(cells, fixed))]
        return "  ".join(parts).rstrip()

    out.append("")
    out.append(line(head))
    for c, r in zip(ranked, rows):
        if c.scores is None:
            prefix = line(r[:3] + ("",) * 4).rstrip()
            out.append(fit(f"{prefix}  failed: {c.error}", width))
        else:
            out.append(line(r))
    return out


def chart_lines(result: SweepResult, width: int = 80, encoding: str | None = "utf-8") -> list[str]:
    """Perplexity per candidate in the order given (a family's curve), bars from the source's."""
    scored = [c for c in result.candidates if c.scores]
    if not scored or result.reference is None:
        return []
    base = result.reference.perplexity
    floor = min([base] + [c.perplexity for c in scored])
    bars = [Bar(c.label, c.perplexity if c.scores else math.nan, f"{c.perplexity:.2f}" if c.scores else "failed")
            for c in result.candidates]
    title = f"perplexity by candidate, in the order given (the source: {base:.2f})"
    return [fit(title, width), *bar_chart(bars, width=width, floor=floor * 0.98, encoding=encoding)]


def best_lines(result: SweepResult, width: int = 80) -> list[str]:
    best = result.best
    if best is None or best.scores is None or result.reference is None:
        return []
    s = best.scores.stats
    lines = [fit(f"best: {best.label} ({best.block_count} layers, {human_bytes(best.size or 0)}), "
                  f"PPL {s.perplexity:.2f} ± {s.perplexity_uncertainty:.2f}", width),
             fit(f"  {s.perplexity_ratio:.3f} ± {s.perplexity_ratio_uncertainty:.3f} x the source's perplexity; "
                  f"KL {s.kl_divergence:.4f}, top-1 {s.top1_agreement * 100:.1f}%", width)]
    ranked = [c for c in result.ranked() if c.scores and not c.is_source]
    if len(ranked) > 1 and ranked[1].scores is not None:
        ratio, unc = paired_ratio(best, ranked[1])
        lines.append(fit(f"  vs the runner-up, {ranked[1].label}: PPL ratio {ratio:.4f} ± {unc:.4f}", width))
        lines.append(fit("  (paired over the same tokens, so tighter than the ± in the table)", width))
    return lines


def save_plot(result: SweepResult, path: Any, force: bool = False) -> None:
    """The perplexity of each candidate in the order given, with its uncertainty, as a PNG."""
    cands = [c for c in result.candidates if c.scores]
    if not cands:
        return
    save_png(path, title=f"sweep of {result.source.rsplit('/', 1)[-1]} on {result.text}",
             labels=[c.label for c in cands],
             series={"perplexity": [c.perplexity for c in cands]},
             errors={"perplexity": [c.scores.stats.perplexity_uncertainty for c in cands if c.scores]},
             xlabel="candidate", ylabel="perplexity",
             hline=(f"source {result.reference.perplexity:.2f}", result.reference.perplexity)
             if result.reference else None, force=force)
