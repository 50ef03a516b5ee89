"""Tensor data checks of `verify`: each tensor's digests against its recomputations (cached per
distinct content), duplicated copies against each other, a mismatch located to the byte.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..errors import SourceError, UpscaleError
from ..format.source import SourceTensor, TensorReader
from ..planning.output import OutTensor
from .verify_output import OutFile
from .verify_report import MAX_PROBLEMS, VerifyReport
from .verify_stream import (
    CHUNK,
    Consumer,
    Digests,
    Producer,
    chunk_for,
    first_difference,
    read_tensor,
    valid_values,
    window,
)

# --------------------------------------------------------------------------- tensor data


@dataclass
class Expect:
    """What one output tensor must hold: alternative recomputations (the first is the primary)."""

    desc: str
    op: str
    candidates: list[tuple[tuple, Producer]]  # (cache key, producer)
    group: tuple | None = None  # tensors with equal groups must be byte-identical
    exact: bool = True  # False: a mismatch means "cannot tell" (e.g. quantized with an unknown imatrix)


class DataChecker:
    def __init__(self, out: OutFile, reader: TensorReader, report: VerifyReport, progress: Any) -> None:
        self.out, self.reader, self.report, self.progress = out, reader, report, progress
        self.cache: dict[tuple, tuple[int, tuple[bytes, ...]] | str] = {}
        self.groups: dict[tuple, list[tuple[SourceTensor, tuple[int, tuple[bytes, ...]], str]]] = defaultdict(list)
        self.validate_values = False
        self.emitter: Any = None  # the QuantEmitter recomputing quantized tensors (closed at the end)
        self.mismatches = 0
        self.unknown_imatrix: str | None = None  # quantized with this imatrix, which was not given

    def digest(self, key: tuple, produce: Producer, chunk: int) -> tuple[int, tuple[bytes, ...]] | str:
        """Digests of a recomputation (cached), or the reason it cannot be made."""
        key = key + (chunk,)
        if key not in self.cache:
            d = Digests(chunk)
            try:
                produce(d)
                self.cache[key] = d.result()
            except UpscaleError as e:
                if isinstance(e, SourceError):
                    raise
                self.cache[key] = str(e)
        return self.cache[key]

    def actual(self, t: SourceTensor) -> tuple[int, tuple[bytes, ...]]:
        chunk = chunk_for(t.ggml_type)
        d = Digests(chunk)
        bad: list[int] = []

        def consume(data: Any) -> None:
            d(data)
            if self.validate_values and not bad and not valid_values(t.ggml_type, data):
                bad.append(d.total - len(data))

        read_tensor(self.reader, t, consume, chunk)
        if bad:
            self.report.problem(f"{t.name}: invalid values (NaN/inf or a bad block scale) in the 16 MiB piece at "
                                f"byte {bad[0]}")
        self.report.count("tensors")
        self.report.count("bytes", t.n_bytes)
        if self.progress is not None:
            self.progress.advance(t, t.n_bytes)
        return d.result()

    def check(self, t: SourceTensor, exp: Expect) -> None:
        got = self.actual(t)
        chunk = chunk_for(t.ggml_type)
        status = "bad"
        reasons = []
        for key, produce in exp.candidates:
            want = self.digest(key, produce, chunk)
            if isinstance(want, str):
                reasons.append(want)
                continue
            if want == got:
                status = "ok"
                break
        if status == "ok":
            self.report.count("exact")
            self.report.count(exp.op)
        elif not exp.exact or (reasons and len(reasons) == len(exp.candidates)):
            status = "unverified"
            self.report.count("not_verified")
            if reasons and len(reasons) == len(exp.candidates) and len(self.report.notes) < MAX_PROBLEMS:
                self.report.notes.append(f"{t.name}: cannot be recomputed ({reasons[0]})")
        else:
            self.mismatches += 1
            self._mismatch(t, got, exp, chunk)
        if exp.group is not None:
            self.groups[exp.group].append((t, got, status))

    def _mismatch(self, t: SourceTensor, got: tuple[int, tuple[bytes, ...]], exp: Expect, chunk: int) -> None:
        key, produce = next((k, p) for k, p in exp.candidates if not isinstance(self.cache.get(k + (chunk,)), str))
        want = self.cache[key + (chunk,)]
        assert not isinstance(want, str)
        if self.report.full:
            self.report.problem(f"{t.name}: differs from {exp.desc}")
            return
        if want[0] != got[0]:
            self.report.problem(f"{t.name}: holds {got[0]} bytes, {exp.desc} has {want[0]}")
            return
        k = next(i for i, (a, b) in enumerate(zip(want[1], got[1])) if a != b)
        start, end = k * chunk, min((k + 1) * chunk, t.n_bytes)
        expected = window(produce, start, end)
        actual = bytes(self.reader.read(t, start, end - start))
        pos, count = first_difference(expected, actual)
        more = f" (+{count - 1} more in that 16 MiB piece)" if count > 1 else ""
        self.report.problem(f"{t.name}: byte {start + pos} of {t.n_bytes} is 0x{actual[pos]:02x}, expected "
                            f"0x{expected[pos]:02x} ({exp.desc}){more}")

    def check_groups(self) -> None:
        """Copies with identical recipes (same source, scale, type) must be byte-identical."""
        for members in self.groups.values():
            if len(members) < 2:
                continue
            ok = [m for m in members if m[2] == "ok"]
            if ok:
                ref = ok[0]
            else:
                votes = Counter(m[1] for m in members if m[2] == "unverified")
                if not votes:
                    continue
                best, n = votes.most_common(1)[0]
                ref = next(m for m in members if m[1] == best)
            matched = 0
            for m in members:
                if m[2] != "unverified" or m is ref:
                    continue
                if m[1] == ref[1]:
                    matched += 1
                    continue
                self._pair_mismatch(m[0], ref[0], m[1], ref[1])
            if matched:
                self.report.count("duplicates", matched + (ref[2] == "unverified"))

    def _pair_mismatch(self, t: SourceTensor, ref: SourceTensor, got: tuple, want: tuple) -> None:
        what = f"its identical copy {ref.name} (same source layer, scale and type)"
        if self.report.full or got[0] != want[0]:
            self.report.problem(f"{t.name}: differs from {what}")
            return
        chunk = chunk_for(t.ggml_type)
        k = next(i for i, (a, b) in enumerate(zip(want[1], got[1])) if a != b)
        start, end = k * chunk, min((k + 1) * chunk, t.n_bytes)
        a, b = bytes(self.reader.read(t, start, end - start)), bytes(self.reader.read(ref, start, end - start))
        pos, _ = first_difference(a, b)
        self.report.problem(f"{t.name}: byte {start + pos} is 0x{a[pos]:02x}, 0x{b[pos]:02x} in {what}")


def zero_row_candidates(t: SourceTensor, with_imatrix: bool) -> list[tuple[tuple, Producer]]:
    """What a zero-scaled tensor may hold: zero bytes, or the row ggml's quantizer makes of +0.0 / -0.0
    (`run` dequantizes zero bytes of the source type, which is -0.0 for some types, then quantizes)."""
    from ..quant import ggml
    n_per_row = t.shape[0]
    n_rows = t.n_elements // n_per_row
    row_len = t.n_bytes // max(n_rows, 1)
    rows = [bytes(row_len)]
    if int(t.ggml_type) in ggml.QUANTIZABLE:
        for sign in (1.0, -1.0):
            im = np.ones(n_per_row, np.float32) if with_imatrix or ggml.requires_imatrix(int(t.ggml_type)) else None
            try:
                row = bytes(ggml.quantize_tensor(np.full((1, n_per_row), sign * 0.0, np.float32), int(t.ggml_type), im))
            except UpscaleError:
                continue
            if row not in rows:
                rows.append(row)

    def repeat(row: bytes) -> Producer:
        def produce(consume: Consumer) -> None:
            per = max(1, CHUNK // max(len(row), 1))
            block = memoryview(row * min(per, n_rows))
            left = n_rows
            while left:
                k = min(per, left)
                consume(block[:k * len(row)])
                left -= k
        return produce

    return [(("zero-row", int(t.ggml_type), t.shape, row), repeat(row)) for row in rows]


def describe(e: OutTensor, model: str, typ: Q) -> tuple[str, str]:
    src = f"{e.source.name} of {model}"
    requant = typ != e.source.ggml_type
    if e.factor == 0.0:
        return "zero", "zero (scale 0)" + (f", as {typ.name}" if requant else "")
    if e.factor != 1.0:
        return (("quantize" if requant else "scale"),
                f"{src} x {e.factor:g}" + (f", quantized to {typ.name}" if requant else ""))
    if requant:
        return "quantize", f"{src} quantized to {typ.name}"
    return "copy", f"copy of {src}"
