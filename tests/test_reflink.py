"""Copies that cost no disk: a duplicated tensor is cloned from its first copy in the output.

On a filesystem that shares extents (XFS, btrfs; ZFS with block cloning) copy_file_range of
block-aligned ranges clones; elsewhere it copies in the kernel, so the file is byte-identical
either way. The seed-style plan's output then takes about the size of its unique content (two
thirds of its apparent size) on disk. Loop-mounted images need root and mkfs.xfs/mkfs.btrfs
(Debian: xfsprogs, btrfs-progs); without them those tests skip.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest

from helpers import cli, leftovers
from modelfactory import make_model
from upscaler.gguf_header import read_header
from upscaler.source import SourceModel, TensorReader
from upscaler.writer import PAD_KEY, SHARD_PHASE

SEED = "0:40,20:60,40:80"
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 layers of width 1024 (~290 MB): every tensor a whole number of 4 KiB blocks."""
    d = tmp_path_factory.mktemp("reflink-models")
    return make_model(d / "wide.gguf", n_layer=12, n_embd=1024, n_ff=2816, n_head=8, n_head_kv=4)


@pytest.fixture(scope="module", params=["xfs", "btrfs"])
def loopfs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    kind = request.param
    if os.geteuid() != 0:
        pytest.skip("mounting a loop filesystem needs root")
    if shutil.which(MKFS[kind][0]) is None:
        pytest.skip(f"{MKFS[kind][0]} not installed (Debian: apt-get install xfsprogs btrfs-progs)")
    d = tmp_path_factory.mktemp(f"loop-{kind}")
    img, mnt = d / f"{kind}.img", d / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(2 * 1024**3)
    if subprocess.run(MKFS[kind] + [str(img)], capture_output=True).returncode:
        pytest.skip(f"mkfs.{kind} failed here")
    if subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode:
        pytest.skip("loop mounts are not allowed here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        img.unlink(missing_ok=True)


def fs_used(folder: Path) -> int:
    os.sync()
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def written(folder: Path, fn) -> int:
    """Bytes of the filesystem that `fn()` takes."""
    before = fs_used(folder)
    fn()
    return fs_used(folder) - before


def total_size(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def test_seed_style_plan_shares_its_duplicates(wide: Path, loopfs: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.gguf"  # a filesystem without shared extents: every byte written
    cli("upscale", wide, "--preset", "overlap-halves", "-o", plain, check=True)
    out = loopfs / "seed.gguf"
    used = written(loopfs, lambda: cli("upscale", wide, "--preset", "overlap-halves", "-o", out, check=True))
    size = out.stat().st_size
    unique = wide.stat().st_size  # each source tensor once
    assert filecmp.cmp(out, plain, shallow=False)
    assert abs(size * 2 / 3 - unique) < 0.05 * size  # 12 -> 18 layers, so about two thirds is unique
    assert used < unique + 0.01 * size, (used, size)
    out.unlink()
    assert leftovers(loopfs) == []


def test_split_output_shares_across_shards(wide: Path, loopfs: Path, tmp_path: Path) -> None:
    """Duplicates in a later shard than their first copy are cloned too (shards keep one phase)."""
    args = ["--preset", "overlap-halves", "--split-max-size", "120M"]
    cli("upscale", wide, *args, "-o", tmp_path / "plain.gguf", check=True)
    plain = sorted(tmp_path.glob("plain-*-of-*.gguf"))
    used = written(loopfs, lambda: cli("upscale", wide, *args, "-o", loopfs / "split.gguf", check=True))
    shards = sorted(loopfs.glob("split-*-of-*.gguf"))
    assert len(shards) == len(plain) >= 3
    assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(shards, plain))
    assert used < wide.stat().st_size + 0.01 * total_size(shards)
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
    assert used < 0.75 * out.stat().st_size  # 4 -> 6 layers, all copies identical in the source mixture
    out.unlink()


def _absolute_offsets(first_shard: Path) -> dict[str, tuple[int, int, bytes]]:
    """name -> (shard index, absolute data offset in its file, content digest)."""
    m = SourceModel(first_shard)
    index = {p: i for i, p in enumerate(m.paths)}
    out = {}
    with TensorReader() as r:
        for name, t in m.tensors.items():
            out[name] = (index[t.path], t.offset, hashlib.sha256(r.read(t)).digest())
    return out


def test_duplicates_keep_their_block_phase_across_shards(llama80: Path, tmp_path: Path) -> None:
    """Without a filesystem: in a split seed-plan output every copy of a tensor lies at the same
    offset modulo 4 KiB as its first copy, also in other shards (so each can be cloned); the
    first shard carries no padding key, later ones do."""
    out = tmp_path / "seed.gguf"
    cli("upscale", llama80, "--slices", SEED, "-o", out, "--split-max-size", "4M", check=True)
    shards = sorted(tmp_path.glob("seed-*-of-*.gguf"))
    first = shards[0]
    assert len(shards) >= 3
    offs = _absolute_offsets(first)
    groups: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for shard, offset, d in offs.values():
        groups[d].append((shard, offset))
    dups = [g for g in groups.values() if len(g) > 1]
    assert len(dups) >= 40 * 9 and any(len({s for s, _ in g}) > 1 for g in dups)
    for g in dups:
        assert len({o % 4096 for _, o in g}) == 1, g
    assert PAD_KEY not in {kv.key for kv in read_header(first).kvs}
    for p in shards[1:]:
        h = read_header(p)
        assert PAD_KEY in {kv.key for kv in h.kvs} and SHARD_PHASE % h.alignment == 0
