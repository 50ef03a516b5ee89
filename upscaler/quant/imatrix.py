"""Importance matrices (imatrix): read, write, renumber for upscaled layers, hand to llama.cpp's quantizer.

llama.cpp matches imatrix entries to tensors by exact name (``blk.12.ffn_down.weight``), so an
upscaled model needs an imatrix whose ``blk.N`` numbering follows the output layers; without it
llama-quantize refuses IQ1/IQ2 types ("missing importance matrix"). This module carries an
imatrix over losslessly and reproduces what llama-quantize derives from it.

Two on-disk formats exist, both written by llama.cpp's ``tools/imatrix/imatrix.cpp``:

Legacy ``.dat`` (``save_imatrix_legacy``), little-endian, no magic::

    int32 n_entries
    n_entries x { int32 len; char name[len]; int32 ncall; int32 nval; float32 values[nval] }
    int32 chunk_count; int32 len; char dataset[len]        <- optional trailer

    values = (sum of squared activations / count) * ncall, entries sorted by name.

GGUF (``save_imatrix``): ``general.type = "imatrix"``, ``imatrix.datasets`` (array of string),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (UINT32), then per entry (sorted by name) two
F32 tensors ``<name>.in_sum2`` (raw sums, ggml ne ``[n_per_row, n_mat]``) and ``<name>.counts``
(ne ``[1, n_mat]``); n_mat > 1 only for expert tensors. ggml writes ``ggml_n_dims`` dimensions,
so dense entries are 1-D. Layout: gguf.cpp's (version 3, alignment 32, data padded per tensor).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from ..errors import ImatrixError
from ..format.atomic import atomic_write
from ..format.gguf_header import (
    MAX_DIMS,
    MAX_NAME_BYTES,
    SCALAR_FORMATS,
    ByteCursor,
    RawKV,
    pack_header,
    pack_string,
    padded,
    tensor_nbytes,
)

__all__ = [
    "LegacyEntry",
    "GgufEntry",
    "Entry",
    "ImatrixData",
    "MetadataValue",
    "load_imatrix",
    "save_imatrix",
    "remap_imatrix",
    "quantize_entries",
    "imatrix_metadata",
]

logger = logging.getLogger(__name__)

Format = Literal["dat", "gguf"]
MetadataValue = tuple[GGUFValueType, str | int]

GGML_MAX_NAME = MAX_NAME_BYTES + 1  # gguf.cpp rejects tensor names of this many bytes or more
GGML_MAX_DIMS = MAX_DIMS

KEY_GENERAL_TYPE = "general.type"
KEY_ALIGNMENT = "general.alignment"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
_KNOWN_KEYS = (KEY_GENERAL_TYPE, KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"

# Keys llama-quantize writes into the quantized model (tools/quantize/quantize.cpp).
KEY_QUANTIZE_FILE = "quantize.imatrix.file"
KEY_QUANTIZE_DATASET = "quantize.imatrix.dataset"
KEY_QUANTIZE_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_QUANTIZE_N_CHUNKS = "quantize.imatrix.chunks_count"
_KV_OVERRIDE_STR_MAX = 127  # llama_model_kv_override.val_str is char[128], filled with strncpy(.., 127)

# Smallest encodings, used to reject claimed counts the file cannot possibly hold.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MIN_LEGACY_ENTRY_BYTES = 4 + 4 + 4 + 4  # name length, ncall, nval, one value

_BLK_RE = re.compile(r"blk\.(\d+)\.")


# --------------------------------------------------------------------------- data model


@dataclass
class LegacyEntry:
    """One entry of a legacy ``.dat`` file, as stored: ``values = sums / count * ncall``.

    Arrays loaded from a file (and shared between duplicated layers by :func:`remap_imatrix`)
    are read-only; build new arrays instead of editing them in place.
    """

    ncall: int
    values: np.ndarray  # float32, 1-D

    @property
    def n_values(self) -> int:
        return int(self.values.size)


@dataclass
class GgufEntry:
    """One entry of a GGUF imatrix, as stored: raw sums of squared activations and token counts.

    Shapes are numpy order (reversed ggml ``ne``) exactly as in the file, e.g. ``(n_per_row,)`` and
    ``(1,)`` for a dense tensor, ``(n_expert, n_per_row)`` and ``(n_expert, 1)`` for experts.
    """

    in_sum2: np.ndarray  # float32
    counts: np.ndarray  # float32 (llama.cpp rounds them to integers when reading)

    @classmethod
    def from_stats(cls, sums: np.ndarray, counts: np.ndarray) -> GgufEntry:
        """Build an entry shaped the way imatrix.cpp writes it (``ggml_n_dims`` drops trailing 1s)."""
        counts = np.asarray(counts, dtype=np.float32).reshape(-1)
        sums = np.asarray(sums, dtype=np.float32).reshape(-1)
        n_mat = counts.size
        if n_mat == 0 or sums.size % n_mat:
            raise ImatrixError(f"cannot build an imatrix entry from {sums.size} sums and {n_mat} counts")
        if n_mat == 1:
            return cls(sums.copy(), counts.copy())
        return cls(sums.reshape(n_mat, sums.size // n_mat).copy(), counts.reshape(n_mat, 1).copy())

    @property
    def n_values(self) -> int:
        return int(self.in_sum2.size)


Entry = LegacyEntry | GgufEntry


@dataclass
class ImatrixData:
    """An importance matrix in its file's own representation, so saving it loses nothing.

    ``entries`` keep file order (llama.cpp writes them sorted by name). ``chunk_count`` is the
    legacy trailer's count or ``imatrix.chunk_count``; ``None`` means absent (legacy: no trailer).
    ``chunk_size`` exists only in GGUF files. ``extra_kv`` holds any other GGUF key-value pairs
    verbatim (key -> serialized type and value), e.g. ``general.alignment``.
    """

    format: Format
    entries: dict[str, Entry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int | None = None
    chunk_size: int | None = None
    extra_kv: dict[str, bytes] = field(default_factory=dict)

    def block_layers(self) -> list[int]:
        """Sorted distinct ``blk.N`` indices with entries, to check an imatrix fits a model."""
        return sorted({int(m.group(1)) for n in self.entries if (m := _BLK_RE.match(n))})


# --------------------------------------------------------------------------- loading


def _cursor(buf: mmap.mmap | bytes, path: str) -> ByteCursor:
    """gguf_header's bounds-checked reader over the whole file, failing with ImatrixErrors."""
    return ByteCursor(buf, path, limit=len(buf), error=ImatrixError, noun="")


