"""Copies that cost no disk: a duplicated tensor is cloned from its first copy in the output.

On a filesystem that shares extents (XFS, btrfs; ZFS with block cloning) copy_file_range of
block-aligned ranges clones; elsewhere it copies in the kernel, so the file is byte-identical
either way. The seed-style plan's output then takes about the size of its unique content (two
thirds of its apparent size) on disk. Loop-mounted images need root and mkfs.xfs/mkfs.btrfs
(Debian: xfsprogs, btrfs-progs); without them those tests skip, except on CI as root
(CI=true), where the tools are expected and their absence fails.

Space is measured from the filesystem's free-block count after it settles (btrfs and XFS
account freed and delayed blocks lazily), and held between a lower bound (the unique content
must really be there) and an upper bound (the duplicates must not be).
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from gguf import GGUFReader

from helpers import cli, leftovers
from modelfactory import make_model
from upscaler.format.writer import PAD_KEY, SHARD_PHASE

SEED = "0:40,20:60,40:80"
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 layers of width 1024 (~290 MB): every tensor a whole number of 4 KiB blocks."""
    d = tmp_path_factory.mktemp("reflink-models")
    return make_model(d / "wide.gguf", n_layer=12, n_embd=1024, n_ff=2816, n_head=8, n_head_kv=4)


def ci_provides_tools() -> bool:
    """On CI as root the loop filesystems are part of the job: missing tools are a failure there."""
    return os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0


def unavailable(reason: str) -> None:
    (pytest.fail if ci_provides_tools() else pytest.skip)(reason)


