"""Streaming GGUF writer: atomic, split-aware, bounded memory. It knows bytes, not recipes.

Header, key/values and tensor infos are serialized here (gguf-py's GGUFWriter packs arrays item
by item, refuses empty arrays and owns its files, none of which suits a streaming, atomic
writer); shard layout and names follow gguf-split and llama.cpp. Tensor data is streamed by the
caller's `emit` function into a sink, tensor by tensor, padded to the alignment.

Write safety. Everything is written into a temporary folder `.NAME.gguf-upscale-tmp.PID` beside
the destination (locked with flock while in use) and moved into place only when complete:

- While a write runs, SIGINT and SIGTERM only raise a flag; the sink checks it between chunks
  (at most COPY_CHUNK bytes apart), the temporary folder is removed, and the signal is then
  delivered as before (Ctrl-C: KeyboardInterrupt). A full disk or a file size limit (SIGXFSZ is
  ignored meanwhile, so it is an EFBIG error) gives an OutputError; nothing is left behind.
- An existing output is never opened for writing: it stays intact until the new one replaces it.
- Commit: a journal (`commit.json`) naming the final files is written into the temporary folder,
  then the files are renamed into place, last shard first. When an old shard set of the same
  name is replaced, its first shard (the one llama.cpp loads) is removed before any of its
  other shards is replaced, so an old first shard never sees new shards; the new first shard
  appears last. Files of an old set that the new one does not overwrite (another shard count,
  or a single file vs a split set) are removed once the new set is in place. Signals are held
  during the commit (it takes milliseconds).
- After a SIGKILL (or power loss) the clearly named temporary folder stays. The next write to
  the same destination removes it, or, when the journal shows that the kill came during the
  commit, finishes the commit first (the new output was complete), so a set is always either
  the whole new set or recoverable into it.

Like cp, gguf-split and llama-quantize, it does not fsync: a power cut is not covered (the
tool's one policy for every file it writes, see atomic.py).

Copies that cost no disk: `FileSink.copy_from` uses copy_file_range, which clones extents on
filesystems that share them (XFS and btrfs with reflink, ZFS with block cloning) when source and
destination ranges are block aligned, and copies in the kernel elsewhere. llama.cpp needs tensor
data contiguous, padded to `general.alignment` (32 here: llama-quantize and gguf-split write
their output with alignment 32 whatever `general.alignment` says, so a larger alignment would
break the upscale -> llama-quantize path), so absolute offsets cannot be chosen. What matters is
that a duplicate lies at the same offset modulo the block size as its first copy; then
copy_from copies the unaligned head and tail (< 2 blocks) and clones everything in between.
Duplicated layers are a whole number of layers apart, and in most models a layer is a multiple
of 4 KiB, so this is the common case. For split outputs the data of shards 2..N is placed
(by padding their small headers with an `upscale.padding` key; the first shard, the one tools
copy metadata from, is unchanged) so that offsets keep one phase across shards, modulo
SHARD_PHASE, which covers every block size up to ZFS's default 128 KiB records.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from gguf import GGUFValueType as T

from ..errors import OutputError, SourceError
from ..planning.output import OutputModel, OutTensor
from .atomic import atomic_write
from .gguf_header import pack_header, padded
from .source import KV

TMP_MARK = ".gguf-upscale-tmp."
JOURNAL = "commit.json"
SPACE_MARGIN = 64 * 1024 * 1024
COPY_CHUNK = 64 * 1024 * 1024  # copy_file_range per call: bounds the time to notice Ctrl-C
SHARD_PHASE = 128 * 1024  # data offsets keep one phase across shards modulo this (see module doc)
PAD_KEY = "upscale.padding"
STALE_GRACE = 10.0  # seconds: an unlocked temp folder younger than this may be a run that starts


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


class WriteInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived during a write: raised at the next safe point, then cleaned up."""


