"""Thin ctypes bindings to the ggml bundled with llama-cpp-python.

Quantizing through the very library llama.cpp's quantizer uses is what makes our bytes
identical to `llama-quantize`'s: same kernels, same dequantization (`llama_tensor_dequantize_impl`
uses ggml_fp16_to_fp32_row / ggml_bf16_to_fp32_row / type_traits->to_float, so do we).

Type arguments are ggml type ids (`gguf.GGMLQuantizationType` members are fine). ctypes releases
the GIL during foreign calls, so `quantize_tensor` scales across cores with plain Python threads.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import QuantizeError

# llama_tensor_quantize_impl's chunk: at least 32*512 elements, in whole rows.
MIN_CHUNK_ELEMENTS = 32 * 512


class _TypeTraits(ctypes.Structure):
    """`struct ggml_type_traits` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

F32, F16, BF16 = 0, 1, 30
# ggml_quantize_chunk's switch (ggml.c); any other type aborts the whole process.
QUANTIZABLE: frozenset[int] = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23,
                                         29, 30, 34, 35, 39, 40, 41, 42})
# ggml.h of the pinned llama-cpp-python (0.3.36); the library does not export it, and indexing
# its type_traits table past the end is undefined behaviour. Checked against the library on load.
GGML_TYPE_COUNT = 43


def lib_dir() -> Path:
    """Directory of the shared libraries llama-cpp-python loaded (honours LLAMA_CPP_LIB_PATH)."""
    import llama_cpp.llama_cpp as ll

    return Path(ll._lib._name).parent


@cache
def _lib() -> ctypes.CDLL:
    path = lib_dir() / "libggml-base.so"
    lib = ctypes.CDLL(os.fspath(path))
    sig = {
        "ggml_type_name": ([ctypes.c_int], ctypes.c_char_p),
        "ggml_blck_size": ([ctypes.c_int], ctypes.c_int64),
        "ggml_type_size": ([ctypes.c_int], ctypes.c_size_t),
        "ggml_row_size": ([ctypes.c_int, ctypes.c_int64], ctypes.c_size_t),
        "ggml_is_quantized": ([ctypes.c_int], ctypes.c_bool),
        "ggml_get_type_traits": ([ctypes.c_int], ctypes.POINTER(_TypeTraits)),
        "ggml_quantize_init": ([ctypes.c_int], None),
        "ggml_quantize_requires_imatrix": ([ctypes.c_int], ctypes.c_bool),
        "ggml_quantize_chunk": (
            [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_void_p],
            ctypes.c_size_t,
        ),
        "ggml_validate_row_data": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_bool),
        "ggml_fp16_to_fp32_row": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None),
        "ggml_bf16_to_fp32_row": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None),
    }
    for name, (argtypes, restype) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    if lib.ggml_type_name(GGML_TYPE_COUNT - 1) != b"q2_0":
        raise QuantizeError(f"{path}: unexpected ggml build (type table differs from llama-cpp-python 0.3.36)")
    return lib


def _check_type(t: int) -> int:
    t = int(t)
    if not 0 <= t < GGML_TYPE_COUNT or _lib().ggml_blck_size(t) <= 0:
        raise QuantizeError(f"unknown ggml type id {t}")
    return t


def type_name(t: int) -> str:
    """ggml's own name of a type ("q4_K", "f16", "iq4_xs"): what llama.cpp prints in its logs."""
    return _lib().ggml_type_name(_check_type(t)).decode()


@cache
def type_by_name() -> dict[str, int]:
    """ggml type name -> id, for every type this ggml knows."""
    lib = _lib()
    return {lib.ggml_type_name(t).decode(): t for t in range(GGML_TYPE_COUNT) if lib.ggml_blck_size(t) > 0}


def block_size(t: int) -> int:
    """Elements per block (256 for k-quants, 32 for Q8_0, 1 for F16)."""
    return int(_lib().ggml_blck_size(_check_type(t)))


def type_size(t: int) -> int:
    """Bytes per block."""
    return int(_lib().ggml_type_size(_check_type(t)))