@pytest.fixture(scope="module", params=["xfs", "btrfs"])
def loopfs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    kind = request.param
    if os.geteuid() != 0:
        pytest.skip("mounting a loop filesystem needs root")
    if shutil.which(MKFS[kind][0]) is None:
        unavailable(f"{MKFS[kind][0]} not installed (Debian: apt-get install xfsprogs btrfs-progs)")
    d = tmp_path_factory.mktemp(f"loop-{kind}")
    img, mnt = d / f"{kind}.img", d / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(2 * 1024**3)
    if subprocess.run(MKFS[kind] + [str(img)], capture_output=True).returncode:
        unavailable(f"mkfs.{kind} failed here")
    if subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode:
        unavailable("loop mounts are not allowed here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        img.unlink(missing_ok=True)


def fs_used(folder: Path, settle: float = 30.0) -> int:
    """Bytes in use, once the free count has stopped moving (three equal readings in a row)."""
    readings: list[int] = []
    deadline = time.monotonic() + settle
    while True:
        os.sync()
        st = os.statvfs(folder)
        readings.append((st.f_blocks - st.f_bfree) * st.f_frsize)
        if len(readings) >= 3 and len(set(readings[-3:])) == 1:
            return readings[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"free space on {folder} did not settle in {settle:.0f} s: {readings[-5:]}")
        time.sleep(0.2)


def written(folder: Path, fn) -> int:
    """Bytes of the filesystem that `fn()` takes."""
    before = fs_used(folder)
    fn()
    return fs_used(folder) - before


def total_size(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def test_seed_style_plan_shares_its_duplicates(loopfs: Path, wide: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.gguf"  # a filesystem without shared extents: every byte written
    cli("upscale", wide, "--preset", "overlap-halves", "-o", plain, check=True)
    out = loopfs / "seed.gguf"
    used = written(loopfs, lambda: cli("upscale", wide, "--preset", "overlap-halves", "-o", out, check=True))
    size = out.stat().st_size
    unique = wide.stat().st_size  # each source tensor once
    assert filecmp.cmp(out, plain, shallow=False)
    assert abs(size * 2 / 3 - unique) < 0.05 * size  # 12 -> 18 layers, so about two thirds is unique
    assert 0.99 * unique < used < unique + 0.01 * size, (used, unique, size)
    out.unlink()
    assert leftovers(loopfs) == []


def test_split_output_shares_across_shards(loopfs: Path, wide: Path, tmp_path: Path) -> None:
    """Duplicates in a later shard than their first copy are cloned too (shards keep one phase)."""
    args = ["--preset", "overlap-halves", "--split-max-size", "120M"]
    cli("upscale", wide, *args, "-o", tmp_path / "plain.gguf", check=True)
    plain = sorted(tmp_path.glob("plain-*-of-*.gguf"))
    used = written(loopfs, lambda: cli("upscale", wide, *args, "-o", loopfs / "split.gguf", check=True))
    shards = sorted(loopfs.glob("split-*-of-*.gguf"))
    assert len(shards) == len(plain) >= 3
    assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(shards, plain))
    assert 0.99 * wide.stat().st_size < used < wide.stat().st_size + 0.01 * total_size(shards)
    for p in shards:
        p.unlink()


def test_run_reuse_is_shared_and_byte_identical(loopfs: Path, tmp_path: Path) -> None:
    """The quantizing writer reuses duplicates from its own output the same way; its bytes stay
    exactly what it writes elsewhere (which tests/test_quantize_cli.py holds to llama.cpp's)."""
    # n_ff 3072: every tensor, also Q6_K ffn_down, a whole number of 4 KiB blocks, so the
    # duplicate one layer after its first copy keeps its block phase
    src = make_model(tmp_path / "src.gguf", n_layer=4, n_embd=1024, n_ff=3072, n_head=8, n_head_kv=4)
    args = ["--preset", "overlap-halves", "--no-smoke", "--mixture", "source"]
    cli("run", src, *args, "-o", tmp_path / "plain.gguf", check=True)
    out = loopfs / "run.gguf"
    used = written(loopfs, lambda: cli("run", src, *args, "-o", out, check=True))
    assert filecmp.cmp(out, tmp_path / "plain.gguf", shallow=False)
    # 4 -> 6 layers, all copies identical in the source mixture: 4 of 6 layers' bytes are unique
    size = out.stat().st_size
    assert 0.6 * size < used < 0.75 * size, (used, size)
    out.unlink()


def _absolute_offsets(shards: list[Path]) -> dict[str, tuple[int, int, bytes]]:
    """name -> (shard index, absolute data offset in its file, content digest), read by gguf-py."""
    out = {}
    for i, p in enumerate(shards):
        for t in GGUFReader(p).tensors:
            out[t.name] = (i, int(t.data_offset), hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).digest())
    return out


def _keys(path: Path) -> set[str]:
    return set(GGUFReader(path).fields)


def _alignment(path: Path) -> int:
    f = GGUFReader(path).fields.get("general.alignment")
    return 32 if f is None else int(f.parts[f.data[0]][0])


def test_duplicates_keep_their_block_phase_across_shards(llama80: Path, tmp_path: Path) -> None:
    """Without a filesystem: in a split seed-plan output every copy of a tensor lies at the same
    offset modulo 4 KiB as its first copy, also in other shards (so each can be cloned); the
    first shard carries no padding key, later ones do."""
    out = tmp_path / "seed.gguf"
    cli("upscale", llama80, "--slices", SEED, "-o", out, "--split-max-size", "4M", check=True)
    shards = sorted(tmp_path.glob("seed-*-of-*.gguf"))
    first = shards[0]
    assert len(shards) >= 3
    offs = _absolute_offsets(shards)
    groups: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for shard, offset, d in offs.values():
        groups[d].append((shard, offset))
    dups = [g for g in groups.values() if len(g) > 1]
    assert len(dups) >= 40 * 9 and any(len({s for s, _ in g}) > 1 for g in dups)
    for g in dups:
        assert len({o % 4096 for _, o in g}) == 1, g
    assert PAD_KEY not in _keys(first)
    for p in shards[1:]:
        assert PAD_KEY in _keys(p) and SHARD_PHASE % _alignment(p) == 0
