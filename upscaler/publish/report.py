"""Human-readable views: the layer-map diagram, plan statistics, and `inspect` summaries."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..planning.plan import OutputLayer, Plan

# The quant types `plan` sizes exactly (llama.cpp decides each tensor's type in a dry run).
PLAN_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")
KV_CTX = 4096
COMPUTE_OVERHEAD = 256 * 1024 * 1024  # llama.cpp's compute buffers at this context, roughly


@dataclass
class PlanStats:
    block_count: int
    n_params: int
    size_as_is: int  # bytes with the source tensor types
    sizes: dict[str, int]  # quant type -> approximate bytes
    kv_cache_bytes: int  # F16 K+V at KV_CTX tokens
    ram: dict[str, int]  # quant type -> approximate bytes to run at KV_CTX

    def to_dict(self) -> dict[str, Any]:
        return {"block_count": self.block_count, "parameters": self.n_params, "size_bytes_as_is": self.size_as_is,
                "size_bytes_by_type": self.sizes, "kv_cache_bytes": self.kv_cache_bytes,
                "context_for_ram": KV_CTX, "ram_bytes_by_type": self.ram}


def plan_stats(plan: Plan, n_params: int, size_as_is: int, sizes: dict[str, int], *, n_head_kv: int,
               head_dim: int) -> PlanStats:
    """`sizes`: exact output bytes per quant type; RAM adds an F16 KV cache at KV_CTX tokens."""
    kv = 2 * plan.block_count * KV_CTX * n_head_kv * head_dim * 2
    ram = {k: v + kv + COMPUTE_OVERHEAD for k, v in sizes.items()}
    return PlanStats(plan.block_count, n_params, size_as_is, sizes, kv, ram)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def runs(layers: list[OutputLayer]) -> list[tuple[int, int, str, int, int, bool]]:
    """Group output layers into runs of consecutive source layers: (out_a, out_b, model, src_a, src_b, scaled)."""
    out: list[tuple[int, int, str, int, int, bool]] = []
    for l in layers:
        scaled = bool(l.scales)
        if out:
            oa, ob, m, sa, sb, sc = out[-1]
            if m == l.model and sb + 1 == l.source_layer and ob + 1 == l.index and sc == scaled:
                out[-1] = (oa, l.index, m, sa, l.source_layer, sc)
                continue
        out.append((l.index, l.index, l.model, l.source_layer, l.source_layer, scaled))
    return out


MAP_PREFIX = 17  # columns before the map: the output-layer range of each row, the row labels


def layer_map(plan: Plan, columns: int = 80) -> str:
    """One row per run of output layers, drawn against the source model's layer axis.

    Every line fits in `columns`: the axis is scaled to the room the row labels leave (at most
    one column per source layer). Bars, ticks and the copies row share one origin
    column, so a bar starts under the tick of its first source layer.
    """
    lines = []
    multi = len(plan.models) > 1
    all_runs = runs(plan.layers)
    notes = [_run_note(sa, sb, scaled) for _, _, _, sa, sb, scaled in all_runs]
    note_w = max((len(n) for n in notes), default=0)
    pad = " " * MAP_PREFIX
    for name, info in plan.models.items():
        n = info.block_count
        tail = max(note_w + 2, len(str(n)))  # room right of the axis: the notes, the last tick label
        width = max(10, min(n, columns - MAP_PREFIX - tail))
        scale = width / n
        ticks = sorted({0, n // 4, n // 2, 3 * n // 4, n})
        tick_line = [" "] * (width + len(str(n)))
        for t in ticks:
            pos = min(int(t * scale), width)
            label = str(t)
            if pos > 0 and tick_line[pos - 1] != " ":  # would touch the previous label
                continue
            for k, ch in enumerate(label):
                if pos + k < len(tick_line):
                    tick_line[pos + k] = ch
        header = "output layers".rjust(MAP_PREFIX - 2) + "  " + ("source " + name if multi else "source layers")
        lines.append(header)
        lines.append(pad + "".join(tick_line).rstrip())
        counts = [0] * n
        for (oa, ob, m, sa, sb, scaled), note in zip(all_runs, notes):
            if m != name:
                continue
            a = min(int(sa * scale), width - 1)
            b = max(int((sb + 1) * scale), a + 1)
            bar = [" "] * width
            for k in range(a, min(b, width)):
                bar[k] = "░" if scaled else "█"
            lines.append(f"{oa:>6}-{ob:<6}".ljust(MAP_PREFIX) + "".join(bar) + f"  {note}")
            for j in range(sa, sb + 1):
                counts[j] += 1
        cov = "".join(_coverage_char(counts, int(k / scale), int((k + 1) / scale)) for k in range(width))
        lines.append("copies".rjust(MAP_PREFIX - 2) + "  " + cov)
    lines.append(pad + "(copies: times each source layer is used)")
    return "\n".join(lines)


def _run_note(sa: int, sb: int, scaled: bool) -> str:
    return f"src {sa}-{sb}" + (" (scaled)" if scaled else "")


def size_table(stats: PlanStats) -> str:
    """Size and RAM per quant type, in a narrow table with its footnote (fits 80 columns)."""
    lines = [f"  {'type':<8} {'file size':>10}   {'RAM to run*':>11}"]
    for t, size in stats.sizes.items():
        lines.append(f"  {t:<8} {human_bytes(size):>10}   {human_bytes(stats.ram[t]):>11}")
    lines.append(f"  * weights + F16 KV cache at {KV_CTX} tokens + ~{human_bytes(COMPUTE_OVERHEAD)} compute buffers")
    return "\n".join(lines)


def _coverage_char(counts: list[int], a: int, b: int) -> str:
    seg = counts[a:max(b, a + 1)]
    c = max(seg) if seg else 0
    return "·" if c == 0 else (str(c) if c < 10 else "+")


def type_counts(types: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(types).items(), key=lambda kv: -kv[1]))
