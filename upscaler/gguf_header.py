"""A strict, fast reader for GGUF headers (metadata and tensor infos; never tensor data).

Why not gguf-py's GGUFReader: it builds numpy views for every field (seconds for a 150k-token
vocabulary) and trusts the lengths it reads. Here every length and count is checked against
the bytes actually left in the file before anything is allocated, and every rule llama.cpp's
gguf.cpp enforces (known types, contiguous aligned offsets, unique names) is enforced with a
one-line error naming the file, so a truncated download or a crafted file can neither crash
nor hang the tool. Type names and block sizes come from gguf-py's constants.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC

from .errors import SourceError

MAX_DIMS = 4
MAX_KEY_BYTES = 65536
DEFAULT_ALIGNMENT = 32

SCALAR_FORMATS = {
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2), GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8), GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
_KNOWN_TYPES = {int(t) for t in GGMLQuantizationType}


@dataclass(frozen=True)
class RawKV:
    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None


@dataclass(frozen=True)
class RawTensorInfo:
    name: str
    shape: tuple[int, ...]  # ne0 first
    ggml_type: GGMLQuantizationType
    offset: int  # absolute offset in the file
    n_bytes: int


@dataclass(frozen=True)
class Header:
    version: int
    kvs: list[RawKV]
    tensors: list[RawTensorInfo]
    alignment: int
    data_offset: int
    file_size: int


class _Cursor:
    """Bounds-checked little-endian reads from a memory map of the header."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, msg: str) -> SourceError:
        return SourceError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt header: {what} needs {n} bytes at offset {self.pos}, "
                            f"file has {self.size}")

    def scalar(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long, over the limit of {limit}")
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def string(self, what: str, limit: int | None = None) -> str | bytes:
        b = self.raw_string(what, limit)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b  # kept as bytes so it is written back exactly


def _value_type(cur: _Cursor, raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cur.fail(f"metadata key {key!r} has unknown value type {raw}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, key: str) -> tuple[Any, GGUFValueType | None]:
    if vtype in SCALAR_FORMATS:
        fmt, n = SCALAR_FORMATS[vtype]
        return cur.scalar(fmt, n, f"value of {key!r}"), None
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}"), None
    if vtype != GGUFValueType.ARRAY:
        raise cur.fail(f"metadata key {key!r} has unsupported value type {vtype}")
    sub = _value_type(cur, cur.u32(f"array type of {key!r}"), key)
    count = cur.u64(f"array length of {key!r}")
    if sub in SCALAR_FORMATS:
        _, n = SCALAR_FORMATS[sub]
        cur.need(count * n, f"array {key!r} of {count} items")
        if sub == GGUFValueType.BOOL:
            arr = np.frombuffer(cur.buf, dtype=np.uint8, count=count, offset=cur.pos)
            value: Any = [bool(x) for x in arr]
        else:
            value = np.frombuffer(cur.buf, dtype=NUMPY_DTYPES[sub], count=count, offset=cur.pos).tolist()
        cur.pos += count * n
        return value, sub
    if sub == GGUFValueType.STRING:
        # every string takes at least its 8-byte length: a claimed count beyond that is corrupt
        cur.need(count * 8, f"array {key!r} of {count} strings")
        return [cur.string(f"item {i} of {key!r}") for i in range(count)], sub
    raise cur.fail(f"metadata key {key!r} is an array of {sub.name}, which is not supported")


def read_header(path: Path) -> Header:
    """Parse and validate a GGUF file's header. Raises SourceError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise SourceError(f"{path}: {size} bytes is too short to be a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path))
    except IsADirectoryError:
        raise SourceError(f"{path}: is a folder, not a GGUF file") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse(cur: _Cursor) -> Header:
    magic = cur.scalar("<I", 4, "magic")
    if magic != GGUF_MAGIC:
        raise cur.fail("not a GGUF file (bad magic); is it a safetensors or an HTML error page?")
    version = cur.u32("version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version >> 16 in (2, 3):
            raise cur.fail("big-endian GGUF files are not supported")
        raise cur.fail(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # each KV takes at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at least 8+4+8+4+8
    if n_kv * 13 > cur.size or n_tensors * 32 > cur.size:
        raise cur.fail(f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the file can hold")

    kvs: list[RawKV] = []
    seen: set[str] = set()
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY_BYTES)
        if isinstance(key, bytes):
            raise cur.fail(f"metadata key #{i} is not valid UTF-8")
        if key in seen:
            raise cur.fail(f"metadata key {key!r} appears twice")
        seen.add(key)
        vtype = _value_type(cur, cur.u32(f"type of {key!r}"), key)
        value, sub = _read_value(cur, vtype, key)
        kvs.append(RawKV(key, value, vtype, sub))

    alignment = DEFAULT_ALIGNMENT
    for kv in kvs:
        if kv.key == "general.alignment":
            if kv.vtype != GGUFValueType.UINT32 or kv.value == 0 or kv.value & (kv.value - 1):
                raise cur.fail(f"general.alignment must be a power of two (UINT32), got {kv.value!r}")
            alignment = kv.value

    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}", MAX_KEY_BYTES)
        if isinstance(name, bytes):
            raise cur.fail(f"tensor name #{i} is not valid UTF-8")
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.u64(f"dimension of {name!r}") for _ in range(n_dims))
        raw_type = cur.u32(f"type of {name!r}")
        if raw_type not in _KNOWN_TYPES or GGMLQuantizationType(raw_type) not in GGML_QUANT_SIZES:
            raise cur.fail(f"tensor {name!r} has unknown type {raw_type}")
        offset = cur.u64(f"offset of {name!r}")
        infos.append((name, shape, GGMLQuantizationType(raw_type), offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: list[RawTensorInfo] = []
    expected = 0
    for name, shape, typ, offset in infos:
        n_elems = 1
        for d in shape:
            if d <= 0:
                raise cur.fail(f"tensor {name!r} has an empty or negative dimension {shape}")
            n_elems *= d
            if n_elems > cur.size * 64:
                raise cur.fail(f"tensor {name!r} claims {shape} elements, far more than the file holds")
        block, type_size = GGML_QUANT_SIZES[typ]
        if shape[0] % block:
            raise cur.fail(f"tensor {name!r}: row length {shape[0]} is not a multiple of {typ.name}'s block size {block}")
        n_bytes = n_elems // block * type_size
        if offset != expected:
            raise cur.fail(f"tensor {name!r} data is at offset {offset}, expected {expected} "
                           "(llama.cpp requires contiguous, aligned tensor data)")
        if data_offset + offset + n_bytes > cur.size:
            raise cur.fail(f"tensor {name!r} lies beyond the end of the file (truncated download?)")
        tensors.append(RawTensorInfo(name, shape, typ, data_offset + offset, n_bytes))
        expected = offset + -(-n_bytes // alignment) * alignment
    return Header(version, kvs, tensors, alignment, data_offset, cur.size)
