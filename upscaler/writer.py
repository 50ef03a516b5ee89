"""Streaming GGUF writer: atomic, split-aware, bounded memory. It knows bytes, not recipes.

Header, key/values and tensor infos are serialized here (gguf-py's GGUFWriter packs arrays item
by item, refuses empty arrays and owns its files, none of which suits a streaming, atomic
writer); shard layout and names follow gguf-split and llama.cpp. Tensor data is streamed by the
caller's `emit` function into a sink, tensor by tensor, padded to the alignment.

Everything is written into a temporary folder beside the destination and renamed into place
only when complete, last shard first, so the first shard — the one llama.cpp opens — appears
last. Like cp, gguf-split and llama-quantize, it does not fsync: a killed or interrupted
process cannot leave a partial file under the final name, a power cut is not covered.
An interrupted run leaves no output; a killed run leaves only a clearly named
`.NAME.gguf-upscale-tmp.PID` folder, which the next run removes.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from gguf import GGUFValueType as T
from gguf.constants import GGUF_MAGIC

from .errors import OutputError, SourceError
from .gguf_header import NUMPY_DTYPES, SCALAR_FORMATS
from .output import OutputModel, OutTensor
from .source import KV

TMP_MARK = ".gguf-upscale-tmp."
SPACE_MARGIN = 64 * 1024 * 1024


class Progress(Protocol):
    def start(self, total_bytes: int, total_tensors: int) -> None: ...

    def advance(self, tensor: OutTensor, n_bytes: int) -> None: ...

    def finish(self) -> None: ...


class _NoProgress:
    def start(self, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, tensor: OutTensor, n_bytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


class FileSink:
    """Where `emit` puts a tensor's bytes: buffered writes, or an in-kernel copy from a source fd."""

    def __init__(self, f, path: Path) -> None:
        self.f = f
        self.path = path
        self.written = 0

    def position(self) -> int:
        """Absolute offset in `path` where the next byte lands (for reusing bytes already written)."""
        return self.f.tell()

    def write(self, data) -> None:
        self.f.write(data)
        self.written += len(data)

    def copy_from(self, src_fd: int, offset: int, size: int) -> None:
        self.f.flush()
        out_fd = self.f.fileno()
        pos = self.f.tell()
        done = 0
        while done < size:
            try:
                n = os.copy_file_range(src_fd, out_fd, size - done, offset + done, pos + done)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    self._copy_slow(src_fd, offset + done, size - done, pos + done)
                    done = size
                    break
                raise
            if n == 0:
                raise SourceError("source file ended early while copying a tensor (truncated?)")
            done += n
        self.f.seek(pos + size)
        self.written += size

    def _copy_slow(self, src_fd: int, offset: int, size: int, pos: int) -> None:
        out_fd = self.f.fileno()
        buf = bytearray(min(size, 16 * 1024 * 1024))
        view = memoryview(buf)
        done = 0
        while done < size:
            n = os.preadv(src_fd, [view[: min(len(buf), size - done)]], offset + done)
            if n == 0:
                raise SourceError("source file ended early while copying a tensor (truncated?)")
            m = os.pwrite(out_fd, view[:n], pos + done)
            done += m


@dataclass(frozen=True)
class OutputFiles:
    dest: Path
    paths: list[Path]  # final names, first shard first
    total_bytes: int  # header + data estimate


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(dest: Path) -> list[Path]:
    """Remove temp folders of earlier runs for `dest` whose process is gone (e.g. after SIGKILL)."""
    removed = []
    prefix = f".{dest.name}{TMP_MARK}"
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix):])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def parse_size(text: str) -> int:
    """`50G`, `500M`, `4096K`, `1000` (bytes); decimal units as gguf-split uses them."""
    s = text.strip().upper()
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
    if s and s[-1] in mult:
        num, factor = s[:-1], mult[s[-1]]
    else:
        num, factor = s, 1
    try:
        value = float(num) * factor
    except ValueError:
        raise OutputError(f"--split-max-size: {text!r} is not a size like 50G, 500M or 4096K") from None
    if value <= 0:
        raise OutputError(f"--split-max-size: {text!r} must be positive")
    return int(value)


def _pack_string(v: str | bytes) -> bytes:
    b = v.encode("utf-8") if isinstance(v, str) else v
    return struct.pack("<Q", len(b)) + b


def pack_kv(kv: KV) -> bytes:
    """Serialize one key/value exactly as typed (arrays keep their element type; empty arrays allowed)."""
    out = [_pack_string(kv.key), struct.pack("<I", kv.vtype)]
    if kv.vtype == T.STRING:
        out.append(_pack_string(kv.value))
    elif kv.vtype == T.ARRAY:
        sub = kv.sub_type
        if sub is None:
            raise OutputError(f"metadata key {kv.key}: array without an element type")
        out.append(struct.pack("<IQ", sub, len(kv.value)))
        if sub == T.STRING:
            out.extend(_pack_string(v) for v in kv.value)
        elif sub == T.BOOL:
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


