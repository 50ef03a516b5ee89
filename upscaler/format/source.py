"""Source models: a GGUF file or a shard set, opened for metadata and streamed tensor reads.

The header is parsed by `gguf_header` (strict and fast); tensor bytes are never memory-mapped
(mapped pages would pile up in RSS on a 140 GB model). Instead every read is a positioned
`pread` into a caller-owned buffer, or an in-kernel `copy_file_range` by the writer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import SourceError
from .gguf_header import check_key_types, read_header, tensor_nbytes

TENSOR_ALIGNMENT = 32  # ggml's (ggml-impl.h): mapped tensor buffers must start at a multiple of it
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class KV:
    """One metadata entry with its exact GGUF value type (and array element type)."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None

    def with_value(self, value: Any) -> KV:
        return KV(self.key, value, self.vtype, self.sub_type)


@dataclass(frozen=True)
class SourceTensor:
    """A tensor in a source file: where its bytes are, and what they are."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: ne0 (row length) first
    n_bytes: int
    path: Path
    offset: int  # absolute byte offset in `path`

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def block(self) -> int | None:
        m = BLOCK_RE.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def suffix(self) -> str:
        """Name without the `blk.N.` prefix (the tensor's kind within a layer)."""
        m = BLOCK_RE.match(self.name)
        return m.group(2) if m else self.name


def shard_paths(path: Path) -> list[Path]:
    """All files of the set `path` belongs to (any shard may be given), or [path]."""
    m = SHARD_RE.match(path.name)
    if not m:
        return [path]
    count, no = int(m.group("count")), int(m.group("no"))
    if not 1 <= no <= count:
        raise SourceError(f"{path}: shard name says it is file {no} of a set of {count}")
    stem = m.group("stem")
    paths = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise SourceError(f"{path}: shard set is incomplete, missing {', '.join(missing[:3])}"
                          + (" ..." if len(missing) > 3 else ""))
    return paths


def resolve_model_path(ref: str | Path) -> Path:
    """A `.gguf` file, any shard of a set (normalized to the first), or a folder holding exactly one model."""
    p = Path(ref).expanduser()
    if p.is_dir():
        # a shard set counts once, by its first shard
        candidates = sorted(q for q in p.glob("*.gguf")
                            if not (s := SHARD_RE.match(q.name)) or s.group("no") == "00001")
        if len(candidates) != 1:
            raise SourceError(f"{p}: folder must hold exactly one GGUF model, found {len(candidates)}")
        p = candidates[0]
    if not p.is_file():
        raise SourceError(f"{p}: no such file")
    m = SHARD_RE.match(p.name)
    if m:
        shard_paths(p)  # names the file given when its set is incomplete or its name is impossible
    if m and m.group("no") != "00001":
        p = p.with_name(f"{m.group('stem')}-00001-of-{m.group('count')}.gguf")
    return p


class SourceModel:
    """A GGUF model (single file or shard set) with its metadata and tensor index."""

    def __init__(self, ref: str | Path, name: str | None = None):
        self.path = resolve_model_path(ref)
        self.paths = shard_paths(self.path)
        self.name = name or self.path.name
        self.kvs: dict[str, KV] = {}
        self.tensors: dict[str, SourceTensor] = {}
        self.alignment = 32
        self._read_headers()

    def _read_headers(self) -> None:
        expected_count = len(self.paths)
        for i, p in enumerate(self.paths):
            h = read_header(p)
            check_key_types(p, h.kvs)
            kvs = {kv.key: KV(kv.key, kv.value, kv.vtype, kv.sub_type) for kv in h.kvs}
            if expected_count > 1 or "split.count" in kvs:
                self._check_shard(p, i, expected_count, kvs)
            if i == 0:
                self.kvs = {k: v for k, v in kvs.items() if k not in SPLIT_KEYS}
                self.alignment = h.alignment
            for t in h.tensors:
                if t.name in self.tensors:
                    raise SourceError(f"{p}: tensor {t.name!r} also appears in another shard")
                self.tensors[t.name] = SourceTensor(t.name, t.ggml_type, t.shape, t.n_bytes, p, t.offset)
        if expected_count > 1:
            total = self.kvs_first_split_total
            if total is not None and total != len(self.tensors):
                raise SourceError(f"{self.path}: shard set holds {len(self.tensors)} tensors, "
                                  f"split.tensors.count says {total}")
        if "general.architecture" not in self.kvs:
            raise SourceError(f"{self.path}: no general.architecture key; not a model file")

    def check_loadable(self, *, run: bool = False) -> None:
        """Refuse metadata llama.cpp would abort on (an assertion, not an error), naming the file;
        `run`: also what the architecture's graph asserts when the model runs."""
        from ..planning.llama_limits import load_problem, run_problem
        values = {k: kv.value for k, kv in self.kvs.items()}
        problem = (run_problem if run else load_problem)(values, self.arch)
        if problem:
            raise SourceError(f"{self.path}: {problem}")
        if run:  # llama.cpp maps each file's tensor data as one buffer that ggml asserts is 32-byte aligned
            for p in self.paths:
                first = min((t.offset for t in self.tensors.values() if t.path == p), default=0)
                if first % TENSOR_ALIGNMENT:
                    raise SourceError(f"{p}: tensor data starts at offset {first}, not a multiple of "
                                      f"{TENSOR_ALIGNMENT} (general.alignment {self.alignment}); llama.cpp's "
                                      "memory-mapped loader aborts on that")

    def _check_shard(self, p: Path, i: int, expected_count: int, kvs: dict[str, KV]) -> None:
        no, count = kvs.get("split.no"), kvs.get("split.count")
        if no is None or count is None:
            if expected_count == 1:  # a lone split.tensors.count is harmless
                return
            raise SourceError(f"{p}: named as a shard but has no split.no/split.count keys")
        if expected_count == 1 and int(count.value) > 1:
            raise SourceError(f"{p}: is shard {int(no.value) + 1} of a set of {count.value} (split.no/split.count), "
                              "but its name lacks the -0000N-of-0000M part that locates the other shards")
        if int(count.value) != expected_count:
            raise SourceError(f"{p}: split.count is {count.value}, file name says {expected_count}")
        if int(no.value) != i:
            raise SourceError(f"{p}: split.no is {no.value}, expected {i} (shards from different sets?)")
        tc = kvs.get("split.tensors.count")
        total = int(tc.value) if tc is not None else None
        if i == 0:
            self.kvs_first_split_total = total
        elif total is not None and self.kvs_first_split_total is not None and total != self.kvs_first_split_total:
            raise SourceError(f"{p}: split.tensors.count is {total}, the first shard says "
                              f"{self.kvs_first_split_total} (shards from different sets?)")

    kvs_first_split_total: int | None = None

    # -- metadata helpers ---------------------------------------------------------------

    @property
    def arch(self) -> str:
        return str(self.kvs["general.architecture"].value)

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{suffix}", default)

    @property
    def block_count(self) -> int:
        n = self.arch_get("block_count")
        if n is None:
            raise SourceError(f"{self.path}: no {self.arch}.block_count key")
        if n > len(self.tensors):  # every layer has tensors: a larger count is corrupt, and costly to draw
            raise SourceError(f"{self.path}: {self.arch}.block_count is {n}, but the model has only "
                              f"{len(self.tensors)} tensors (corrupt header?)")
        return int(n)

    @cached_property
    def blocks(self) -> dict[int, dict[str, SourceTensor]]:
        """Layer index -> tensor suffix -> tensor."""
        out: dict[int, dict[str, SourceTensor]] = {}
        for t in self.tensors.values():
            b = t.block
            if b is not None:
                out.setdefault(b, {})[t.suffix] = t
        return out

    @property
    def non_block_tensors(self) -> list[SourceTensor]:
        return [t for t in self.tensors.values() if t.block is None]

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


class TensorReader:
    """Positioned reads of tensor bytes through cached file descriptors (no mmap, bounded memory)."""

    CHUNK = 16 * 1024 * 1024

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise SourceError(f"{path}: cannot open ({e.strerror})") from None
            self._fds[path] = fd
        return fd

    def read(self, t: SourceTensor, start: int = 0, size: int | None = None) -> bytearray:
        """Read `size` bytes of tensor `t` from `start` (whole tensor by default)."""
        size = t.n_bytes - start if size is None else size
        buf = bytearray(size)
        view = memoryview(buf)
        fd = self.fd(t.path)
        got = 0
        while got < size:
            n = os.preadv(fd, [view[got:]], t.offset + start + got)
            if n == 0:
                raise SourceError(f"{t.path}: unexpected end of file while reading {t.name} (truncated?)")
            got += n
        return buf  # a bytearray: numpy can view it without a copy

    def chunks(self, t: SourceTensor, chunk: int | None = None) -> Iterator[bytearray]:
        """Yield the tensor's bytes in pieces of at most `chunk` bytes."""
        chunk = chunk or self.CHUNK
        for start in range(0, t.n_bytes, chunk):
            yield self.read(t, start, min(chunk, t.n_bytes - start))

    def array(self, t: SourceTensor) -> np.ndarray:
        """The tensor's raw bytes as a uint8 array (one tensor in memory)."""
        return np.frombuffer(self.read(t), dtype=np.uint8)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def row_bytes(ggml_type: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one row (gguf_header.tensor_nbytes, the one size rule)."""
    return tensor_nbytes(ggml_type, (n_per_row,))
