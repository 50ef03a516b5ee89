"""Tensor contents: copy, zero or scale a source tensor into a sink, one bounded chunk at a time.

Copies go through the sink's `copy_from` so the kernel can move the bytes (copy_file_range)
without them ever entering this process. `Emitter` writes each distinct content once: a
duplicated tensor (same source, same scale) is copied from its first copy in the output, which
a reflink filesystem clones instead of writing again (see writer.FileSink.copy_from). Zero is
all-zero bytes, which is 0.0 in every GGML type (every block format multiplies by a zero scale).
Other scales dequantize, scale and re-quantize to the same type, row-chunk by row-chunk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..errors import UpscaleError
from ..planning.output import OutTensor
from ..quant.quant_types import TENSOR_TYPES_NEEDING_IMATRIX
from .source import TensorReader, row_bytes

CHUNK = 16 * 1024 * 1024
PLAIN_FLOAT = {Q.F32: np.float32, Q.F16: np.float16}


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def copy_from(self, src_fd: int, offset: int, size: int) -> None: ...


def check_scalable(t: OutTensor) -> None:
    """Raise before writing when a non-zero, non-unit scale cannot be applied to this type."""
    if t.op != "scale":
        return
    typ = t.source.ggml_type
    if typ in PLAIN_FLOAT or typ == Q.BF16:
        return
    if typ in TENSOR_TYPES_NEEDING_IMATRIX:  # re-quantizing them (to scale) needs an importance matrix
        raise UpscaleError(f"{t.name}: scaling a {typ.name} tensor by {t.factor} needs re-quantization with an "
                           "importance matrix, which is not supported; use scale 0 or 1, or an F16/Q8_0/K-quant source")
    from ..quant import ggml
    if not ggml.can_requantize(typ):
        raise UpscaleError(f"{t.name}: scaling {typ.name} tensors (factor {t.factor}) is not supported yet")


def _rows_per_chunk(t: OutTensor) -> int:
    rb = row_bytes(t.source.ggml_type, t.shape[0])
    return max(1, CHUNK // max(rb, 1))


def _bf16_bits(f: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even and keeping NaNs quiet (ggml's fp32_to_bf16,
    torch's .to(bfloat16))."""
    u = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    rounded[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return rounded


def _round_to(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """`x` rounded to mergekit's `dtype` (a torch dtype name), as float32 (float64 stays float64)."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (_bf16_bits(x.astype(np.float32)).astype(np.uint32) << 16).view(np.float32)
    if dtype == "float64":
        return x.astype(np.float64)
    if dtype == "float32":
        return x.astype(np.float32)
    return x


def scale_values(x: np.ndarray, factor: float, dtype: str | None = None,
                 out_dtype: str | None = None) -> np.ndarray:
    """mergekit's `tensor * scale` in its merge dtype: the input is cast to `dtype`, multiplied
    as torch does (float32 arithmetic for float16/bfloat16/float32, the scalar rounded to
    float32; float64 in float64), the product rounded to `dtype`, then to `out_dtype` (what
    mergekit saves), and handed on as float32 (convert_hf_to_gguf's first step)."""
    x = _round_to(x, dtype)
    if dtype == "float64":
        y = x * float(factor)
    else:
        y = x.astype(np.float32) * np.float32(factor)
    y = _round_to(_round_to(y, dtype), out_dtype)
    return y.astype(np.float32)


def scaled_rows(raw: bytearray, typ: Q, n_per_row: int, factor: float,
                dtype: str | None = None, out_dtype: str | None = None) -> bytes:
    """Dequantize rows of `typ`, multiply by `factor` (through mergekit's `dtype`, see
    scale_values), store back in `typ`."""
    if typ in PLAIN_FLOAT:
        arr = np.frombuffer(raw, dtype=PLAIN_FLOAT[typ]).astype(np.float32)
        return scale_values(arr, factor, dtype, out_dtype).astype(PLAIN_FLOAT[typ]).tobytes()
    if typ == Q.BF16:
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return _bf16_bits(scale_values(bits.view(np.float32), factor, dtype, out_dtype)).tobytes()
    from ..quant import ggml
    f32 = ggml.dequantize_rows(typ, np.frombuffer(raw, dtype=np.uint8), n_per_row)
    f32 = scale_values(f32.reshape(-1, n_per_row), factor, dtype, out_dtype)
    return bytes(ggml.quantize_tensor(f32, typ, None, n_threads=1))


def emit(t: OutTensor, reader: TensorReader, sink: Sink) -> None:
    """Write the bytes of output tensor `t` into `sink`."""
    src = t.source
    if t.op == "copy":
        sink.copy_from(reader.fd(src.path), src.offset, src.n_bytes)
        return
    if t.op == "zero":
        zeros = bytes(min(CHUNK, src.n_bytes))
        left = src.n_bytes
        while left:
            n = min(left, len(zeros))
            sink.write(memoryview(zeros)[:n])
            left -= n
        return
    if t.op == "scale":
        n_per_row = t.shape[0]
        rb = row_bytes(src.ggml_type, n_per_row)
        step = _rows_per_chunk(t) * rb
        for start in range(0, src.n_bytes, step):
            raw = reader.read(src, start, min(step, src.n_bytes - start))
            sink.write(scaled_rows(raw, src.ggml_type, n_per_row, t.factor, t.dtype, t.out_dtype))
        return
    raise UpscaleError(f"{t.name}: operation {t.op!r} is not produced by the upscaler writer")


class FirstCopies:
    """Where each distinct content (OutTensor.content_key) was first written in the output, so a
    duplicate is copied from there (in the kernel; cloned on reflink filesystems) instead of
    being produced again. Keeps read-only fds on the output files; close() releases them."""

    def __init__(self) -> None:
        self._first: dict[tuple, tuple[Path, int, str]] = {}
        self._fds: dict[Path, int] = {}

    def copy_if_seen(self, t: OutTensor, sink) -> str | None:
        """Copy `t` from its first copy into `sink` and return that copy's tensor name, or None."""
        first = self._first.get(t.content_key)
        if first is None:
            return None
        path, offset, name = first
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        sink.copy_from(fd, offset, t.size)
        return name

    def record(self, t: OutTensor, path: Path, offset: int) -> None:
        self._first[t.content_key] = (path, offset, t.name)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Emitter:
    """`emit` for the writer, with duplicated tensors copied from their first copy in the output.

    Needs a sink with `path` and `position()` (writer.FileSink). Use as a context manager: it
    keeps read-only fds on the output files it has written."""

    def __init__(self, reader: TensorReader) -> None:
        self.reader = reader
        self.reused = 0
        self._copies = FirstCopies()

    def __call__(self, t: OutTensor, sink) -> None:
        if self._copies.copy_if_seen(t, sink) is not None:
            self.reused += 1
            return
        start = sink.position()
        emit(t, self.reader, sink)
        self._copies.record(t, sink.path, start)

    def close(self) -> None:
        self._copies.close()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
