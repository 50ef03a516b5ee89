"""Write safety under real faults: a disk that fills mid-write, a file size limit, SIGINT, SIGTERM
and SIGKILL mid-write, `--force` over an existing file or shard set.

Every case runs the real CLI in a subprocess. To hit it *mid-write* deterministically, the test
waits until the temporary folder exists and has grown, stops the process (SIGSTOP), checks the
state, then sends the fault (the signal, or a file filling the disk) and lets it continue. In
every case the destination holds either nothing or a complete, valid file; no temporary file is
left, except after SIGKILL, where it is clearly named and the next run for the output removes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, assert_one_line_error, cli, leftovers
from modelfactory import make_model
from upscaler.format.source import SourceModel
from upscaler.format.writer import JOURNAL, TMP_MARK, clean_stale_temp

CMD = [sys.executable, "-c", "from upscaler.cli import main; main()"]
ENV = {**os.environ, "COLUMNS": "120"}


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`big`: 16 layers of width 1024 (~380 MB F16; its upscale takes long enough to interrupt);
    `quant`: 4 layers of width 1024, for the quantizing writer (`run`, `quantize`) and a small disk."""
    d = tmp_path_factory.mktemp("safety-models")
    return {
        "big": make_model(d / "big.gguf", n_layer=16, n_embd=1024, n_ff=2816, n_head=8, n_head_kv=4),
        "quant": make_model(d / "quant.gguf", n_layer=4, n_embd=1024, n_ff=2816, n_head=8, n_head_kv=4),
    }


def args_for(command: str, models: dict[str, Path], out: Path) -> list[str]:
    if command == "upscale":
        return ["upscale", str(models["big"]), "--preset", "overlap-halves", "-o", str(out)]
    if command == "upscale-small":
        return ["upscale", str(models["quant"]), "--preset", "overlap-halves", "-o", str(out)]
    if command == "run":
        return ["run", str(models["quant"]), "--preset", "overlap-halves", "-o", str(out), "--no-smoke",
                "--threads", "2"]
    if command == "quantize":
        return ["quantize", str(models["quant"]), "-o", str(out), "--threads", "2"]
    raise ValueError(command)


