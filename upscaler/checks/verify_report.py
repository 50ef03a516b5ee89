"""What `verify` found (VerifyReport) and how it reads at a terminal (format_report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..publish.report import human_bytes

MAX_PROBLEMS = 50  # problems kept in the report; the rest are counted


# --------------------------------------------------------------------------- the report


@dataclass
class VerifyReport:
    """What `verify` found. `ok` is False when anything disagrees; `problems` has one line each."""

    path: str
    files: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # model name -> path; empty: checked without sources
    quantized: bool | None = None  # None: not known (no sources to compare types with)
    problems: list[str] = field(default_factory=list)
    problems_total: int = 0
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("tensors", "bytes", "exact", "copy", "zero", "scale", "quantize", "duplicates", "values_only",
         "not_verified", "metadata_keys", "layers"), 0))

    @property
    def ok(self) -> bool:
        return self.problems_total == 0

    @property
    def problems_not_shown(self) -> int:
        return self.problems_total - len(self.problems)

    @property
    def mode(self) -> str:
        return "sources" if self.sources else "no-sources"

    def problem(self, msg: str) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(msg)

    @property
    def full(self) -> bool:
        """Enough problems shown: skip the costly byte-locating for further ones."""
        return len(self.problems) >= MAX_PROBLEMS

    def count(self, key: str, n: int = 1) -> None:
        self.checked[key] = self.checked.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "path": self.path, "files": self.files, "mode": self.mode, "sources": self.sources,
                "quantized": self.quantized, "problems": self.problems,
                "problems_not_shown": self.problems_not_shown, "notes": self.notes, "checked": self.checked}


def format_report(report: VerifyReport) -> str:
    """Human-readable report: problems one per line, then what was checked."""
    c = report.checked
    lines = [f"  {p}" for p in report.problems]
    if report.problems_not_shown:
        lines.append(f"  ... and {report.problems_not_shown} more")
    lines += [f"note: {n}" for n in report.notes]
    files = f" ({len(report.files)} shards)" if len(report.files) > 1 else ""
    if report.sources:
        against = "against " + ", ".join(report.sources.values())
        ops = ", ".join(f"{c[k]} {k}" for k in ("copy", "zero", "scale", "quantize") if c[k])
        what = f"{c['exact']} of {c['tensors']} tensors recomputed byte-for-byte ({ops})"
        if c["not_verified"]:
            what += f", {c['not_verified']} not recomputable ({c['duplicates']} of them equal to their copies)"
        what += f"; {c['metadata_keys']} metadata keys"
    else:
        against = "without sources"
        what = (f"{c['tensors']} tensors: {c['exact']} zero-scaled checked, {c['duplicates']} equal to their "
                f"duplicated copies, {c['values_only']} checked for valid values only")
    status = "ok" if report.ok else f"{report.problems_total} problem(s)"
    lines.append(f"{status}: {report.path}{files}, {c['layers']} layers, {human_bytes(c['bytes'])} of tensor data "
                 f"checked {against}: {what}")
    return "\n".join(lines)