class _Interrupts:
    """While a write runs: SIGINT/SIGTERM set a flag (checked by `check`), SIGXFSZ is ignored.

    Only the main thread can install handlers; elsewhere signals keep their usual effect and the
    writer's `finally` still cleans up. Signals that were ignored (SIG_IGN) stay ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: int | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            old = signal.getsignal(sig)
            if old in (signal.SIG_IGN, None):
                continue
            self._saved[sig] = old
            signal.signal(sig, self._on_signal)
        self._saved[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.pending is None:
            self.pending = signum

    def check(self) -> None:
        if self.pending is not None:
            raise WriteInterrupted()

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._saved.clear()

    def redeliver(self, message: str) -> None:
        """Give the held signal to its own handler (after cleanup); KeyboardInterrupt carries `message`."""
        sig = self.pending
        if sig is None:
            return
        self.pending = None
        try:
            signal.raise_signal(sig)  # Ctrl-C: KeyboardInterrupt; SIGTERM with no handler: exit
        except KeyboardInterrupt:
            raise KeyboardInterrupt(message) from None


class FileSink:
    """Where `emit` puts a tensor's bytes: buffered writes, or an in-kernel copy (or clone) from an fd."""

    def __init__(self, f, path: Path, interrupts: _Interrupts | None = None) -> None:
        self.f = f
        self.path = path
        self.written = 0
        self._check = interrupts.check if interrupts is not None else (lambda: None)
        try:
            bs = os.fstatvfs(f.fileno()).f_bsize
        except OSError:
            bs = 4096
        self.block = bs if 512 <= bs <= SHARD_PHASE and bs & (bs - 1) == 0 else 4096

    def position(self) -> int:
        """Absolute offset in `path` where the next byte lands (for reusing bytes already written)."""
        return self.f.tell()

    def write(self, data) -> None:
        self._check()
        self.f.write(data)
        self.written += len(data)

    def copy_from(self, src_fd: int, offset: int, size: int) -> None:
        """Copy `size` bytes at `offset` of `src_fd` here, in the kernel.

        When the source offset and this position agree modulo the block size, the unaligned
        head and tail are copied apart and the block-aligned middle in whole blocks, which a
        reflink filesystem shares instead of writing (the bytes are the same either way)."""
        self._check()
        self.f.flush()
        pos = self.f.tell()
        b = self.block
        if (offset - pos) % b == 0 and size >= 2 * b:
            head = -pos % b
            body = (size - head) // b * b
            pieces = [(0, head), (head, body), (head + body, size - head - body)]
        else:
            pieces = [(0, size)]
        for start, n in pieces:
            if n:
                self._copy_range(src_fd, offset + start, pos + start, n)
        self.f.seek(pos + size)
        self.written += size

    def _copy_range(self, src_fd: int, offset: int, pos: int, size: int) -> None:
        out_fd = self.f.fileno()
        done = 0
        while done < size:
            self._check()
            try:
                n = os.copy_file_range(src_fd, out_fd, min(size - done, COPY_CHUNK), offset + done, pos + done)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    self._copy_slow(src_fd, offset + done, size - done, pos + done)
                    return
                raise
            if n == 0:
                raise SourceError("source file ended early while copying a tensor (truncated?)")
            done += n

    def _copy_slow(self, src_fd: int, offset: int, size: int, pos: int) -> None:
        out_fd = self.f.fileno()
        buf = bytearray(min(size, 16 * 1024 * 1024))
        view = memoryview(buf)
        done = 0
        while done < size:
            self._check()
            n = os.preadv(src_fd, [view[: min(len(buf), size - done)]], offset + done)
            if n == 0:
                raise SourceError("source file ended early while copying a tensor (truncated?)")
            m = 0
            while m < n:
                m += os.pwrite(out_fd, view[m:n], pos + done + m)
            done += n


@dataclass(frozen=True)
class OutputFiles:
    dest: Path
    paths: list[Path]  # final names, first shard first
    total_bytes: int  # header + data estimate


# --------------------------------------------------------------------------- temp folders, commit


def temp_dir(dest: Path, pid: int | None = None) -> Path:
    """`.NAME.gguf-upscale-tmp.PID` beside `dest`: where a write to `dest` builds its files."""
    return dest.parent / f".{dest.name}{TMP_MARK}{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on folder `path`, or None when another process holds it.

    Filesystems without flock (some network mounts) give an fd without a lock."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass
    return fd


def output_set(dest: Path) -> list[Path]:
    """Existing files that are the output `dest`: the file itself and any `-NNNNN-of-MMMMM` shards
    (of any count) of that name, loadable first shards first."""
    stem = dest.name[:-5] if dest.name.endswith(".gguf") else dest.name
    pat = re.compile(re.escape(stem) + r"-(\d{5})-of-(\d{5})\.gguf")
    found = [dest] if dest.is_file() else []
    try:
        entries = sorted(dest.parent.iterdir())
    except OSError:
        return found
    shards = [p for p in entries if pat.fullmatch(p.name) and p.is_file()]
    shards.sort(key=lambda p: (int(pat.fullmatch(p.name).group(1)) != 1, p.name))  # type: ignore[union-attr]
    return found + shards