def temp_folders(folder: Path, dest: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{dest.name}{TMP_MARK}")]


def folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.iterdir():
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def start_paused(args: list[str], dest: Path, *, min_bytes: int = 4_000_000, preexec=None) -> subprocess.Popen:
    """Start `gguf-upscale ARGS`, wait until its temp folder beside `dest` holds `min_bytes`, stop it.

    Returns the stopped process; the caller sends the fault and SIGCONT."""
    proc = subprocess.Popen(CMD + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=ROOT, preexec_fn=preexec)
    deadline = time.monotonic() + 300
    try:
        while True:
            tmp = [p for p in temp_folders(dest.parent, dest) if p.name.endswith(f".{proc.pid}")]
            if tmp and folder_bytes(tmp[0]) >= min_bytes:
                os.kill(proc.pid, signal.SIGSTOP)
                break
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the write ended before it could be interrupted (exit {proc.returncode}):\n{err}")
            if time.monotonic() > deadline:
                pytest.fail("the write never started")
            time.sleep(0.002)
        # stopped mid-write: the temp folder is there, the output is not complete
        assert proc.poll() is None, "the write finished before it was stopped"
        assert tmp[0].is_dir()
        return proc
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def finish(proc: subprocess.Popen, *signals: int) -> subprocess.CompletedProcess[str]:
    """Send `signals` to the stopped process, let it run, collect the result."""
    for s in signals:
        os.kill(proc.pid, s)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def assert_valid_gguf(path: Path) -> None:
    """Complete and valid: the header parses, tensor data is contiguous and the file is not short."""
    m = SourceModel(path)
    assert m.tensors and all(p.exists() for p in m.paths)


@pytest.fixture(scope="module")
def references(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """sha256 of an uninterrupted run of each command (what a run after a SIGKILL must produce)."""
    d = tmp_path_factory.mktemp("safety-ref")
    out = {}
    for command in ("upscale", "run"):
        dest = d / f"{command}.gguf"
        cli(*args_for(command, models, dest), check=True)
        out[command] = digest(dest)
    return out


# --------------------------------------------------------------------------- SIGINT / SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["upscale", "run", "quantize"])
def test_signal_mid_write_leaves_nothing(models, tmp_path: Path, command: str, sig: int) -> None:
    dest = tmp_path / "out.gguf"
    proc = start_paused(args_for(command, models, dest), dest)
    assert not dest.exists()
    res = finish(proc, sig)
    assert res.returncode == 130, res.stderr
    assert_one_line_error(res, "interrupted", "no output was left behind")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


@pytest.mark.parametrize("command,sig", [("upscale", signal.SIGINT), ("run", signal.SIGTERM)])
def test_force_over_existing_file_interrupted_keeps_old_file(models, tmp_path: Path, command: str, sig: int) -> None:
    dest = tmp_path / "out.gguf"
    shutil.copyfile(models["quant"], dest)  # an existing, valid model under the output name
    before = digest(dest)
    proc = start_paused(args_for(command, models, dest) + ["--force"], dest)
    assert digest(dest) == before  # never truncated or opened while the new one is written
    res = finish(proc, sig)
    assert res.returncode == 130, res.stderr
    assert_one_line_error(res, "interrupted")
    assert digest(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("command", ["upscale", "run"])
def test_sigkill_leaves_a_named_temp_folder_the_next_run_removes(models, references, tmp_path: Path,
                                                                  command: str) -> None:
    dest = tmp_path / "out.gguf"
    args = args_for(command, models, dest)
    proc = start_paused(args, dest)
    res = finish(proc, signal.SIGKILL)
    assert res.returncode == -signal.SIGKILL
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".out.gguf.gguf-upscale-tmp.{proc.pid}"]
    cli(*args, check=True)  # the same command again: removes the stale folder and succeeds
    assert leftovers(tmp_path) == []
    assert digest(dest) == references[command]


def test_sigkill_with_force_keeps_the_old_file(models, tmp_path: Path) -> None:
    dest = tmp_path / "out.gguf"
    shutil.copyfile(models["quant"], dest)
    before = digest(dest)
    proc = start_paused(args_for("upscale", models, dest) + ["--force"], dest)
    finish(proc, signal.SIGKILL)
    assert digest(dest) == before
    assert len(leftovers(tmp_path)) == 1


def test_stale_folder_of_a_live_write_is_left_alone(tmp_path: Path) -> None:
    """A temp folder locked by a running process is not touched, even if its name's PID is dead."""
    dest = tmp_path / "out.gguf"
    busy = tmp_path / f".out.gguf{TMP_MARK}999999999"
    busy.mkdir()
    (busy / "out.gguf").write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert clean_stale_temp(dest) == [] and busy.exists()
    finally:
        holder.kill()
        holder.wait()
    assert clean_stale_temp(dest) == [busy] and not busy.exists()


# --------------------------------------------------------------------------- disk full, size limit


def _mount_tmpfs(mnt: Path, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    mnt.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode == 0


def _fill(folder: Path, leave: int) -> None:
    """Take all but about `leave` bytes of the filesystem holding `folder`."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        size, step = 0, 1 << 26
        while step >= 4096:
            free = shutil.disk_usage(folder).free
            if free <= leave:
                break
            n = min(step, free - leave)
            try:
                os.posix_fallocate(fd, size, n)
                size += n
            except OSError:
                step //= 2
    finally:
        os.close(fd)
    assert shutil.disk_usage(folder).free <= 2 * leave


@pytest.mark.parametrize("command", ["upscale-small", "run", "quantize"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "force-over-existing"])
def test_disk_fills_mid_write(models, tmp_path: Path, command: str, existing: bool) -> None:
    mnt = tmp_path / "small"
    out_size = {"upscale-small": 160_000_000, "run": 60_000_000, "quantize": 40_000_000}[command]
    if not _mount_tmpfs(mnt, out_size + 160_000_000):
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE test covers the error path")
    try:
        dest = mnt / "out.gguf"
        if existing:
            dest.write_bytes(os.urandom(1_000_000))
            before = digest(dest)
        proc = start_paused(args_for(command, models, dest) + (["--force"] if existing else []), dest,
                            min_bytes=2_000_000)
        _fill(mnt, leave=1_000_000)  # a real disk-full: the remaining writes fail with ENOSPC
        res = finish(proc)
        assert res.returncode == 1, res.stderr
        assert_one_line_error(res, "disk full")
        (mnt / "filler").unlink()
        if existing:
            assert digest(dest) == before
            assert sorted(p.name for p in mnt.iterdir()) == ["out.gguf"]
        else:
            assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("command", ["upscale-small"])
def test_file_size_limit_mid_write(models, tmp_path: Path, command: str) -> None:
    """RLIMIT_FSIZE (ulimit -f), as an unprivileged user meets it: EFBIG (SIGXFSZ is not fatal).

    Only `upscale`: run/quantize first write llama.cpp's dry-run skeleton, a sparse file of the
    unquantized size, so a limit below their output size stops them before the writer starts."""
    dest = tmp_path / "out.gguf"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000_000, resource.RLIM_INFINITY))

    proc = subprocess.run(CMD + args_for(command, models, dest), capture_output=True, text=True, env=ENV,
                          cwd=ROOT, preexec_fn=limit, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert_one_line_error(proc, "file size limit")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- shard sets


def _set(folder: Path, stem: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.gguf", p.name))


def _digests(folder: Path) -> dict[str, str]:
    """The GGUF files in `folder` (model cards are written after the output; not what these tests are about)."""
    return {p.name: digest(p) for p in folder.iterdir() if p.is_file() and p.suffix == ".gguf"}


def test_force_over_a_set_with_another_shard_count(tiny_llama: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out.gguf"
    cli("upscale", tiny_llama, "--slices", "0:4,1:3", "-o", dest, "--split-max-size", "2M", check=True)
    old = _set(tmp_path, "out")
    assert len(old) >= 3 and "out.gguf" not in old
    # without --force every file of the old set counts as the existing output
    proc = cli("upscale", tiny_llama, "--slices", "0:4", "-o", dest)
    assert_one_line_error(proc, "out-00001-of-", "already exists", "--force")
    # fewer shards: the old set is replaced as a whole, nothing of it mixes with the new one
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", dest, "--split-max-size", "3M", "--force", check=True)
    new = _set(tmp_path, "out")
    n = len(new)
    assert 1 < n < len(old) and new == [f"out-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert len(SourceModel(tmp_path / new[0]).paths) == n
    # a single file replaces a set, and a set a single file
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", dest, "--force", check=True)
    assert _set(tmp_path, "out") == ["out.gguf"]
    cli("upscale", tiny_llama, "--slices", "0:4,1:3", "-o", dest, "--split-max-size", "2M", "--force", check=True)
    assert _set(tmp_path, "out") == old
    assert_valid_gguf(tmp_path / old[0])
    assert leftovers(tmp_path) == []


def test_interrupted_force_over_a_set_keeps_the_old_set(models, tmp_path: Path) -> None:
    dest = tmp_path / "out.gguf"
    cli("upscale", models["quant"], "--slices", "0:4", "-o", dest, "--split-max-size", "40M", check=True)
    before = _digests(tmp_path)
    assert len(before) >= 3
    proc = start_paused(args_for("upscale", models, dest) + ["--split-max-size", "100M", "--force"], dest)
    res = finish(proc, signal.SIGINT)
    assert res.returncode == 130
    assert _digests(tmp_path) == before


def test_an_input_shard_is_never_replaced(tiny_llama_split: Path, tmp_path: Path) -> None:
    """`-o tiny-llama-F16.gguf` beside the input set tiny-llama-F16-0000k-of-00003: the set would be
    replaced by the output, so it is refused, even with --force."""
    folder = tmp_path / "set"
    shutil.copytree(tiny_llama_split.parent, folder)
    before = _digests(folder)
    proc = cli("upscale", folder / tiny_llama_split.name, "--slices", "0:4", "-o", folder / "tiny-llama-F16.gguf",
               "--force")
    assert_one_line_error(proc, "one of the inputs")
    assert _digests(folder) == before


KILL_AFTER_FIRST_RENAME = """
import os, signal, sys
import upscaler.format.writer as w
real = os.replace
def replace(src, dst):
    real(src, dst)
    if str(dst).endswith('.gguf'):
        os.kill(os.getpid(), signal.SIGKILL)
w.os.replace = replace
from upscaler.cli import main
sys.argv = ['gguf-upscale'] + sys.argv[1:]
main()
"""


def test_sigkill_between_renames_is_completed_by_the_next_run(tiny_llama: Path, tmp_path: Path) -> None:
    """Killed after the first shard of a new set was renamed over the old set of the same name:
    the old first shard is already gone (an old first shard never sees new shards), and the next
    write to that output finishes the commit from its journal."""
    dest = tmp_path / "out.gguf"
    split = ["--split-max-size", "2M"]
    cli("upscale", tiny_llama, "--slices", "0:4,1:3", "-o", dest, *split, check=True)
    names = _set(tmp_path, "out")
    old = _digests(tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    cli("upscale", tiny_llama, "--slices", "1:3,0:4", "-o", ref / "out.gguf", *split, check=True)
    new = _digests(ref)
    assert sorted(new) == names and all(new[n] != old[n] for n in names)
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_RENAME, "upscale", str(tiny_llama), "--slices",
                           "1:3,0:4", "-o", str(dest), *split, "--force"], capture_output=True, text=True,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / names[0]).exists()  # nothing loadable in between
    mixed = _digests(tmp_path)
    assert mixed[names[-1]] == new[names[-1]]  # last shard renamed first
    (tmp_folder,) = leftovers(tmp_path)
    assert (tmp_path / tmp_folder / JOURNAL).exists()
    # the next run for the same output completes the commit, then refuses to overwrite without --force
    proc = cli("upscale", tiny_llama, "--slices", "0:4", "-o", dest, *split)
    assert_one_line_error(proc, "already exists")
    assert _set(tmp_path, "out") == names
    assert {n: digest(tmp_path / n) for n in names} == new
    assert leftovers(tmp_path) == []


SIGINT_AFTER_FIRST_RENAME = KILL_AFTER_FIRST_RENAME.replace("signal.SIGKILL", "signal.SIGINT")


def test_sigint_between_renames_is_held_until_the_set_is_complete(tiny_llama: Path, tmp_path: Path) -> None:
    """Ctrl-C while shards are being renamed into place: held for the milliseconds the commit takes,
    then reported; the set is wholly the new one."""
    dest = tmp_path / "out.gguf"
    split = ["--split-max-size", "2M"]
    cli("upscale", tiny_llama, "--slices", "0:4,1:3", "-o", dest, *split, check=True)
    names = _set(tmp_path, "out")
    ref = tmp_path / "ref"
    ref.mkdir()
    cli("upscale", tiny_llama, "--slices", "1:3,0:4", "-o", ref / "out.gguf", *split, check=True)
    new = _digests(ref)
    proc = subprocess.run([sys.executable, "-c", SIGINT_AFTER_FIRST_RENAME, "upscale", str(tiny_llama), "--slices",
                           "1:3,0:4", "-o", str(dest), *split, "--force"], capture_output=True, text=True,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 130, proc.stderr
    assert_one_line_error(proc, "interrupted", "the output was already complete", names[0])
    assert _set(tmp_path, "out") == names
    assert {n: digest(tmp_path / n) for n in names} == new
    assert leftovers(tmp_path) == []
