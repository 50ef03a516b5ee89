"""Streaming digests for `verify`: sha256 per fixed piece of a byte stream, windows into a
recomputation, and value validation, so memory stays bounded by a piece whatever the tensor size.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

from ..errors import SourceError, UpscaleError
from ..format.source import SourceTensor, TensorReader

CHUNK = 16 * 1024 * 1024

Consumer = Callable[[Any], None]
Producer = Callable[[Consumer], None]


# --------------------------------------------------------------------------- streaming digests


def _view(data: Any) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class Digests:
    """sha256 of each `chunk`-byte piece of a byte stream fed in arbitrary pieces."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.digests: list[bytes] = []
        self.total = 0
        self._h = hashlib.sha256()
        self._left = chunk

    def __call__(self, data: Any) -> None:
        mv = _view(data)
        self.total += len(mv)
        while len(mv):
            n = min(len(mv), self._left)
            self._h.update(mv[:n])
            mv = mv[n:]
            self._left -= n
            if self._left == 0:
                self.digests.append(self._h.digest())
                self._h, self._left = hashlib.sha256(), self.chunk

    def result(self) -> tuple[int, tuple[bytes, ...]]:
        tail = [self._h.digest()] if self._left != self.chunk else []
        return self.total, tuple(self.digests + tail)


class _Stop(Exception):
    pass


class _Window:
    """Keep bytes [start, end) of a stream; stop the producer once they are in."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.pos = start, end, 0
        self.data = bytearray()

    def __call__(self, data: Any) -> None:
        mv = _view(data)
        a, b = max(self.start, self.pos), min(self.end, self.pos + len(mv))
        if a < b:
            self.data += mv[a - self.pos:b - self.pos]
        self.pos += len(mv)
        if self.pos >= self.end:
            raise _Stop


def window(produce: Producer, start: int, end: int) -> bytes:
    w = _Window(start, end)
    try:
        produce(w)
    except _Stop:
        pass
    return bytes(w.data)


class Feed:
    """`tensor_data.emit`'s sink, feeding a consumer instead of a file."""

    def __init__(self, consume: Consumer) -> None:
        self.consume = consume

    def write(self, data: Any) -> None:
        self.consume(data)

    def copy_from(self, src_fd: int, offset: int, size: int) -> None:
        buf = bytearray(min(size, CHUNK))
        view = memoryview(buf)
        done = 0
        while done < size:
            n = os.preadv(src_fd, [view[:min(len(buf), size - done)]], offset + done)
            if n == 0:
                raise SourceError("a source file ended early while reading a tensor (truncated?)")
            self.consume(view[:n])
            done += n


def chunk_for(typ: Q) -> int:
    """Pieces of whole ggml blocks, so each piece can be validated on its own."""
    size = GGML_QUANT_SIZES[typ][1]
    return CHUNK - CHUNK % size


def read_tensor(reader: TensorReader, t: SourceTensor, consume: Consumer, chunk: int) -> None:
    for start in range(0, t.n_bytes, chunk):
        consume(reader.read(t, start, min(chunk, t.n_bytes - start)))


_NP_FLOATS = {Q.F32: np.float32, Q.F16: np.float16}


def valid_values(typ: Q, data: Any) -> bool:
    """No NaN/inf values (floats) or block scales (quantized types), as ggml_validate_row_data checks."""
    if typ in _NP_FLOATS:
        return bool(np.isfinite(np.frombuffer(data, _NP_FLOATS[typ])).all())
    if typ == Q.BF16:
        return not bool(((np.frombuffer(data, np.uint16) & 0x7F80) == 0x7F80).any())
    from ..quant import ggml
    # ggml prints its finding to stderr itself; keep the terminal to our one-line problems
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            try:
                return ggml.validate_rows(int(typ), np.frombuffer(data, np.uint8))
            except UpscaleError:
                return True  # a type ggml cannot validate
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def first_difference(a: bytes, b: bytes) -> tuple[int, int]:
    """(index of the first differing byte, number of differing bytes) of two equal-length pieces."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n))
    if len(diff) == 0:
        return n, abs(len(a) - len(b))
    return int(diff[0]), int(len(diff)) + abs(len(a) - len(b))