def _apply_commit(tmpdir: Path, journal: dict) -> None:
    """Move the finished files of `tmpdir` into place and remove the stale ones. Idempotent:
    after a kill at any point, running it again completes the same commit."""
    folder = tmpdir.parent
    names: list[str] = journal["files"]
    first = folder / names[0]
    if len(names) > 1 and (tmpdir / names[0]).exists():
        # an old set of the same name must not be loadable once any of its shards is replaced
        first.unlink(missing_ok=True)
    for name in reversed(names):  # last shard first: the first shard appears last
        tmp = tmpdir / name
        if tmp.exists():
            os.replace(tmp, folder / name)
    for name in journal.get("remove", []):  # an old set's first shard first
        (folder / name).unlink(missing_ok=True)


def _read_journal(tmpdir: Path) -> dict | None:
    try:
        journal = json.loads((tmpdir / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = journal.get("files") if isinstance(journal, dict) else None
    if not files or not all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in files):
        return None
    remove = journal.get("remove", [])
    if not all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in remove):
        return None
    return journal


def clean_stale_temp(dest: Path) -> list[Path]:
    """Deal with temp folders of earlier writes to `dest` whose process is gone (e.g. SIGKILL).

    A folder whose journal says its commit had begun is committed first (its output was
    complete); any other is removed. Folders of running writes are locked and left alone."""
    removed: list[Path] = []
    prefix = f".{dest.name}{TMP_MARK}"
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
            continue
        try:
            pid = int(p.name[len(prefix):])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            fd = _try_lock(p)
        except OSError:
            continue
        if fd is None:
            continue  # a live write holds it
        try:
            if _pid_alive(pid):
                try:
                    young = time.time() - p.stat().st_mtime < STALE_GRACE
                except OSError:
                    continue
                if young:
                    continue  # perhaps a write that has not locked its folder yet
            journal = _read_journal(p)
            if journal is not None:
                try:
                    _apply_commit(p, journal)
                except OSError:
                    continue  # leave it for a later run rather than lose the output
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
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


# --------------------------------------------------------------------------- serialization