def row_size(t: int, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` elements (must be a multiple of the block size)."""
    t = _check_type(t)
    if n_per_row % block_size(t):
        raise QuantizeError(f"rows of {n_per_row} elements cannot be stored as {type_name(t)} "
                            f"(block size {block_size(t)})")
    return int(_lib().ggml_row_size(t, n_per_row))


def is_quantized(t: int) -> bool:
    """Block-quantized (as opposed to F32/F16/BF16 or integer types)."""
    return bool(_lib().ggml_is_quantized(_check_type(t)))


def requires_imatrix(t: int) -> bool:
    """ggml refuses (asserts) to quantize these types without an importance matrix."""
    return bool(_lib().ggml_quantize_requires_imatrix(_check_type(t)))


def can_dequantize(t: int) -> bool:
    """Whether llama.cpp's quantizer can read this type as a source (F32, F16, BF16, quantized with to_float)."""
    t = _check_type(t)
    if t in (F32, F16, BF16):
        return True
    return is_quantized(t) and bool(_lib().ggml_get_type_traits(t).contents.to_float)


def can_requantize(t: int) -> bool:
    """Whether tensors of this type can be dequantized and quantized back to it (IQ1/IQ2 need an imatrix)."""
    return can_dequantize(t) and int(t) in QUANTIZABLE


def validate_rows(t: int, data: np.ndarray | bytes | bytearray | memoryview) -> bool:
    """ggml_validate_row_data: no NaN/inf scales etc. (llama.cpp checks every quantized chunk)."""
    data = _as_bytes(data)
    return bool(_lib().ggml_validate_row_data(_check_type(t), data.ctypes.data, data.nbytes))


def _n_rows(raw: np.ndarray, t: int, n_per_row: int) -> int:
    rs = row_size(t, n_per_row)
    if raw.nbytes % rs:
        raise QuantizeError(f"{raw.nbytes} bytes is not a whole number of {type_name(t)} rows of {n_per_row}")
    return raw.nbytes // rs


def _as_bytes(raw: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """A flat uint8 view of tensor bytes (no copy for contiguous arrays and buffers)."""
    if isinstance(raw, np.ndarray):
        return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return np.frombuffer(raw, dtype=np.uint8)


def dequantize_rows(src_type: int, raw: np.ndarray | bytes | bytearray | memoryview, n_per_row: int,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Raw tensor bytes -> float32 [nrows, n_per_row], exactly the floats llama.cpp's quantizer sees."""
    src_type = _check_type(src_type)
    raw = _as_bytes(raw)
    nrows = _n_rows(raw, src_type, n_per_row)
    n = nrows * n_per_row
    if out is None:
        out = np.empty((nrows, n_per_row), dtype=np.float32)
    elif out.dtype != np.float32 or not out.flags.c_contiguous or out.size != n:
        raise ValueError("out must be a C-contiguous float32 array of nrows*n_per_row elements")
    lib = _lib()
    if src_type == F32:
        out.reshape(-1)[:] = raw.view(np.float32)
    elif src_type == F16:
        lib.ggml_fp16_to_fp32_row(raw.ctypes.data, out.ctypes.data, n)
    elif src_type == BF16:
        lib.ggml_bf16_to_fp32_row(raw.ctypes.data, out.ctypes.data, n)
    elif can_dequantize(src_type):
        _TO_FLOAT(lib.ggml_get_type_traits(src_type).contents.to_float)(raw.ctypes.data, out.ctypes.data, n)
    else:
        raise QuantizeError(f"cannot convert tensor type {type_name(src_type)} to float")
    return out.reshape(nrows, n_per_row)


def _check_imatrix(imatrix: np.ndarray | None, n_mat: int, n_per_row: int) -> np.ndarray | None:
    if imatrix is None:
        return None
    im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if im.size != n_mat * n_per_row:
        raise QuantizeError(f"imatrix has {im.size} values, tensor needs {n_mat * n_per_row}")
    return im


def quantize_rows(dst_type: int, f32: np.ndarray, imatrix: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows [nrows, n_per_row] on the calling thread; returns the uint8 bytes."""
    return quantize_tensor(f32, dst_type, imatrix, n_threads=1, out=out)


def quantize_tensor(f32: np.ndarray, dst_type: int, imatrix: np.ndarray | None = None, n_threads: int = 1,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Quantize a [nrows, n_per_row] (or [n_expert, nrows, n_per_row]) float32 tensor in parallel.

    Quantization is per row, so any split into whole rows gives the same bytes; chunks never
    cross an expert matrix, whose imatrix slice (`imatrix` is [n_per_row] or [n_expert, n_per_row])
    differs. Writes into `out` (uint8, exact size) when given, so a tensor costs its float32
    copy plus its quantized bytes and nothing more.
    """
    dst_type = _check_type(dst_type)
    if dst_type not in QUANTIZABLE:
        raise QuantizeError(f"ggml cannot quantize to {type_name(dst_type)}")
    x = np.ascontiguousarray(f32, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D array, got shape {f32.shape}")
    n_mat, nrows, n_per_row = x.shape
    rs = row_size(dst_type, n_per_row)
    im = _check_imatrix(imatrix, n_mat, n_per_row)
    if im is None and requires_imatrix(dst_type):
        raise QuantizeError(f"quantizing to {type_name(dst_type)} requires an importance matrix")
    total = n_mat * nrows * rs
    if out is None:
        out = np.empty(total, dtype=np.uint8)
    elif out.dtype != np.uint8 or not out.flags.c_contiguous or out.nbytes != total:
        raise ValueError(f"out must be a C-contiguous uint8 array of {total} bytes")
    lib = _lib()
    lib.ggml_quantize_init(dst_type)  # builds IQ grids once, before threads race for them

    # Few big chunks keep Python's per-call overhead negligible; at least llama.cpp's minimum.
    min_rows = -(-MIN_CHUNK_ELEMENTS // n_per_row)
    rows_per_chunk = max(min_rows, -(-nrows // max(1, 4 * n_threads)))
    jobs = [(m, r, min(rows_per_chunk, nrows - r)) for m in range(n_mat) for r in range(0, nrows, rows_per_chunk)]
    src_base, dst_base = x.ctypes.data, out.ctypes.data

    def run(job: tuple[int, int, int]) -> None:
        m, r, n = job
        row0 = m * nrows + r
        src = src_base + row0 * n_per_row * 4
        dst = dst_base + row0 * rs
        imp = im[m * n_per_row:].ctypes.data if im is not None else None
        size = lib.ggml_quantize_chunk(dst_type, src, dst, 0, n, n_per_row, imp)
        if size != n * rs or not lib.ggml_validate_row_data(dst_type, dst, size):
            raise QuantizeError(f"quantized data validation failed ({type_name(dst_type)})")

    if n_threads <= 1 or len(jobs) == 1:
        for job in jobs:
            run(job)
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for _ in pool.map(run, jobs):
                pass
    return out
