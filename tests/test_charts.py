"""Terminal bar charts fit their width and scale bars by value; the PNG is a real PNG."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from upscaler.errors import UpscaleError
from upscaler.publish.charts import Bar, bar_chart, save_png


def test_bars_fit_the_width_and_scale_with_the_value() -> None:
    bars = [Bar("a", 1.0, "1.0"), Bar("long label", 4.0, "4.0"), Bar("c", 2.0, "2.0 ± 0.1")]
    for width in (40, 80, 120):
        rows = bar_chart(bars, width=width)
        assert len(rows) == 3 and all(len(r) <= width for r in rows)
        lengths = [sum(8 if ch == "█" else 0 for ch in r) for r in rows]
        assert lengths[1] > lengths[2] > lengths[0] > 0
    assert rows[1].split()[-1] == "4.0"


def test_ascii_output_and_non_finite_values() -> None:
    rows = bar_chart([Bar("x", 2.0, "2"), Bar("y", math.nan, "failed")], width=30, encoding="ascii")
    assert rows[0].count("#") > 10 and "#" not in rows[1] and rows[1].endswith("failed")
    assert all(r.isascii() for r in rows)


def test_floor_sets_the_zero_of_the_bars() -> None:
    rows = bar_chart([Bar("a", 10.0), Bar("b", 11.0)], width=30, floor=10.0, encoding="ascii")
    assert "#" not in rows[0] and rows[1].count("#") > 15


def test_png_is_written_and_never_overwritten_without_force(tmp_path: Path) -> None:
    dest = tmp_path / "chart.png"
    save_png(dest, title="t", labels=["a", "b"], series={"ppl": [1.0, 2.0]}, errors={"ppl": [0.1, 0.2]},
             xlabel="x", ylabel="y")
    assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UpscaleError, match="exists"):
        save_png(dest, title="t", labels=["a"], series={"ppl": [1.0]}, xlabel="x", ylabel="y")
    save_png(dest, title="t", labels=["a"], series={"ppl": [1.0]}, xlabel="x", ylabel="y", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]


def test_long_labels_are_shortened_to_fit() -> None:
    bars = [Bar("a" * 100, 1.0, "1.00"), Bar("short", 2.0, "2.00")]
    lines = bar_chart(bars, width=40, encoding="ascii")
    assert all(len(line) <= 40 for line in lines), lines
    assert lines[0].lstrip().startswith("a" * 10) and "…" in lines[0]
    assert "#" * 10 in lines[1]
