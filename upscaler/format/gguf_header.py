"""A strict, fast reader for GGUF headers (metadata and tensor infos; never tensor data).

Why not gguf-py's GGUFReader: it builds numpy views for every field (seconds for a 150k-token
vocabulary) and trusts the lengths it reads. Here every length and count is checked against
the bytes actually left in the file, and against a fixed cap, before anything is allocated, and
every rule llama.cpp's gguf.cpp enforces (known types, tensor names under 64 bytes, contiguous
aligned offsets, unique names and keys) is enforced with a one-line error naming the file, so a
truncated download or a crafted file can neither crash nor hang the tool, nor make it allocate
in proportion to a size it merely claims. Type names and block sizes come from gguf-py's
constants.

`check_key_types` adds the same guarantee one level up: the metadata keys gguf-upscale itself
interprets (architecture, block count, split keys, recorded lineage, ...) must have the types it
and llama.cpp expect, so nothing downstream ever does arithmetic on a string.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC

from ..errors import OutputError, SourceError, UpscaleError

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1: llama.cpp refuses longer tensor names
MAX_KEY_BYTES = 65536
# Fixed caps far above anything a real model holds (the largest vocabularies have ~260k tokens,
# the longest metadata strings are embedded tokenizer.json files of a few tens of MB). They bound
# what a header that lies about its sizes can make us allocate, and how long it can keep us busy,
# even in a 200 GB file whose size would satisfy the lie.
MAX_STRING_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 512 * 1024 * 1024  # metadata + tensor infos; real headers are under 100 MB
MAX_ARRAY_ITEMS = 1 << 22  # per array
MAX_TOTAL_ITEMS = 1 << 23  # all arrays together: bounds the Python objects a header becomes
MAX_KVS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ALIGNMENT = 1 << 24
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
INT_TYPES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                       GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
_KNOWN_TYPES = {int(t) for t in GGMLQuantizationType}
_U64 = struct.Struct("<Q").unpack_from


def _q(name: str | bytes) -> str:
    """A key or tensor name for an error message: quoted, escaped, and short (they can be 64 KB of junk)."""
    r = repr(name)
    return r if len(r) <= 90 else r[:80] + "..." + r[-1]


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


class ByteCursor:
    """Bounds-checked little-endian reads from a buffer (a memory map of a GGUF header, or of a whole
    imatrix file): every claimed length is checked against the bytes left, and against `limit`,
    before anything is read or allocated. Errors are `error`s naming the file."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path | str, *, limit: int | None = None,
                 error: type[UpscaleError] = SourceError, noun: str = " header") -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.limit = min(self.size, MAX_HEADER_BYTES if limit is None else limit)  # no read goes past this
        self.items = 0  # array items read so far
        self.path = path
        self.error = error
        self.noun = noun

    def fail(self, msg: str) -> UpscaleError:
        return self.error(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt{self.noun}: {what} needs {n} bytes at offset {self.pos}, "
                            f"file has {self.size}")
        if self.pos + n > self.limit:
            raise self.fail(f"header runs past {MAX_HEADER_BYTES >> 20} MiB at {what} (corrupt header?)")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(out)

    def i32(self, what: str) -> int:
        return self.scalar("<i", 4, what)

    def i64(self, what: str) -> int:
        return self.scalar("<q", 8, what)

    def text(self, n: int, what: str) -> str:
        """`n` bytes that must be UTF-8."""
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {self.pos - n} is not valid UTF-8") from None

    def floats(self, n: int, offset: int, what: str) -> np.ndarray:
        """Copy `n` float32 values at `offset` out of the buffer (the mapping is closed later)."""
        if n < 0 or offset < 0 or offset > self.size or 4 * n > self.size - offset:
            raise self.fail(f"truncated or corrupt{self.noun}: {what} needs {4 * n} bytes at offset {offset}")
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        return np.frombuffer(self.buf, dtype="<f4", count=n, offset=offset).astype(np.float32, copy=True)

    def scalar(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def raw_string(self, what: str, limit: int = MAX_STRING_BYTES) -> bytes:
        n = self.u64(f"{what} length")
        if n > limit:
            raise self.fail(f"{what} claims to be {n} bytes long, over the limit of {limit} (corrupt header?)")
        self.need(n, what)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str | bytes:
        b = self.raw_string(what, limit)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b  # kept as bytes so it is written back exactly

    def strings(self, count: int, key: str) -> list[str | bytes]:
        """`count` strings in a row (a vocabulary): the hot loop of header parsing, kept tight."""
        buf, pos, limit = self.buf, self.pos, self.limit
        out: list[str | bytes] = []
        append = out.append
        for i in range(count):
            if pos + 8 > limit:
                self.pos = pos
                self.need(8, f"length of item {i} of {_q(key)}")
            n = _U64(buf, pos)[0]
            pos += 8
            if n > MAX_STRING_BYTES or pos + n > limit:
                self.pos = pos - 8
                self.raw_string(f"item {i} of {_q(key)}")  # raises the precise error
            b = buf[pos:pos + n]
            pos += n
            try:
                append(b.decode("utf-8"))
            except UnicodeDecodeError:
                append(b)
        self.pos = pos
        return out


def _value_type(cur: ByteCursor, raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cur.fail(f"metadata key {_q(key)} has unknown value type {raw}") from None


def _read_value(cur: ByteCursor, vtype: GGUFValueType, key: str) -> tuple[Any, GGUFValueType | None]:
    if vtype in SCALAR_FORMATS:
        fmt, n = SCALAR_FORMATS[vtype]
        return cur.scalar(fmt, n, f"value of {_q(key)}"), None
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {_q(key)}"), None
    if vtype != GGUFValueType.ARRAY:
        raise cur.fail(f"metadata key {_q(key)} has unsupported value type {vtype.name}")
    sub = _value_type(cur, cur.u32(f"array type of {_q(key)}"), key)
    count = cur.u64(f"array length of {_q(key)}")
    if sub == GGUFValueType.ARRAY:
        raise cur.fail(f"metadata key {_q(key)} is an array of arrays, which llama.cpp does not support")
    if count > MAX_ARRAY_ITEMS:
        raise cur.fail(f"metadata key {_q(key)} claims {count} array items, over the limit of {MAX_ARRAY_ITEMS} "
                       "(corrupt header?)")
    if cur.items + count > MAX_TOTAL_ITEMS:
        raise cur.fail(f"metadata key {_q(key)} brings the header's array items to {cur.items + count}, "
                       f"over the limit of {MAX_TOTAL_ITEMS} (corrupt header?)")
    cur.items += count
    if sub in SCALAR_FORMATS:
        _, n = SCALAR_FORMATS[sub]
        cur.need(count * n, f"array {_q(key)} of {count} items")
        if sub == GGUFValueType.BOOL:
            value: Any = [x != 0 for x in cur.buf[cur.pos:cur.pos + count]]
        else:
            value = np.frombuffer(cur.buf, dtype=NUMPY_DTYPES[sub], count=count, offset=cur.pos).tolist()
        cur.pos += count * n
        return value, sub
    # STRING: every item takes at least its 8-byte length, so a claimed count beyond that is corrupt
    cur.need(count * 8, f"array {_q(key)} of {count} strings")
    return cur.strings(count, key), sub


def read_header(path: Path) -> Header:
    """Parse and validate a GGUF file's header. Raises SourceError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise SourceError(f"{path}: {size} bytes is too short to be a GGUF file"
                                  + (" (empty download?)" if size == 0 else ""))
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(ByteCursor(buf, path))
    except IsADirectoryError:
        raise SourceError(f"{path}: is a folder, not a GGUF file") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # mmap of something that is not a regular file
        raise SourceError(f"{path}: cannot read ({e})") from None


def _parse(cur: ByteCursor) -> Header:
    magic = cur.scalar("<I", 4, "magic")
    if magic != GGUF_MAGIC:
        raise cur.fail("not a GGUF file (bad magic); is it a safetensors or an HTML error page?")
    version = cur.u32("version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version >> 24 in (2, 3):
            raise cur.fail("big-endian GGUF files are not supported")
        raise cur.fail(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # each KV takes at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at least 8+4+8+4+8
    if n_kv > MAX_KVS or n_tensors > MAX_TENSORS or n_kv * 13 + n_tensors * 32 > cur.size:
        raise cur.fail(f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the file can hold "
                       "(corrupt header?)")

    kvs: list[RawKV] = []
    seen: set[str] = set()
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY_BYTES)
        if isinstance(key, bytes):
            raise cur.fail(f"metadata key #{i} is not valid UTF-8: {_q(key)}")
        if not key:
            raise cur.fail(f"metadata key #{i} is empty")
        if key in seen:
            raise cur.fail(f"metadata key {_q(key)} appears twice")
        seen.add(key)
        vtype = _value_type(cur, cur.u32(f"type of {_q(key)}"), key)
        value, sub = _read_value(cur, vtype, key)
        kvs.append(RawKV(key, value, vtype, sub))

    alignment = DEFAULT_ALIGNMENT
    for kv in kvs:
        if kv.key == "general.alignment":
            if kv.vtype != GGUFValueType.UINT32 or kv.value == 0 or kv.value & (kv.value - 1):
                raise cur.fail(f"general.alignment must be a power of two (UINT32), got {_describe(kv)}")
            if kv.value > MAX_ALIGNMENT:
                raise cur.fail(f"general.alignment {kv.value} is over the limit of {MAX_ALIGNMENT}")
            alignment = kv.value

    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}", MAX_KEY_BYTES)
        if isinstance(name, bytes):
            raise cur.fail(f"tensor name #{i} is not valid UTF-8: {_q(name)}")
        if not name:
            raise cur.fail(f"tensor #{i} has an empty name")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise cur.fail(f"tensor name #{i} {_q(name)} is over {MAX_NAME_BYTES} bytes, "
                           "which llama.cpp does not allow")
        if name in names:
            raise cur.fail(f"tensor {_q(name)} appears twice")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {_q(name)}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {_q(name)} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.u64(f"dimension of {_q(name)}") for _ in range(n_dims))
        raw_type = cur.u32(f"type of {_q(name)}")
        if raw_type not in _KNOWN_TYPES or GGMLQuantizationType(raw_type) not in GGML_QUANT_SIZES:
            raise cur.fail(f"tensor {_q(name)} has unknown type {raw_type}")
        offset = cur.u64(f"offset of {_q(name)}")
        infos.append((name, shape, GGMLQuantizationType(raw_type), offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: list[RawTensorInfo] = []
    expected = 0
    for name, shape, typ, offset in infos:
        n_elems = 1
        for d in shape:
            if d <= 0:
                raise cur.fail(f"tensor {_q(name)} has an empty or negative dimension {shape}")
            n_elems *= d
            if n_elems > cur.size * 64:
                raise cur.fail(f"tensor {_q(name)} claims {shape} elements, far more than the file holds")
        block = GGML_QUANT_SIZES[typ][0]
        if shape[0] % block:
            raise cur.fail(f"tensor {_q(name)}: row length {shape[0]} is not a multiple of "
                           f"{typ.name}'s block size {block}")
        n_bytes = tensor_nbytes(typ, shape)
        if offset != expected:
            raise cur.fail(f"tensor {_q(name)} data is at offset {offset}, expected {expected} "
                           "(llama.cpp requires contiguous, aligned tensor data)")
        if data_offset + offset + n_bytes > cur.size:
            raise cur.fail(f"tensor {_q(name)} lies beyond the end of the file (truncated download?)")
        tensors.append(RawTensorInfo(name, shape, typ, data_offset + offset, n_bytes))
        expected = offset + -(-n_bytes // alignment) * alignment
    return Header(version, kvs, tensors, alignment, data_offset, cur.size)


# -- sizes and writing -------------------------------------------------------------------------
# The one serializer of GGUF headers: the writer's output files, the quantizer's skeleton for
# llama.cpp's dry run and GGUF imatrix files all go through these functions.

GGUF_VERSION = 3  # what gguf.cpp writes; it reads 2 and 3


def tensor_nbytes(ggml_type: int, shape: Sequence[int]) -> int:
    """Bytes of a tensor of GGUF shape (ne0, ne1, ...) stored as `ggml_type` (ggml_nbytes for
    contiguous data): whole blocks of ne0. The one tensor-size rule of the tool."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if shape and shape[0] % block:
        raise ValueError(f"rows of {shape[0]} elements cannot be stored as {GGMLQuantizationType(ggml_type).name} "
                         f"(block size {block})")
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def padded(n: int, alignment: int) -> int:
    """`n` rounded up to a multiple of `alignment`."""
    return -(-n // alignment) * alignment


class KeyValue(Protocol):
    """A metadata entry with its exact GGUF type (source.KV and RawKV fit)."""

    @property
    def key(self) -> str: ...
    @property
    def value(self) -> Any: ...
    @property
    def vtype(self) -> GGUFValueType: ...
    @property
    def sub_type(self) -> GGUFValueType | None: ...


def pack_string(v: str | bytes) -> bytes:
    b = v.encode("utf-8") if isinstance(v, str) else v
    return struct.pack("<Q", len(b)) + b


def pack_kv(kv: KeyValue) -> bytes:
    """Serialize one key/value exactly as typed (arrays keep their element type; empty arrays allowed)."""
    out = [pack_string(kv.key), struct.pack("<I", kv.vtype)]
    if kv.vtype == GGUFValueType.STRING:
        out.append(pack_string(kv.value))
    elif kv.vtype == GGUFValueType.ARRAY:
        sub = kv.sub_type
        if sub is None:
            raise OutputError(f"metadata key {kv.key}: array without an element type")
        out.append(struct.pack("<IQ", sub, len(kv.value)))
        if sub == GGUFValueType.STRING:
            out.extend(pack_string(v) for v in kv.value)
        elif sub == GGUFValueType.BOOL:
            out.append(bytes(1 if v else 0 for v in kv.value))
        elif sub in NUMPY_DTYPES:
            out.append(np.asarray(kv.value, dtype=NUMPY_DTYPES[sub]).tobytes())
        else:
            raise OutputError(f"metadata key {kv.key}: nested arrays are not supported")
    elif kv.vtype in SCALAR_FORMATS:
        fmt, _ = SCALAR_FORMATS[kv.vtype]
        out.append(struct.pack(fmt, kv.value))
    else:
        raise OutputError(f"metadata key {kv.key}: unknown value type {kv.vtype}")
    return b"".join(out)


def pack_tensor_info(name: str, shape: Sequence[int], ggml_type: int, offset: int) -> bytes:
    """One tensor info: name, dimensions (ne0 first), ggml type, data offset."""
    return (pack_string(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
            + struct.pack("<IQ", ggml_type, offset))


def pack_header(kvs: Sequence[KeyValue | bytes], tensors: Sequence[tuple[str, Sequence[int], int, int]],
                alignment: int) -> tuple[bytes, list[int]]:
    """Magic, version, counts, key/values and tensor infos, unpadded; and each tensor's data offset.

    `kvs` items are entries to serialize, or bytes already serialized (kept verbatim); `tensors`
    are (name, shape ne0 first, ggml type, byte size), laid out contiguously, each padded to
    `alignment` as gguf.cpp requires."""
    parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(kvs))]
    parts += [kv if isinstance(kv, bytes) else pack_kv(kv) for kv in kvs]
    offsets = []
    offset = 0
    for name, shape, typ, n_bytes in tensors:
        parts.append(pack_tensor_info(name, shape, typ, offset))
        offsets.append(offset)
        offset += padded(n_bytes, alignment)
    return b"".join(parts), offsets


# -- the keys gguf-upscale interprets ----------------------------------------------------------

MAX_BASE_MODELS = 1024

# key (regex; "{arch}" is the file's architecture) -> what its value must be:
#   "string": a UTF-8 STRING; "count": an integer >= 0; "counts": an array of integers >= 0;
#   "count|counts": either; "strings": an array of UTF-8 STRINGs; "array": any array.
KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"general\.architecture", "string"),
    (r"split\.(no|count|tensors\.count)", "count"),
    (r"{arch}\.(block_count|embedding_length|attention\.key_length)", "count"),
    (r"{arch}\.attention\.head_count(_kv)?", "count|counts"),
    (r"general\.base_model\.count", "count"),
    (r"general\.base_model\.\d+\.name", "string"),
    (r"general\.tags", "array"),
    (r"upscale\.layer_source_(model|index)", "counts"),
    (r"upscale\.source_block_counts", "counts"),
    (r"upscale\.source_(models|files)", "strings"),
)