def _pad(n: int, align: int) -> int:
    return padded(n, align)


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
                 force: bool = False, inputs: list[Path] | tuple[Path, ...] = (),
                 shards: list[list[OutTensor]] | None = None) -> None:
        self.model = model
        self.dest = Path(dest)
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        if len({t.name for t in model.tensors}) != len(model.tensors):
            raise OutputError("internal: duplicate output tensor names")
        self.shards = shards or shard_layout(model.tensors, split_max_size)  # shards: as given (--keep-split)
        self.paths = shard_names(self.dest, len(self.shards))
        self.headers: list[bytes] = []
        align = model.alignment
        phase = 0  # data offset of the first shard's next tensor, as if all shards were one stream
        for i in range(len(self.shards)):
            self.headers.append(self._header(i, phase))
            if i == 0:
                phase = _pad(len(self.headers[0]), align)
            phase += sum(_pad(t.size, align) for t in self.shards[i])
        self.total_bytes = sum(_pad(len(h), align) + sum(_pad(t.size, align) for t in shard)
                               for h, shard in zip(self.headers, self.shards))

    def _header(self, i: int, phase: int = 0) -> bytes:
        """Header, metadata (all of it in the first shard) and tensor infos of shard i.

        Shards after the first get an `upscale.padding` key sized so that their data starts at
        `phase` modulo SHARD_PHASE (see the module doc: it lets duplicates in other shards be cloned)."""
        n = len(self.shards)
        align = self.model.alignment
        kvs = [kv for kv in self.model.kvs if not kv.key.startswith("split.")] if i == 0 else []
        if n > 1:
            kvs = kvs + [KV("split.no", i, T.UINT16), KV("split.count", n, T.UINT16),
                         KV("split.tensors.count", len(self.model.tensors), T.INT32)]
        pad_phase = i > 0 and SHARD_PHASE % align == 0
        if pad_phase:
            kvs = kvs + [KV(PAD_KEY, "", T.STRING)]
        infos = [(t.name, t.shape, int(t.type), t.size) for t in self.shards[i]]
        header, _ = pack_header(kvs, infos, align)
        if pad_phase:
            grow = (phase - len(header)) % SHARD_PHASE
            kvs[-1] = KV(PAD_KEY, " " * grow, T.STRING)
            header, _ = pack_header(kvs, infos, align)
        return header

    def check(self) -> None:
        """Every refusal that needs no writing: inputs, existing files, free space.

        A killed run's temporary folder is dealt with first (its space freed, or its interrupted
        commit finished), so that what exists is judged as the user will see it."""
        parent = self.dest.parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: output folder does not exist")
        clean_stale_temp(self.dest)
        for p in self.paths:
            if p.is_dir():
                raise OutputError(f"{p}: is a folder")
        old = output_set(self.dest)
        for p in self.paths + old:
            for inp in self.inputs:
                if _same_file(p, inp):
                    if p in self.paths:
                        raise OutputError(f"{p}: output would overwrite one of its inputs")
                    raise OutputError(f"{p}: is one of the inputs and a shard of the output name {self.dest.name}, "
                                      "which would replace it; choose another output name")
        existing = [p for p in self.paths if p.exists()] + [p for p in old if p not in self.paths]
        if existing and not self.force:
            raise OutputError(f"{existing[0]}: already exists (use --force to overwrite)")
        free = shutil.disk_usage(parent).free
        if free < self.total_bytes + SPACE_MARGIN:
            kept = " (an existing output is kept until the new one is complete)" if existing else ""
            raise OutputError(f"{parent}: not enough free space: need {self.total_bytes / 1e9:.2f} GB, "
                              f"have {free / 1e9:.2f} GB{kept}")

    def write(self, emit: Callable[[OutTensor, FileSink], None], progress: Progress | None = None) -> list[Path]:
        self.check()
        progress = progress or _NoProgress()
        align = self.model.alignment
        tmpdir = temp_dir(self.dest)
        tmp_paths = [tmpdir / p.name for p in self.paths]
        interrupts = _Interrupts()
        committed = False
        self._commit_started = False
        lock_fd: int | None = None
        with interrupts:
            try:
                shutil.rmtree(tmpdir, ignore_errors=True)
                tmpdir.mkdir()
                lock_fd = _try_lock(tmpdir)
                progress.start(sum(t.size for t in self.model.tensors), len(self.model.tensors))
                for tmp, header, shard in zip(tmp_paths, self.headers, self.shards):
                    with open(tmp, "wb") as f:
                        sink = FileSink(f, tmp, interrupts)
                        sink.write(header)
                        sink.write(bytes(_pad(len(header), align) - len(header)))
                        for t in shard:
                            before = sink.written
                            emit(t, sink)
                            n = sink.written - before
                            if n != t.size:
                                raise OutputError(f"internal: {t.name} produced {n} bytes, expected {t.size}")
                            sink.write(bytes(_pad(n, align) - n))
                            progress.advance(t, n)
                progress.finish()
                interrupts.check()  # last chance to give up with nothing changed
                self._commit(tmpdir)
                committed = True
            except WriteInterrupted:
                pass  # cleaned up below, then the signal is delivered
            except OSError as e:
                if self._commit_started:
                    raise OutputError(f"{self.dest}: could not move the finished output into place "
                                      f"({e.strerror or e}); "
                                      f"it is kept in {tmpdir} and the next write to {self.dest.name} completes "
                                      "it") from None
                if e.errno == errno.ENOSPC:
                    raise OutputError(f"{self.dest.parent}: disk full while writing; nothing was left behind") from None
                if e.errno == errno.EFBIG:
                    raise OutputError(f"{self.dest}: file size limit reached while writing; nothing was left "
                                      "behind") from None
                raise OutputError(f"{self.dest}: write failed ({e.strerror or e})") from None
            finally:
                progress.finish()
                if committed or not self._commit_started:  # a begun commit is kept for the next run to finish
                    shutil.rmtree(tmpdir, ignore_errors=True)
                if lock_fd is not None:
                    os.close(lock_fd)
        if interrupts.pending is not None:
            done = f"the output was already complete: {self.paths[0]}" if committed else "no output was left behind"
            interrupts.redeliver(done)
            if not committed:  # the signal's handler did not stop us, but the output was given up
                raise KeyboardInterrupt("no output was left behind")
        return self.paths

    def _commit(self, tmpdir: Path) -> None:
        """Journal, then move into place (see the module doc). Signals are held by the caller."""
        names = [p.name for p in self.paths]
        stale = [p.name for p in output_set(self.dest) if p.name not in names]
        journal = {"files": names, "remove": stale}
        atomic_write(tmpdir / JOURNAL, json.dumps(journal).encode("utf-8"))
        self._commit_started = True
        _apply_commit(tmpdir, journal)
