"""llama-quantize, rebuilt from llama.cpp's own pieces: the oracle the quantizing tests compare with.

Shares no code with upscaler/: the ftype comes from llama-cpp-python's LLAMA_FTYPE_* constants
(by llama-quantize's type name), importance matrices are read with gguf-py's GGUFReader (GGUF
form) or by a few struct calls (legacy .dat form) and normalized as tools/quantize/quantize.cpp's
load_imatrix does, and the metadata llama-quantize records about the matrix goes in as the same
kv overrides, in the same order (quantize.cpp, main()).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as ll
import numpy as np
from gguf import GGUFReader

# llama-quantize's names that are not LLAMA_FTYPE_MOSTLY_<NAME> (quantize.cpp QUANT_OPTIONS)
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def ftype_of(name: str) -> int:
    """llama_ftype for a llama-quantize type name, from llama-cpp-python's constants."""
    name = ALIASES.get(name.upper(), name.upper())
    if name in ("F32", "COPY"):
        return ll.LLAMA_FTYPE_ALL_F32
    value = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if value is None:
        raise KeyError(f"llama_cpp has no LLAMA_FTYPE_MOSTLY_{name}")
    return int(value)


@dataclass
class Imatrix:
    """What quantize.cpp's load_imatrix hands on: per-tensor importances, datasets, chunk count."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0


def read_imatrix(path: Path) -> Imatrix:
    if Path(path).read_bytes()[:4] == b"GGUF":
        return _read_gguf(Path(path))
    return _read_legacy(Path(path))


def _read_gguf(path: Path) -> Imatrix:
    r = GGUFReader(path)
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in r.tensors}
    out = Imatrix()
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors[base + ".counts"]
        ne0 = sums.size // counts.size
        e = np.empty_like(sums)
        for j, c in enumerate(counts):
            e[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / np.float32(c) if c > 0 else 1.0
        out.values[base] = e
    f = r.fields.get("imatrix.datasets")
    if f is not None:
        out.datasets = [bytes(f.parts[i]).decode() for i in f.data]
    f = r.fields.get("imatrix.chunk_count")
    out.chunk_count = int(f.parts[f.data[0]][0]) if f is not None else 0
    return out


def _read_legacy(path: Path) -> Imatrix:
    b = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, b, pos)
        pos += struct.calcsize(fmt)
        return v

    out = Imatrix()
    (n,) = take("<i")
    for _ in range(n):
        (ln,) = take("<i")
        name = b[pos:pos + ln].decode()
        pos += ln
        ncall, nval = take("<ii")
        sums = np.frombuffer(b, np.float32, nval, pos).copy()
        pos += 4 * nval
        out.values[name] = sums / np.float32(ncall) if ncall > 0 else sums
    if pos < len(b):
        (out.chunk_count,) = take("<i")
        if pos < len(b):
            (ln,) = take("<i")
            out.datasets = [b[pos:pos + ln].decode()]
    return out


def llama_quantize(src: Path, dst: Path, type_name: str, *, imatrix: Imatrix | None = None,
                   imatrix_file: str | None = None, allow_requantize: bool = True,
                   entries_count: int | None = None) -> Path:
    """What `llama-quantize [--allow-requantize] [--imatrix FILE] SRC DST TYPE` does.

    `entries_count` overrides the recorded entry count (for a matrix renamed after loading)."""
    p = ll.llama_model_quantize_default_params()
    p.ftype = ftype_of(type_name)
    p.only_copy = type_name.upper() == "COPY"
    p.allow_requantize = allow_requantize
    p.nthread = 1
    keep: list[object] = []
    if imatrix is not None and imatrix.values:
        arr = (ll.llama_model_imatrix_data * (len(imatrix.values) + 1))()
        for i, (name, v) in enumerate(imatrix.values.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            key = name.encode()
            keep += [v, key]
            arr[i].name, arr[i].data, arr[i].size = key, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        p.imatrix = arr
        kvs: list[tuple[str, str | int]] = [("quantize.imatrix.file", imatrix_file or "")]
        if imatrix.datasets:
            kvs.append(("quantize.imatrix.dataset", imatrix.datasets[0]))
        kvs.append(("quantize.imatrix.entries_count",
                    len(imatrix.values) if entries_count is None else entries_count))
        if imatrix.chunk_count > 0:
            kvs.append(("quantize.imatrix.chunks_count", imatrix.chunk_count))
        ov = (ll.llama_model_kv_override * (len(kvs) + 1))()
        for o, (key, value) in zip(ov, kvs):
            o.key = key.encode()
            if isinstance(value, str):
                o.tag = ll.LLAMA_KV_OVERRIDE_TYPE_STR
                o.value.val_str = value.encode()[:127]
            else:
                o.tag = ll.LLAMA_KV_OVERRIDE_TYPE_INT
                o.value.val_i64 = value
        p.kv_overrides = ov
        keep += [arr, ov]
    rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize {src} -> {type_name} failed ({rc})"
    return dst
