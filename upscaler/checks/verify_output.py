"""The output file as `verify` sees it: every shard's header, split keys agreeing across shards,
zero padding between tensors and nothing after the last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType as T

from ..errors import SourceError
from ..format.gguf_header import Header, check_key_types, read_header
from ..format.source import KV, SPLIT_KEYS, SourceTensor, TensorReader, resolve_model_path, shard_paths
from .verify_report import VerifyReport

# --------------------------------------------------------------------------- the output file


@dataclass
class OutFile:
    paths: list[Path]
    headers: list[Header]
    kvs: dict[str, KV]
    tensors: dict[str, SourceTensor]  # file order, shard by shard

    @property
    def arch(self) -> str | None:
        kv = self.kvs.get("general.architecture")
        return str(kv.value) if kv is not None else None

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value


def open_output(path: str | Path, report: VerifyReport) -> OutFile | None:
    first = resolve_model_path(path)  # a missing file is a usage error, raised
    report.path = str(first)
    try:
        paths = shard_paths(first)
    except SourceError as e:
        report.problem(str(e))
        return None
    report.files = [str(p) for p in paths]
    headers: list[Header] = []
    for p in paths:
        try:
            headers.append(read_header(p))
        except SourceError as e:
            report.problem(str(e))
            return None
    _check_split(paths, headers, report)
    try:
        check_key_types(paths[0], headers[0].kvs)
    except SourceError as e:
        report.problem(str(e))
    kvs = {kv.key: KV(kv.key, kv.value, kv.vtype, kv.sub_type) for kv in headers[0].kvs if kv.key not in SPLIT_KEYS}
    tensors: dict[str, SourceTensor] = {}
    for p, h in zip(paths, headers):
        for t in h.tensors:
            if t.name in tensors:
                report.problem(f"{p.name}: tensor {t.name} also appears in another shard")
                continue
            tensors[t.name] = SourceTensor(t.name, t.ggml_type, t.shape, t.n_bytes, p, t.offset)
    return OutFile(paths, headers, kvs, tensors)


def _check_split(paths: list[Path], headers: list[Header], report: VerifyReport) -> None:
    n = len(paths)
    total = sum(len(h.tensors) for h in headers)
    for i, (p, h) in enumerate(zip(paths, headers)):
        kv = {k.key: k for k in h.kvs if k.key in SPLIT_KEYS}
        if n == 1:
            count, no = kv.get("split.count"), kv.get("split.no")
            if count is not None and count.value != 1:
                report.problem(f"{p.name}: split.count is {count.value}, but the file is not one of a shard set")
            if no is not None and no.value != 0:
                report.problem(f"{p.name}: split.no is {no.value}, but the file is not one of a shard set")
            continue
        expect = {"split.no": (i, T.UINT16, f"it is file {i + 1} of the set"),
                  "split.count": (n, T.UINT16, f"the set has {n} files"),
                  "split.tensors.count": (total, T.INT32, f"the shards hold {total} tensors")}
        for key, (value, vtype, why) in expect.items():
            got = kv.get(key)
            if got is None:
                report.problem(f"{p.name}: {key} is missing (expected {value}: {why})")
            elif got.vtype != vtype:
                report.problem(f"{p.name}: {key} is stored as {got.vtype.name}, expected {vtype.name}")
            elif got.value != value:
                report.problem(f"{p.name}: {key} is {got.value}, expected {value} ({why})")


def check_padding(out: OutFile, reader: TensorReader, report: VerifyReport) -> None:
    """Bytes between tensors are zero padding; nothing but padding after the last tensor."""
    for p, h in zip(out.paths, out.headers):
        fd = reader.fd(p)
        for k, t in enumerate(h.tensors):
            end = t.offset + t.n_bytes
            padded = -(-end // h.alignment) * h.alignment
            if k + 1 < len(h.tensors):
                gap_end = h.tensors[k + 1].offset
            else:
                gap_end = min(padded, h.file_size)
                if h.file_size > padded:
                    report.problem(f"{p.name}: {h.file_size - padded} unexpected bytes after the last tensor "
                                   f"({t.name})")
            for start in range(end, gap_end, 1 << 20):
                gap = os.pread(fd, min(1 << 20, gap_end - start), start)
                if any(gap):
                    pos = start - end + next(i for i, b in enumerate(gap) if b)
                    report.problem(f"{p.name}: padding after tensor {t.name} is not zero "
                                   f"(byte {pos} after its end)")
                    break