def _value_ok(kv: RawKV, rule: str) -> bool:
    if "|" in rule:
        return any(_value_ok(kv, r) for r in rule.split("|"))
    if rule == "string":
        return kv.vtype == GGUFValueType.STRING and isinstance(kv.value, str)
    if rule == "count":
        return kv.vtype in INT_TYPES and kv.value >= 0
    if kv.vtype != GGUFValueType.ARRAY:
        return False
    if rule == "counts":
        return kv.sub_type in INT_TYPES and all(v >= 0 for v in kv.value)
    if rule == "strings":
        return kv.sub_type == GGUFValueType.STRING and all(isinstance(v, str) for v in kv.value)
    return rule == "array"


_RULE_TEXT = {"string": "a UTF-8 string", "count": "a non-negative integer",
              "counts": "an array of non-negative integers",
              "count|counts": "a non-negative integer or an array of them", "strings": "an array of UTF-8 strings",
              "array": "an array"}


def _describe(kv: RawKV) -> str:
    if kv.vtype == GGUFValueType.ARRAY:
        return f"an array of {kv.sub_type.name if kv.sub_type is not None else '?'}"
    shown = repr(kv.value)
    return f"{kv.vtype.name} {shown[:60] + '...' if len(shown) > 60 else shown}"


def check_key_types(path: Path, kvs: Iterable[RawKV]) -> None:
    """Refuse, naming the key, any metadata gguf-upscale interprets whose type or value it cannot use."""
    kvs = list(kvs)
    arch_kv = next((kv for kv in kvs if kv.key == "general.architecture"), None)
    arch = re.escape(arch_kv.value) if arch_kv is not None and isinstance(arch_kv.value, str) else None
    rules = [(re.compile(p.replace("{arch}", arch or "(?!)")), r) for p, r in KEY_RULES]
    for kv in kvs:
        for pattern, rule in rules:
            if pattern.fullmatch(kv.key):
                if not _value_ok(kv, rule):
                    raise SourceError(f"{path}: metadata {kv.key} must be {_RULE_TEXT[rule]}, got {_describe(kv)}")
                break
    for kv in kvs:
        if kv.key == "general.base_model.count" and kv.value > min(MAX_BASE_MODELS, len(kvs)):
            raise SourceError(f"{path}: metadata general.base_model.count is {kv.value}, more than the file "
                              "describes (corrupt header?)")