def _gguf_string(cur: ByteCursor, what: str) -> str:
    return cur.text(cur.u64(f"length of {what}"), what)


def load_imatrix(path: str | os.PathLike[str]) -> ImatrixData:
    """Read an imatrix in either format (GGUF if it starts with the GGUF magic, else legacy).

    Every length the file claims is checked against the file size before anything is allocated,
    so truncated or garbage input raises :class:`ImatrixError`, never a huge allocation.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4:
                raise ImatrixError(f"{name}: not an imatrix file ({size} bytes)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ImatrixError(f"{name}: cannot read imatrix: {e.strerror or e}") from None
    try:
        cur = _cursor(buf, name)
        if buf[:4] == struct.pack("<I", GGUF_MAGIC):
            return _load_gguf(cur)
        return _load_legacy(cur)
    finally:
        try:
            buf.close()
        except BufferError:  # a view is still referenced (e.g. by a traceback); GC closes it
            pass


def _load_legacy(cur: ByteCursor) -> ImatrixData:
    """Parse the layout of imatrix.cpp's save_imatrix_legacy; stricter than llama.cpp about the trailer."""
    n_entries = cur.i32("entry count")
    if n_entries < 1:
        raise cur.fail(f"not an imatrix file (legacy entry count {n_entries})")
    cur.need(n_entries * _MIN_LEGACY_ENTRY_BYTES, f"{n_entries} entries")
    entries: dict[str, Entry] = {}
    for i in range(n_entries):
        n = cur.i32(f"name length of entry {i}")
        if n < 0:
            raise cur.fail(f"corrupt: entry {i} has name length {n}")
        name = cur.text(n, f"name of entry {i}")
        ncall = cur.i32(f"ncall of '{name}'")
        nval = cur.i32(f"value count of '{name}'")
        if nval < 1:
            raise cur.fail(f"corrupt: entry '{name}' has {nval} values")
        values = cur.floats(nval, cur.pos, f"values of '{name}'")
        cur.pos += 4 * nval
        if name in entries:
            raise cur.fail(f"corrupt: entry '{name}' appears twice")
        entries[name] = LegacyEntry(ncall, values)

    chunk_count: int | None = None
    datasets: list[str] = []
    left = cur.size - cur.pos
    if left == 4:  # chunk count without dataset; llama.cpp accepts it
        chunk_count = cur.i32("chunk count")
    elif left >= 8:
        chunk_count = cur.i32("chunk count")
        n = cur.i32("dataset name length")
        if n < 0 or n != left - 8:
            raise cur.fail(f"corrupt trailer: dataset name length {n}, but {left - 8} bytes follow")
        if n > 0:
            datasets.append(cur.text(n, "dataset name"))
    elif left:
        raise cur.fail(f"truncated or corrupt: {left} stray bytes after the last entry")
    return ImatrixData("dat", entries, datasets, chunk_count, None)


