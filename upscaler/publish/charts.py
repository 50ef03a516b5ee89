"""Charts for people: horizontal bars that fit the terminal, and a PNG through matplotlib.

The terminal chart is plain text (one row per item: label, bar, value), so it reads in a
pipe, a log file or an 80-column terminal alike. Bars use Unicode eighth blocks when the
output can encode them and `#` otherwise. The PNG is optional: matplotlib is the `plot`
extra (`pip install 'gguf-upscale[plot]'`); without it `--plot` is refused with that hint.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UpscaleError

__all__ = ["Bar", "bar_chart", "fit", "save_png"]

_EIGHTHS = " ▏▎▍▌▋▊▉█"
_MIN_BAR = 12  # columns a bar keeps when labels are long: longer labels end in an ellipsis


def fit(text: str, width: int) -> str:
    """`text` in at most `width` columns: a longer one ends in an ellipsis."""
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


@dataclass(frozen=True)
class Bar:
    """One row: `label`, the bar's length from `value`, and `text` printed after it."""

    label: str
    value: float
    text: str = ""


def _can_encode(encoding: str | None, text: str) -> bool:
    try:
        text.encode(encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def bar_chart(bars: Sequence[Bar], *, width: int = 80, floor: float | None = None,
              encoding: str | None = "utf-8") -> list[str]:
    """Rows of `label  bar  text`, no wider than `width` columns (long labels are shortened).

    Bars run from `floor` (default: 0, or the smallest value when some are negative) to the
    largest value; a non-finite value gets no bar and its text only. `encoding` is the output's
    (e.g. ``sys.stdout.encoding``): eighth blocks when it can carry them, ``#`` otherwise.
    """
    if not bars:
        return []
    finite = [b.value for b in bars if math.isfinite(b.value)]
    lo = floor if floor is not None else min(0.0, min(finite, default=0.0))
    hi = max(finite, default=lo)
    text_w = max(len(b.text) for b in bars)
    label_w = min(max(len(b.label) for b in bars), max(4, width - text_w - 4 - _MIN_BAR))
    bar_w = max(4, width - label_w - text_w - 4)
    fancy = _can_encode(encoding, _EIGHTHS)
    out = []
    for b in bars:
        if math.isfinite(b.value) and hi > lo:
            frac = min(1.0, max(0.0, (b.value - lo) / (hi - lo)))
        else:
            frac = 0.0
        if fancy:
            eighths = round(frac * bar_w * 8)
            bar = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
        else:
            bar = "#" * round(frac * bar_w)
        out.append(f"{fit(b.label, label_w):>{label_w}}  {bar:<{bar_w}}  {b.text}".rstrip())
    return out


def save_png(path: str | Path, *, title: str, labels: Sequence[str], series: dict[str, Sequence[float]],
             xlabel: str, ylabel: str, errors: dict[str, Sequence[float]] | None = None,
             hline: tuple[str, float] | None = None, force: bool = False) -> Path:
    """A line/point chart of each series over `labels` (and a labelled horizontal line, e.g. the
    source's value), written atomically as a PNG.

    Refuses an existing file without `force` (nothing a user owns is overwritten).
    """
    from ..format.atomic import atomic_write

    dest = Path(path)
    if dest.exists() and not force:
        raise UpscaleError(f"{dest} exists; pass --force to overwrite it")
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, never opens a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UpscaleError("--plot needs matplotlib: pip install 'gguf-upscale[plot]'") from None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels) + 2), 4.2), dpi=120)
    try:
        xs = list(range(len(labels)))
        for name, ys in series.items():
            err = (errors or {}).get(name)
            ax.errorbar(xs, list(ys), yerr=list(err) if err is not None else None, marker="o", capsize=3,
                        label=name)
        if hline is not None:
            ax.axhline(hline[1], color="grey", linestyle="--", linewidth=1, label=hline[0])
        ax.set_xticks(xs)
        ax.set_xticklabels(list(labels), rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6
                           else "center", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 or hline is not None:
            ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    try:
        return atomic_write(dest, buf.getvalue())
    except OSError as e:
        raise UpscaleError(f"cannot write {dest}: {e.strerror or e}") from None
