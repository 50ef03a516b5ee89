"""Streaming GGUF writer: atomic, split-aware, bounded memory. It knows bytes, not recipes.

Header, key/values and tensor infos are serialized by gguf-py's GGUFWriter (which also decides
the shard layout for --split-max-size and names shards as llama.cpp does). Tensor data is then
streamed by the caller's `emit` function into a sink, tensor by tensor, padded to the alignment.

Everything is written into a temporary folder beside the destination and renamed into place
only when complete, last shard first, so the first shard — the one llama.cpp opens — appears
last. An interrupted run leaves no output; a killed run leaves only a clearly named
`.NAME.gguf-upscale-tmp.PID` folder, which the next run removes.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from gguf import GGUFWriter, GGUFValueType

from .errors import OutputError, SourceError
from .output import OutputModel, OutTensor

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

    def __init__(self, f) -> None:
        self.f = f
        self.written = 0

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


class GGUFOutput:
    """Prepare and write one output model (one file, or shards with --split-max-size)."""

    def __init__(self, model: OutputModel, arch: str, dest: Path, *, split_max_size: int = 0,
                 force: bool = False, inputs: list[Path] | tuple[Path, ...] = ()) -> None:
        self.model = model
        self.dest = Path(dest)
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        self._w = GGUFWriter(None, arch, split_max_size=split_max_size)
        self._by_name = {t.name: t for t in model.tensors}
        if len(self._by_name) != len(model.tensors):
            raise OutputError("internal: duplicate output tensor names")
        self._prepare()

    def _prepare(self) -> None:
        w = self._w
        for kv in self.model.kvs:
            if kv.key == "general.architecture":
                continue
            if kv.vtype == GGUFValueType.ARRAY and len(kv.value) == 0:
                raise OutputError(f"metadata key {kv.key} is an empty array, which gguf-py cannot write")
            w.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
        w.data_alignment = self.model.alignment
        for t in self.model.tensors:
            w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.size, raw_dtype=t.type)
        self.paths = w.format_shard_names(self.dest)
        data = sum(GGUFWriter.ggml_pad(t.size, self.model.alignment) for t in self.model.tensors)
        self.total_bytes = data + len(self.paths) * 4 * 1024 * 1024  # generous header allowance

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
        w = self._w
        try:
            w.open_output_file(tmpdir / self.dest.name)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            assert w.fout is not None
            progress.start(sum(t.size for t in self.model.tensors), len(self.model.tensors))
            for fout, shard in zip(w.fout, w.tensors):
                w.write_padding(fout, fout.tell())
                sink = FileSink(fout)
                for name in shard:
                    t = self._by_name[name]
                    before = sink.written
                    emit(t, sink)
                    n = sink.written - before
                    if n != t.size:
                        raise OutputError(f"internal: {t.name} produced {n} bytes, expected {t.size}")
                    w.write_padding(fout, n)
                    progress.advance(t, n)
                fout.flush()
                os.fsync(fout.fileno())
            w.close()
            progress.finish()
            tmp_paths = w.format_shard_names(tmpdir / self.dest.name)
            for tmp, final in reversed(list(zip(tmp_paths, self.paths))):
                os.replace(tmp, final)
            _fsync_dir(self.dest.parent)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputError(f"{self.dest.parent}: disk full while writing; nothing was left behind") from None
            if e.errno == errno.EFBIG:
                raise OutputError(f"{self.dest}: file size limit reached while writing; nothing was left behind") from None
            raise OutputError(f"{self.dest}: write failed ({e.strerror or e})") from None
        finally:
            w.close()
            shutil.rmtree(tmpdir, ignore_errors=True)
        return self.paths


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