def _skip_value(cur: ByteCursor, vtype: int, key: str) -> None:
    """Advance over one GGUF value of type ``vtype`` (arrays of arrays are invalid, as in gguf.cpp)."""
    if vtype in SCALAR_FORMATS:
        cur.take(SCALAR_FORMATS[GGUFValueType(vtype)][1], f"value of '{key}'")
    elif vtype == GGUFValueType.STRING:
        cur.take(cur.u64(f"length of '{key}'"), f"value of '{key}'")
    elif vtype == GGUFValueType.ARRAY:
        sub = cur.u32(f"array type of '{key}'")
        n = cur.u64(f"array length of '{key}'")
        if sub in SCALAR_FORMATS:
            cur.take(n * SCALAR_FORMATS[GGUFValueType(sub)][1], f"array '{key}'")
        elif sub == GGUFValueType.STRING:
            cur.need(n * 8, f"array '{key}'")
            for _ in range(n):
                cur.take(cur.u64(f"string in '{key}'"), f"string in '{key}'")
        else:
            raise cur.fail(f"corrupt: key '{key}' has invalid array type {sub}")
    else:
        raise cur.fail(f"corrupt: key '{key}' has invalid GGUF type {vtype}")


def _read_u32_kv(cur: ByteCursor, key: str, vtype: int) -> int:
    if vtype != GGUFValueType.UINT32:  # gguf_get_val_u32 asserts on anything else
        raise cur.fail(f"key '{key}' must be UINT32, is GGUF type {vtype}")
    return cur.u32(f"value of '{key}'")