def _pack_tensor_info(t: OutTensor, offset: int) -> bytes:
    return (_pack_string(t.name) + struct.pack("<I", len(t.shape))
            + struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.type, offset))


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def shard_layout(tensors: list[OutTensor], split_max_size: int) -> list[list[OutTensor]]:
    """gguf-split's rule: start a new shard when the next tensor would push this one over the limit."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if split_max_size and shards[-1] and size + t.size > split_max_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.size
    return shards


def shard_names(dest: Path, n: int) -> list[Path]:
    """llama.cpp's naming: OUT.gguf -> OUT-00001-of-0000N.gguf, ... (unchanged when n == 1)."""
    if n == 1:
        return [dest]
    stem = dest.name[:-5] if dest.name.endswith(".gguf") else dest.name
    return [dest.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


class GGUFOutput:
    """Prepare and write one output model (one file, or shards with --split-max-size)."""

    def __init__(self, model: OutputModel, dest: Path, *, split_max_size: int = 0,
                 force: bool = False, inputs: list[Path] | tuple[Path, ...] = ()) -> None:
        self.model = model
        self.dest = Path(dest)
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        if len({t.name for t in model.tensors}) != len(model.tensors):
            raise OutputError("internal: duplicate output tensor names")
        self.shards = shard_layout(model.tensors, split_max_size)
        self.paths = shard_names(self.dest, len(self.shards))
        self.headers = [self._header(i) for i in range(len(self.shards))]
        align = model.alignment
        self.total_bytes = sum(_pad(len(h), align) + sum(_pad(t.size, align) for t in shard)
                               for h, shard in zip(self.headers, self.shards))

    def _header(self, i: int) -> bytes:
        """Header, metadata (all of it in the first shard) and tensor infos of shard i."""
        n = len(self.shards)
        kvs = [kv for kv in self.model.kvs if not kv.key.startswith("split.")] if i == 0 else []
        if n > 1:
            kvs = kvs + [KV("split.no", i, T.UINT16), KV("split.count", n, T.UINT16),
                         KV("split.tensors.count", len(self.model.tensors), T.INT32)]
        parts = [struct.pack("<IIQQ", GGUF_MAGIC, 3, len(self.shards[i]), len(kvs))]
        parts += [pack_kv(kv) for kv in kvs]
        offset = 0
        for t in self.shards[i]:
            parts.append(_pack_tensor_info(t, offset))
            offset += _pad(t.size, self.model.alignment)
        return b"".join(parts)
    def check(self) -> None:
        """Every refusal that needs no writing: inputs, existing files, free space."""
        parent = self.dest.parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: output folder does not exist")
        for p in self.paths:
            for inp in self.inputs:
                if _same_file(p, inp):
                    raise OutputError(f"{p}: output would overwrite one of its inputs")
        existing = [p for p in self.paths if p.exists()]
        if existing and not self.force:
            raise OutputError(f"{existing[0]}: already exists (use --force to overwrite)")
        for p in existing:
            if p.is_dir():
                raise OutputError(f"{p}: is a folder")
        free = shutil.disk_usage(parent).free
        reclaim = sum(p.stat().st_size for p in existing)
        if free + reclaim < self.total_bytes + SPACE_MARGIN:
            raise OutputError(f"{parent}: not enough free space: need {self.total_bytes / 1e9:.2f} GB, "
                              f"have {free / 1e9:.2f} GB")

    def write(self, emit: Callable[[OutTensor, FileSink], None], progress: Progress | None = None) -> list[Path]:
        self.check()
        clean_stale_temp(self.dest)
        progress = progress or _NoProgress()
        tmpdir = self.dest.parent / f".{self.dest.name}{TMP_MARK}{os.getpid()}"
        shutil.rmtree(tmpdir, ignore_errors=True)
        tmpdir.mkdir()
        align = self.model.alignment
        tmp_paths = [tmpdir / p.name for p in self.paths]
        try:
            progress.start(sum(t.size for t in self.model.tensors), len(self.model.tensors))
            for tmp, header, shard in zip(tmp_paths, self.headers, self.shards):
                with open(tmp, "wb") as f:
                    f.write(header)
                    f.write(bytes(_pad(len(header), align) - len(header)))
                    sink = FileSink(f, tmp)
                    for t in shard:
                        before = sink.written
                        emit(t, sink)
                        n = sink.written - before
                        if n != t.size:
                            raise OutputError(f"internal: {t.name} produced {n} bytes, expected {t.size}")
                        f.write(bytes(_pad(n, align) - n))
                        progress.advance(t, n)
            progress.finish()
            for tmp, final in reversed(list(zip(tmp_paths, self.paths))):
                os.replace(tmp, final)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputError(f"{self.dest.parent}: disk full while writing; nothing was left behind") from None
            if e.errno == errno.EFBIG:
                raise OutputError(f"{self.dest}: file size limit reached while writing; nothing was left behind") from None
            raise OutputError(f"{self.dest}: write failed ({e.strerror or e})") from None
        finally:
            progress.finish()
            shutil.rmtree(tmpdir, ignore_errors=True)
        return self.paths