def _load_gguf(cur: ByteCursor) -> ImatrixData:
    """Parse a GGUF imatrix with gguf.cpp's checks, then pair ``.in_sum2``/``.counts`` like imatrix-loader.cpp."""
    cur.take(4, "magic")
    version = cur.u32("version")
    if version & 0xFFFF == 0:
        raise cur.fail(f"GGUF version {version:#x}: big-endian files are not supported")
    if version not in (2, 3):
        raise cur.fail(f"unsupported GGUF version {version}")
    n_tensors = cur.i64("tensor count")
    n_kv = cur.i64("key-value count")
    if n_tensors < 0 or n_kv < 0:
        raise cur.fail(f"corrupt header ({n_tensors} tensors, {n_kv} key-value pairs)")
    cur.need(n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES, "the header")

    datasets: list[str] = []
    chunk_count: int | None = None
    chunk_size: int | None = None
    extra: dict[str, bytes] = {}
    seen: set[str] = set()
    for i in range(n_kv):
        key = _gguf_string(cur, f"key {i}")
        if not key or key in seen:
            raise cur.fail(f"corrupt: key {i} is empty or repeated ('{key}')")
        seen.add(key)
        start = cur.pos
        vtype = cur.u32(f"type of '{key}'")
        if key == KEY_GENERAL_TYPE:
            if vtype != GGUFValueType.STRING:
                raise cur.fail(f"key '{key}' must be a string")
            kind = _gguf_string(cur, f"value of '{key}'")
            if kind != "imatrix":
                raise cur.fail(f"not an imatrix (GGUF general.type is '{kind}')")
        elif key == KEY_DATASETS:
            if vtype != GGUFValueType.ARRAY or cur.u32(f"array type of '{key}'") != GGUFValueType.STRING:
                raise cur.fail(f"key '{key}' must be an array of strings")
            n = cur.u64(f"length of '{key}'")
            cur.need(n * 8, f"'{key}'")
            datasets = [_gguf_string(cur, f"dataset {j}") for j in range(n)]
        elif key == KEY_CHUNK_COUNT:
            chunk_count = _read_u32_kv(cur, key, vtype)
        elif key == KEY_CHUNK_SIZE:
            chunk_size = _read_u32_kv(cur, key, vtype)
        else:
            _skip_value(cur, vtype, key)
            extra[key] = bytes(cur.buf[start : cur.pos])
    alignment = _alignment(extra, str(cur.path))

    infos: list[tuple[str, tuple[int, ...], int, int]] = []  # name, numpy shape, ggml type, offset
    names: set[str] = set()
    for i in range(n_tensors):
        n = cur.u64(f"name length of tensor {i}")
        if n >= GGML_MAX_NAME:
            raise cur.fail(f"corrupt: tensor {i} name is {n} bytes (limit {GGML_MAX_NAME - 1})")
        tname = cur.text(n, f"name of tensor {i}")
        if tname in names:
            raise cur.fail(f"corrupt: tensor '{tname}' appears twice")
        names.add(tname)
        n_dims = cur.u32(f"dimension count of '{tname}'")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"corrupt: tensor '{tname}' has {n_dims} dimensions")
        ne = [cur.i64(f"shape of '{tname}'") for _ in range(n_dims)]
        if any(d < 0 for d in ne):
            raise cur.fail(f"corrupt: tensor '{tname}' has shape {ne}")
        ttype = cur.i32(f"type of '{tname}'")
        infos.append((tname, tuple(reversed(ne)), ttype, cur.u64(f"offset of '{tname}'")))

    data_start = padded(cur.pos, alignment) if infos else cur.pos
    expected = 0
    for tname, shape, ttype, offset in infos:
        if offset != expected:
            raise cur.fail(f"corrupt: tensor '{tname}' at data offset {offset}, expected {expected}")
        expected += padded(_tensor_nbytes(cur, tname, shape, ttype), alignment)
    cur.pos = min(data_start, cur.size)
    cur.need(data_start - cur.pos + expected, "tensor data")

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for tname, shape, ttype, offset in infos:
        for suffix in (SUFFIX_SUMS, SUFFIX_COUNTS):
            if tname.endswith(suffix):
                if ttype != GGMLQuantizationType.F32:
                    raise cur.fail(f"tensor '{tname}' must be F32, is {_type_name(ttype)}")
                count = int(np.prod(shape, dtype=np.int64)) if shape else 1
                arr = cur.floats(count, data_start + offset, f"data of '{tname}'").reshape(shape)
                pairs.setdefault(tname[: -len(suffix)], {})[suffix] = arr
                break
        else:
            logger.warning("%s: ignoring tensor '%s' (not an imatrix .in_sum2/.counts tensor)", cur.path, tname)
    if not pairs:
        raise cur.fail("no imatrix entries (no .in_sum2/.counts tensors)")

    entries: dict[str, Entry] = {}
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise cur.fail(f"entry '{name}' has {'only ' + next(iter(pair))[1:]} but needs in_sum2 and counts")
        entry = GgufEntry(pair[SUFFIX_SUMS], pair[SUFFIX_COUNTS])
        problem = _gguf_entry_problem(entry)
        if problem:
            raise cur.fail(f"entry '{name}': {problem}")
        entries[name] = entry
    return ImatrixData("gguf", entries, datasets, chunk_count, chunk_size, extra)


def _tensor_nbytes(cur: ByteCursor, tname: str, shape: tuple[int, ...], ttype: int) -> int:
    try:
        block = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)][0]
    except (ValueError, KeyError):
        raise cur.fail(f"corrupt: tensor '{tname}' has unknown ggml type {ttype}") from None
    if shape and shape[-1] % block:
        raise cur.fail(f"corrupt: tensor '{tname}' row of {shape[-1]} is not a multiple of {block}")
    return tensor_nbytes(ttype, tuple(reversed(shape)))


def _type_name(ttype: int) -> str:
    try:
        return GGMLQuantizationType(ttype).name
    except ValueError:
        return f"type {ttype}"


def _alignment(extra: dict[str, bytes], where: str) -> int:
    """``general.alignment`` if present (must be a UINT32 power of two, as gguf.cpp demands)."""
    raw = extra.get(KEY_ALIGNMENT)
    if raw is None:
        return GGUF_DEFAULT_ALIGNMENT
    if len(raw) != 8 or struct.unpack_from("<I", raw)[0] != GGUFValueType.UINT32:
        raise ImatrixError(f"{where}: '{KEY_ALIGNMENT}' must be UINT32")
    value = struct.unpack_from("<I", raw, 4)[0]
    if value == 0 or value & (value - 1):
        raise ImatrixError(f"{where}: '{KEY_ALIGNMENT}' is {value}, not a power of 2")
    return value


def _gguf_entry_problem(e: GgufEntry) -> str | None:
    """Why llama.cpp could not use this entry (it would divide by zero or mis-slice), or None."""
    if e.in_sum2.dtype != np.float32 or e.counts.dtype != np.float32:
        return "in_sum2 and counts must be float32"
    if e.counts.size == 0:
        return "counts is empty"
    if e.in_sum2.size % e.counts.size:
        return f"{e.in_sum2.size} sums do not split into {e.counts.size} matrices"
    return None


# --------------------------------------------------------------------------- saving


def _le_f32(arr: np.ndarray) -> memoryview:
    return np.ascontiguousarray(arr, dtype="<f4").data.cast("B")


def _legacy_chunks(data: ImatrixData, where: str) -> Iterator[bytes | memoryview]:
    """The byte stream of imatrix.cpp's save_imatrix_legacy for these entries (in dict order)."""
    if not data.entries:
        raise ImatrixError(f"{where}: no entries to write (llama.cpp rejects an empty imatrix)")
    yield struct.pack("<i", len(data.entries))
    for name, e in data.entries.items():
        if not isinstance(e, LegacyEntry):
            raise ImatrixError(f"{where}: entry '{name}' is not a legacy .dat entry")
        if e.values.ndim != 1 or e.values.size < 1 or e.values.dtype != np.float32:
            raise ImatrixError(f"{where}: entry '{name}' needs a non-empty 1-D float32 array")
        raw = name.encode("utf-8")
        yield struct.pack("<i", len(raw)) + raw + _pack_i32(e.ncall, name, where) + struct.pack("<i", e.values.size)
        yield _le_f32(e.values)
    if data.chunk_count is not None or data.datasets:
        dataset = data.datasets[0].encode("utf-8") if data.datasets else b""
        yield _pack_i32(data.chunk_count or 0, "chunk count", where) + struct.pack("<i", len(dataset)) + dataset


def _pack_i32(value: int, what: str, where: str) -> bytes:
    try:
        return struct.pack("<i", value)
    except struct.error:
        raise ImatrixError(f"{where}: {what} {value} does not fit the legacy format's int32") from None


def _gguf_chunks(data: ImatrixData, where: str) -> Iterator[bytes | memoryview]:
    """The byte stream gguf.cpp's gguf_write_to_file produces for imatrix.cpp's save_imatrix."""
    if not data.entries:
        raise ImatrixError(f"{where}: no entries to write (llama.cpp rejects an empty imatrix)")
    clash = [k for k in data.extra_kv if k in _KNOWN_KEYS]
    if clash:
        raise ImatrixError(f"{where}: extra_kv must not contain {clash}; use the ImatrixData fields")
    alignment = _alignment(data.extra_kv, where)
    kv: list[RawKV | bytes] = [
        RawKV(KEY_GENERAL_TYPE, "imatrix", GGUFValueType.STRING, None),
        RawKV(KEY_DATASETS, list(data.datasets), GGUFValueType.ARRAY, GGUFValueType.STRING),
    ]
    for key, value in ((KEY_CHUNK_COUNT, data.chunk_count), (KEY_CHUNK_SIZE, data.chunk_size)):
        if value is not None:
            if not 0 <= value < 2**32:
                raise ImatrixError(f"{where}: {key} {value} does not fit UINT32")
            kv.append(RawKV(key, value, GGUFValueType.UINT32, None))
    kv.extend(pack_string(key) + raw for key, raw in data.extra_kv.items())

    tensors: list[np.ndarray] = []
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for name, e in data.entries.items():
        if not isinstance(e, GgufEntry):
            raise ImatrixError(f"{where}: entry '{name}' is not a GGUF imatrix entry")
        problem = _gguf_entry_problem(e)
        if problem:
            raise ImatrixError(f"{where}: entry '{name}': {problem}")
        for suffix, arr in ((SUFFIX_SUMS, e.in_sum2), (SUFFIX_COUNTS, e.counts)):
            tname = name + suffix
            if len(tname.encode("utf-8")) >= GGML_MAX_NAME:
                raise ImatrixError(
                    f"{where}: tensor name '{tname}' is longer than llama.cpp's {GGML_MAX_NAME - 1}-byte limit"
                )
            if arr.ndim > GGML_MAX_DIMS:
                raise ImatrixError(f"{where}: entry '{name}' has a {arr.ndim}-D array (GGUF allows {GGML_MAX_DIMS})")
            shape = tuple(reversed(arr.shape))  # ggml ne order
            infos.append((tname, shape, GGMLQuantizationType.F32, tensor_nbytes(GGMLQuantizationType.F32, shape)))
            tensors.append(arr)

    head, _ = pack_header(kv, infos, alignment)
    yield head + bytes(padded(len(head), alignment) - len(head))
    for arr in tensors:
        yield _le_f32(arr)
        yield bytes(padded(4 * arr.size, alignment) - 4 * arr.size)


def save_imatrix(data: ImatrixData, path: str | os.PathLike[str]) -> None:
    """Write ``data`` in its own format with llama.cpp's exact layout, atomically.

    Entries are written in dict order (files loaded from llama.cpp are already sorted, and
    :func:`remap_imatrix` sorts like llama.cpp), so a loaded file saves back byte-identical.
    The bytes go to a temporary file beside ``path`` that is renamed over it only when complete
    (:func:`upscaler.format.atomic.atomic_write`).
    """
    dest = Path(path)
    where = os.fspath(path)
    if data.format == "dat":
        chunks: Iterable[bytes | memoryview] = _legacy_chunks(data, where)
    elif data.format == "gguf":
        chunks = _gguf_chunks(data, where)
    else:
        raise ImatrixError(f"{where}: unknown imatrix format {data.format!r}")
    try:
        atomic_write(dest, chunks)
    except OSError as e:
        raise ImatrixError(f"{where}: cannot write imatrix: {e.strerror or e}") from None


# --------------------------------------------------------------------------- remapping


def _default_non_block_model(name: str, first: str, last: str) -> str:
    """mergekit's rule: embeddings come from the first slice's model, everything else from the last."""
    return first if name.split(".", 1)[0] in ("token_embd", "per_layer_token_embd") else last


def remap_imatrix(
    per_model: dict[str, ImatrixData],
    layer_sources: list[tuple[str, int]],
    *,
    non_block_model: dict[str, str] | None = None,
) -> ImatrixData:
    """Renumber imatrix entries for an upscaled model: output layer ``i`` gets the ``blk.j.*`` of its source.

    ``layer_sources[i] = (model, j)``. Duplicated layers get renamed copies that share the
    (read-only) arrays. Non-block entries (``output.weight``, ...) come from the model that
    ``non_block_model`` names for them (key: the entry name, or its first dotted part such as
    ``output``); unnamed ones follow mergekit (``token_embd*`` from the first layer's model,
    the rest from the last layer's), which with one model is simply that model. A model that
    lacks a given non-block entry contributes nothing for it.

    Metadata: datasets are the single model's list, or the order-preserving union of the
    models' lists. ``chunk_count`` and ``chunk_size`` are the minimum over the models used
    (``None`` if any model lacks them), so the result never claims more data than its weakest
    source. ``extra_kv`` comes from the first layer's model. Entries are sorted by name, as
    llama.cpp writes them.
    """
    if not layer_sources:
        raise ImatrixError("cannot remap an imatrix onto zero layers")
    for model, layer in layer_sources:
        if model not in per_model:
            known = ", ".join(sorted(per_model)) or "none"
            raise ImatrixError(f"no imatrix given for model '{model}' (have: {known})")
        if not isinstance(layer, int) or layer < 0:
            raise ImatrixError(f"invalid source layer {layer!r} for model '{model}'")
    first, last = layer_sources[0][0], layer_sources[-1][0]
    non_block_model = dict(non_block_model or {})
    for model in non_block_model.values():
        if model not in per_model:
            known = ", ".join(sorted(per_model)) or "none"
            raise ImatrixError(f"no imatrix given for model '{model}' (have: {known})")

    used = list(dict.fromkeys([m for m, _ in layer_sources] + list(non_block_model.values())))
    formats = {m: per_model[m].format for m in used}
    if len(set(formats.values())) > 1:
        listing = ", ".join(f"{m}: {f}" for m, f in formats.items())
        raise ImatrixError(
            f"cannot combine legacy .dat and GGUF imatrix files ({listing}); "
            "convert them to one format first (llama-imatrix --in-file X.dat -o X.gguf)"
        )

    # per model: source layer -> [(rest of name, entry)], in file order
    by_layer: dict[str, dict[int, list[tuple[str, Entry]]]] = {}
    for m in used:
        index: dict[int, list[tuple[str, Entry]]] = {}
        for name, e in per_model[m].entries.items():
            if (match := _BLK_RE.match(name)) is not None:
                index.setdefault(int(match.group(1)), []).append((name[match.end() :], e))
        by_layer[m] = index

    out: dict[str, Entry] = {}
    for i, (m, j) in enumerate(layer_sources):
        found = by_layer[m].get(j)
        if not found:
            have = sorted(by_layer[m])
            span = f"layers {have[0]}-{have[-1]}" if have else "no layers"
            raise ImatrixError(f"imatrix of model '{m}' has no entries for layer {j} (it covers {span})")
        for rest, e in found:
            out[f"blk.{i}.{rest}"] = replace(e)

    non_block_names = dict.fromkeys(
        n for m in used for n in per_model[m].entries if _BLK_RE.match(n) is None
    )
    for name in non_block_names:
        src = non_block_model.get(name) or non_block_model.get(name.split(".", 1)[0])
        src = src or _default_non_block_model(name, first, last)
        found_entry = per_model[src].entries.get(name)
        if found_entry is not None:
            out[name] = replace(found_entry)

    sources = [per_model[m] for m in used]
    if len(sources) == 1:
        datasets = list(sources[0].datasets)
    else:
        datasets = list(dict.fromkeys(d for s in sources for d in s.datasets))
    chunk_counts = [s.chunk_count for s in sources]
    chunk_sizes = [s.chunk_size for s in sources]
    return ImatrixData(
        format=formats[used[0]],
        entries={n: out[n] for n in sorted(out, key=lambda s: s.encode("utf-8"))},
        datasets=datasets,
        chunk_count=None if None in chunk_counts else min(c for c in chunk_counts if c is not None),
        chunk_size=None if None in chunk_sizes else min(c for c in chunk_sizes if c is not None),
        extra_kv=dict(per_model[first].extra_kv),
    )


# --------------------------------------------------------------------------- what llama-quantize uses


def _require_quantize_metadata(data: ImatrixData) -> None:
    """llama-quantize exits on a GGUF imatrix without chunk metadata; refuse the same files."""
    if data.format == "gguf" and (data.chunk_count is None or data.chunk_size is None):
        missing = [k for k, v in ((KEY_CHUNK_COUNT, data.chunk_count), (KEY_CHUNK_SIZE, data.chunk_size)) if v is None]
        raise ImatrixError(f"GGUF imatrix lacks {', '.join(missing)}; llama-quantize refuses such files")


def _lround(x: np.ndarray) -> np.ndarray:
    """C ``lround`` (halves away from zero), computed in double like the C call on a float."""
    x64 = x.astype(np.float64)
    return np.where(x64 >= 0, np.floor(x64 + 0.5), np.ceil(x64 - 0.5))


def quantize_entries(data: ImatrixData) -> dict[str, np.ndarray]:
    """The per-tensor float32 arrays llama-quantize passes as ``llama_model_imatrix_data``.

    Mirrors quantize.cpp's load_imatrix: legacy ``values / ncall`` (or ``values`` when
    ``ncall <= 0``); GGUF per matrix ``in_sum2 / lround(count)`` (all ones where the count
    rounds to <= 0), in float32 arithmetic. Raises where llama.cpp would refuse the data:
    missing GGUF metadata, or non-finite values (llama_model_quantize throws on those).
    """
    _require_quantize_metadata(data)
    out: dict[str, np.ndarray] = {}
    for name, e in data.entries.items():
        if isinstance(e, LegacyEntry):
            values = np.ascontiguousarray(e.values, dtype=np.float32).reshape(-1)
            arr = values / np.float32(e.ncall) if e.ncall > 0 else values.copy()
        else:
            problem = _gguf_entry_problem(e)
            if problem:
                raise ImatrixError(f"imatrix entry '{name}': {problem}")
            counts = e.counts.reshape(-1)
            if not np.isfinite(counts).all():
                raise ImatrixError(f"imatrix entry '{name}' has non-finite counts")
            count = _lround(counts).astype(np.float32)
            sums = np.ascontiguousarray(e.in_sum2, dtype=np.float32).reshape(counts.size, -1)
            with np.errstate(divide="ignore", invalid="ignore"):
                arr = np.where(count[:, None] > 0, sums / count[:, None], np.float32(1)).astype(np.float32)
            arr = arr.reshape(-1)
        if not np.isfinite(arr).all():
            raise ImatrixError(f"imatrix entry '{name}' has non-finite values; llama.cpp would refuse it")
        out[name] = arr
    return out


def _truncate_utf8(s: str, limit: int) -> str:
    """strncpy(.., limit): keep at most ``limit`` bytes (dropping a character cut in half)."""
    return s.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def imatrix_metadata(data: ImatrixData, path: str | os.PathLike[str]) -> dict[str, MetadataValue]:
    """The ``quantize.imatrix.*`` keys llama-quantize writes into its output, with their GGUF types.

    ``path`` is recorded as given (llama-quantize records its ``--imatrix`` argument verbatim).
    Strings are cut to 127 bytes like its ``kv_override``; integer overrides are written as
    UINT32 by llama_model_quantize, so those are UINT32 here. ``chunks_count`` only when > 0.
    """
    _require_quantize_metadata(data)
    if not data.entries:
        return {}
    meta: dict[str, MetadataValue] = {
        KEY_QUANTIZE_FILE: (GGUFValueType.STRING, _truncate_utf8(os.fspath(path), _KV_OVERRIDE_STR_MAX)),
    }
    if data.datasets:
        meta[KEY_QUANTIZE_DATASET] = (GGUFValueType.STRING, _truncate_utf8(data.datasets[0], _KV_OVERRIDE_STR_MAX))
    meta[KEY_QUANTIZE_N_ENTRIES] = (GGUFValueType.UINT32, len(data.entries) % 2**32)
    if data.chunk_count is not None and data.chunk_count > 0:
        meta[KEY_QUANTIZE_N_CHUNKS] = (GGUFValueType.UINT32, data.chunk_count % 2**32)
    return meta
