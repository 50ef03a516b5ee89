#!/usr/bin/env python3
"""Benchmarks, reported as ratios against a reference measured in the same run, and a verdict.

Every contender runs --runs times, interleaved with its reference; each figure is the median
over those runs, with the spread (max - min) / median beside it, and the ratio the target is
judged on is the ratio of medians. Every output is compared with its reference: tensor by
tensor against the source through gguf-py's GGUFReader (upscale, reflink), byte for byte against
llama.cpp's quantize driver called with llama-cpp-python's own LLAMA_FTYPE_* constants
(quantize, run). The script exits 1 when any output differs or any target is missed, 0 otherwise
(a benchmark that cannot run here, e.g. reflink without root, is reported as skipped).

  upscale   : `gguf-upscale upscale` (seed-style overlap-halves plan) vs `cp` of a file of the output's size;
              peak RSS of the upscale process.
  quantize  : `gguf-upscale quantize` vs llama.cpp's own quantize driver (llama_model_quantize), same threads.
  run       : one-shot `run` vs the two-step path (upscale F16, then llama.cpp's quantizer), seed plan.
  reflink   : seed-style upscale on a loop-mounted XFS/btrfs (root only; skipped otherwise): disk used and
              time with duplicates cloned from their first copy vs a plain write; byte identity.
  sweep     : `sweep` of 5 candidates on the quantized demo model (--type Q4_1 --mixture source), built on a
              loop-mounted XFS holding the source (root only; skipped otherwise) and in a plain folder: time
              beyond evaluation (start-up, planning, building, removing) over the whole wall time, <= 5% on
              reflink, <= 15% plain; the largest candidate's disk use on the XFS and its bytes vs the source.

Usage: python scripts/bench.py [--only upscale,quantize,run,reflink,sweep] [--size-gb 4] [--runs 3] [--quick]
                               [--dir out/bench] [--keep] [--demo-model models/SmolLM2-135M-Instruct.Q4_1.gguf]
  --quick: small sources (tens of MB) and one run: checks the harness, not the targets' spirit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Measure:
    seconds: float
    max_rss: int  # bytes


# Linux carries a process's RSS high-water mark across fork/vfork + exec, so a child spawned by
# this (large) benchmark process would report this process's peak as its own. A small launcher
# forks the measured command from a fresh, small process and reports that grandchild's peak.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(fd, str(usage.ru_maxrss).encode())
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_measured(cmd: list[str]) -> Measure:
    """Run a command as a child process; wall time and that command's own peak RSS."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(w), *map(str, cmd)], pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    err = proc.stderr.read().decode() if proc.stderr else ""
    code = proc.wait()
    dt = time.perf_counter() - t0
    with os.fdopen(r, "rb") as f:
        maxrss_kb = f.read()
    if code != 0 or not maxrss_kb:
        raise SystemExit(f"benchmark command failed: {' '.join(map(str, cmd))}\n{err}")
    return Measure(dt, int(maxrss_kb) * 1024)


RUNS = 3  # set from --runs
QUICK = False  # set from --quick


@dataclass
class Runs:
    """Every run of one contender."""

    all: list[Measure]

    @property
    def seconds(self) -> float:
        return float(np.median([m.seconds for m in self.all]))

    @property
    def max_rss(self) -> int:
        return max(m.max_rss for m in self.all)

    def spread(self) -> float:
        """(max - min) / median of the wall times: how much one run can be trusted."""
        t = [m.seconds for m in self.all]
        return round((max(t) - min(t)) / max(self.seconds, 1e-9), 3)

    def summary(self) -> dict:
        return {"median_s": round(self.seconds, 3), "spread": self.spread(), "runs": len(self.all)}


def upscaled_matches_source(src: Path, out: Path, layer_map: list[int]) -> str | None:
    """None when every tensor of `out` is its source tensor's bytes (block i <- source block
    layer_map[i], the rest by name), read by gguf-py; else the first difference."""
    a = {t.name: t for t in GGUFReader(src).tensors}
    b = GGUFReader(out)
    names = [t.name for t in b.tensors]
    want = [n for n in a if not n.startswith("blk.")] + [f"blk.{i}.{n.split('.', 2)[2]}" for i, j in
                                                          enumerate(layer_map) for n in a if n.startswith(f"blk.{j}.")]
    if sorted(names) != sorted(want):
        return f"tensor names differ: {sorted(set(names) ^ set(want))[:3]}"
    for t in b.tensors:
        name = t.name
        if name.startswith("blk."):
            i, rest = name.split(".", 2)[1:]
            name = f"blk.{layer_map[int(i)]}.{rest}"
        s = a[name]
        if s.tensor_type != t.tensor_type or not np.array_equal(np.asarray(s.data).view(np.uint8),
                                                                np.asarray(t.data).view(np.uint8)):
            return f"{t.name} differs from the source's {name}"
    return None


def overlap_halves(n: int) -> list[int]:
    """The overlap-halves preset's layer map: [0, n/2) + [n/4, 3n/4) + [n/2, n)."""
    return list(range(0, n // 2)) + list(range(n // 4, n // 4 + n // 2)) + list(range(n // 2, n))


def same_bytes(a: Path, b: Path) -> bool:
    """Byte-for-byte comparison in small chunks (keeps this process small)."""
    import filecmp
    return filecmp.cmp(a, b, shallow=False)


def cli(*args: object) -> list[str]:
    return [sys.executable, "-c", "from upscaler.cli import main; main()", *map(str, args)]


def synthetic_model(path: Path, *, n_layer: int, n_embd: int, n_ff: int, n_vocab: int, n_head: int = 32,
                    n_head_kv: int = 8) -> Path:
    """A llama-shaped F16 GGUF with random weights, written in streaming fashion (fast, bounded memory).

    It is only read and copied by the benchmarks that use it at multi-GB size, so weights are
    a tiled random block; the quantize benchmarks use a smaller model with fully random weights.
    """
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(8 * 1024 * 1024, dtype=np.float32) * 0.02).astype(np.float16)
    head_dim = n_embd // n_head
    shapes: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (n_vocab, n_embd), False)]
    for i in range(n_layer):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (n_embd,), True),
            (f"blk.{i}.attn_q.weight", (n_embd, n_embd), False),
            (f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, n_embd), False),
            (f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, n_embd), False),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd), False),
            (f"blk.{i}.ffn_norm.weight", (n_embd,), True),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), False),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd), False),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff), False),
        ]
    shapes += [("output_norm.weight", (n_embd,), True), ("output.weight", (n_vocab, n_embd), False)]
    tmp = path.with_suffix(".partial")
    w = GGUFWriter(tmp, "llama")
    w.add_name("bench-synthetic")
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(n_vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([3, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    for name, shape, is_norm in shapes:
        if is_norm:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4, raw_dtype=GGMLQuantizationType.F32)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2,
                              raw_dtype=GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    for _name, shape, is_norm in shapes:
        n = int(np.prod(shape))
        if is_norm:
            fout.write(np.ones(n, np.float32).tobytes())
            nbytes = n * 4
        else:
            for start in range(0, n, block.size):
                fout.write(block[: min(block.size, n - start)].tobytes())
            nbytes = n * 2
        w.write_padding(fout, nbytes)
    w.close()
    tmp.rename(path)
    return path


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    chunk = os.urandom(16 * 1024 * 1024)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def interleaved(n: int, *fns) -> list[Runs]:
    """Run the contenders alternately n times, each after a `sync` so that earlier writes' flushing
    does not land on the next measurement; keep every run (medians and spreads are reported)."""
    results: list[list[Measure]] = [[] for _ in fns]
    for _ in range(n):
        for i, fn in enumerate(fns):
            os.sync()
            results[i].append(fn())
    return [Runs(r) for r in results]


def bench_upscale(work: Path, size_gb: float) -> dict:
    # llama-2-7B-like widths, depth chosen to reach the requested size
    n_embd, n_ff, n_vocab = (1024, 2816, 8000) if QUICK else (4096, 11008, 32000)
    per_layer = (2 * n_embd * n_embd + 2 * (n_embd // 4) * n_embd + 3 * n_embd * n_ff) * 2
    globals_ = 2 * n_vocab * n_embd * 2
    n_layer = max(4, int(np.ceil((size_gb * 1e9 - globals_) / per_layer)))
    n_layer += -n_layer % 4
    src = synthetic_model(work / f"synthetic-{n_layer}L-{n_embd}-F16.gguf", n_layer=n_layer, n_embd=n_embd,
                          n_ff=n_ff, n_vocab=n_vocab)
    out = work / "upscaled.gguf"
    src_size = src.stat().st_size

    def upscale() -> Measure:
        out.unlink(missing_ok=True)
        return run_measured(cli("upscale", src, "--preset", "overlap-halves", "-o", out, "-q", "--no-model-card"))

    upscale()  # warm-up run also tells us the output size, and is checked against the source
    out_size = out.stat().st_size
    diff = upscaled_matches_source(src, out, overlap_halves(n_layer))
    ref = work / "cp-source.bin"
    make_file(ref, out_size)
    dst = work / "cp-dest.bin"

    def cp() -> Measure:
        dst.unlink(missing_ok=True)
        return run_measured(["cp", str(ref), str(dst)])

    cp_m, up_m = interleaved(RUNS, cp, upscale)
    dst.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    ratio = up_m.seconds / cp_m.seconds
    return {
        "source_bytes": src_size, "output_bytes": out_size, "layers": f"{n_layer} -> {n_layer * 3 // 2}",
        "upscale": up_m.summary(), "cp": cp_m.summary(),
        "upscale_over_cp": round(ratio, 3), "target_ratio": 1.10,
        "upscale_peak_rss_mb": round(up_m.max_rss / 1e6, 1), "target_rss_mb": 300,
        "matches_source": diff or True,
        "ok": diff is None and ratio <= 1.10 and up_m.max_rss <= 300e6,
    }


LLAMA_QUANTIZE = """
import sys, llama_cpp
from upscaler.quant import llama_log
llama_log.install()  # swallow llama.cpp's log, as gguf-upscale does
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())  # llama.cpp's own constant
p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def llama_quantize_cmd(src: Path, dst: Path, qtype: str, threads: int) -> list[str]:
    """llama.cpp's own quantize driver (what `llama-quantize` runs), in a child process."""
    return [sys.executable, "-c", LLAMA_QUANTIZE, str(src), str(dst), qtype, str(threads)]


def quant_source(work: Path) -> Path:
    """~1 GB F16 llama (n_embd 2048, 8 layers, 32k vocab): the source for the quantize and run benchmarks."""
    if QUICK:
        return synthetic_model(work / "quant-src-quick.gguf", n_layer=4, n_embd=512, n_ff=1024, n_vocab=2000,
                               n_head=8, n_head_kv=4)
    return synthetic_model(work / "quant-src-8L-F16.gguf", n_layer=8, n_embd=2048, n_ff=5632, n_vocab=32000,
                           n_head=16, n_head_kv=4)


def run_source(work: Path) -> Path:
    """~1.2 GB F16 llama for `run` (n_embd 2048, 12 layers, 8k vocab). Embeddings are 3% of its
    weights, near the seed's 70B (under 1%); with a 32k vocab they would be a quarter, and their
    quantization, done once on either path, would hide what the duplicated layers cost."""
    if QUICK:
        return synthetic_model(work / "run-src-quick.gguf", n_layer=8, n_embd=512, n_ff=1024, n_vocab=2000,
                               n_head=8, n_head_kv=4)
    return synthetic_model(work / "run-src-12L-F16.gguf", n_layer=12, n_embd=2048, n_ff=5632, n_vocab=8000,
                           n_head=16, n_head_kv=4)


def bench_quantize(work: Path, threads: int = 2, qtype: str = "Q4_K_M") -> dict:
    src = quant_source(work)
    ours, ref = work / "ours.gguf", work / "ref.gguf"

    def ours_run() -> Measure:
        ours.unlink(missing_ok=True)
        return run_measured(cli("quantize", src, "-o", ours, "--type", qtype, "--threads", threads))

    def ref_run() -> Measure:
        ref.unlink(missing_ok=True)
        return run_measured(llama_quantize_cmd(src, ref, qtype, threads))

    ref_m, ours_m = interleaved(RUNS, ref_run, ours_run)
    identical = same_bytes(ours, ref)
    ours.unlink(missing_ok=True)
    ref.unlink(missing_ok=True)
    ratio = ours_m.seconds / ref_m.seconds
    return {"source_bytes": src.stat().st_size, "type": qtype, "threads": threads,
            "gguf_upscale_quantize": ours_m.summary(), "llama_cpp_quantize": ref_m.summary(),
            "ours_over_llama_cpp": round(ratio, 3), "target_ratio": 1.0,
            "ours_peak_rss_mb": round(ours_m.max_rss / 1e6, 1), "llama_cpp_peak_rss_mb": round(ref_m.max_rss / 1e6, 1),
            "byte_identical": identical, "ok": identical and ratio <= 1.0}


def bench_run(work: Path, threads: int = 2, qtype: str = "Q4_K_M") -> dict:
    src = run_source(work)
    up, two, one = work / "two-step-F16.gguf", work / "two-step.gguf", work / "one-shot.gguf"

    def two_step() -> Measure:  # one run of the two-step path: both steps' times, the larger peak
        for p in (up, two):
            p.unlink(missing_ok=True)
        a = run_measured(cli("upscale", src, "--preset", "overlap-halves", "-o", up, "-q", "--no-model-card"))
        b = run_measured(llama_quantize_cmd(up, two, qtype, threads))
        return Measure(a.seconds + b.seconds, max(a.max_rss, b.max_rss))

    def one_shot() -> Measure:
        one.unlink(missing_ok=True)
        return run_measured(cli("run", src, "--preset", "overlap-halves", "-o", one, "--type", qtype,
                                "--threads", threads, "--no-smoke", "--no-model-card"))

    two_m, one_m = interleaved(RUNS, two_step, one_shot)
    identical = same_bytes(one, two)
    n = int(GGUFReader(src).fields["llama.block_count"].parts[-1][0])
    diff = upscaled_matches_source(src, up, overlap_halves(n))
    for p in (up, two, one):
        p.unlink(missing_ok=True)
    ratio = one_m.seconds / two_m.seconds
    return {"source_bytes": src.stat().st_size, "plan": f"overlap-halves ({n} -> {n * 3 // 2} layers)", "type": qtype,
            "threads": threads, "one_shot": one_m.summary(), "two_step": two_m.summary(),
            "one_shot_over_two_step": round(ratio, 3), "target_ratio": 0.75,
            "one_shot_peak_rss_mb": round(one_m.max_rss / 1e6, 1),
            "two_step_peak_rss_mb": round(two_m.max_rss / 1e6, 1),
            "target_rss_mb": 1000, "byte_identical": identical, "upscaled_matches_source": diff or True,
            "ok": identical and diff is None and ratio <= 0.75 and one_m.max_rss <= 1e9}


PLAIN_UPSCALE = """
import sys
from upscaler.pipeline import prepare
from upscaler.format.source import TensorReader
from upscaler.format.tensor_data import emit
from upscaler.format.writer import GGUFOutput
prep = prepare(sys.argv[1], preset=sys.argv[2])
with TensorReader() as reader:  # every tensor copied from the source: no sharing of duplicates
    GGUFOutput(prep.out, sys.argv[3], inputs=prep.input_paths).write(lambda t, sink: emit(t, reader, sink))
"""


def _fs_used(folder: Path) -> int:
    """Blocks in use, once settled: XFS frees an unlinked file's extents in the background."""
    last = -1
    for _ in range(100):
        os.sync()
        st = os.statvfs(folder)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        if used == last:
            return used
        last = used
        time.sleep(0.2)
    return last


def _mount_loop(work: Path, size: int) -> tuple[Path, str] | str:
    """A fresh XFS (reflink) or btrfs image mounted at work/reflink-mnt; or why it cannot be."""
    if os.geteuid() != 0:
        return "needs root to mount a loop filesystem"
    img, mnt = work / "reflink.img", work / "reflink-mnt"
    mnt.mkdir(exist_ok=True)
    for fs, mkfs in (("xfs", ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]), ("btrfs", ["mkfs.btrfs", "-q", "-f"])):
        if shutil.which(mkfs[0]) is None:
            continue
        img.unlink(missing_ok=True)
        with open(img, "wb") as f:
            f.truncate(size)
        if subprocess.run(mkfs + [str(img)], capture_output=True).returncode:
            continue
        if subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode == 0:
            return mnt, fs
    img.unlink(missing_ok=True)
    return "no mkfs.xfs/mkfs.btrfs, or loop mounts are not allowed here (apt-get install xfsprogs btrfs-progs)"


def bench_reflink(work: Path, threads: int = 2, size_gb: float = 4.0) -> dict:
    """Seed-style overlap-halves upscale written on a loop-mounted XFS/btrfs: duplicated layers cloned
    from their first copy (the tool's default) vs a plain write of every tensor; disk used, time, bytes."""
    n_embd, n_ff, n_vocab = (1024, 2816, 8000) if QUICK else (4096, 11008, 32000)
    size_gb = 0.3 if QUICK else size_gb
    per_layer = (2 * n_embd * n_embd + 2 * (n_embd // 4) * n_embd + 3 * n_embd * n_ff) * 2
    n_layer = max(4, int(np.ceil((size_gb * 1e9 - 2 * n_vocab * n_embd * 2) / per_layer)))
    n_layer += -n_layer % 4
    src = synthetic_model(work / f"synthetic-{n_layer}L-{n_embd}-F16.gguf", n_layer=n_layer, n_embd=n_embd,
                          n_ff=n_ff, n_vocab=n_vocab)
    out_estimate = int(src.stat().st_size * 1.5)
    mounted = _mount_loop(work, 3 * out_estimate + 1024**3)
    if isinstance(mounted, str):
        return {"skipped": mounted, "ok": None}
    mnt, fs = mounted
    try:
        plain, shared = mnt / "plain.gguf", mnt / "shared.gguf"
        cmds = {"plain": (plain, [sys.executable, "-c", PLAIN_UPSCALE, str(src), "overlap-halves", str(plain)]),
                "shared": (shared, cli("upscale", src, "--preset", "overlap-halves", "-o", shared, "-q",
                                       "--no-model-card"))}
        rows: dict[str, dict] = {}
        for order in (("plain", "shared"), ("shared", "plain")) * max(1, (RUNS + 1) // 2):  # alternate
            for label in order:
                path, cmd = cmds[label]
                path.unlink(missing_ok=True)
                before = _fs_used(mnt)
                m = run_measured(cmd)
                t0 = time.perf_counter()
                os.sync()  # the plain write leaves more dirty data behind: count getting it to disk too
                row: dict[str, Any] = {"s": m.seconds, "s_synced": m.seconds + time.perf_counter() - t0,
                       "used": _fs_used(mnt) - before, "apparent": path.stat().st_size,
                       "st_blocks": path.stat().st_blocks * 512}
                if label not in rows:
                    rows[label] = row
                    rows[label]["runs"] = {"s": [row["s"]], "s_synced": [row["s_synced"]]}
                else:  # disk use from the first run of each; times: the median over all runs
                    for k in ("s", "s_synced"):
                        rows[label]["runs"][k].append(row[k])
        for row in rows.values():
            for k in ("s", "s_synced"):
                t = row["runs"][k]
                row[k] = float(np.median(t))
                row[k + "_spread"] = round((max(t) - min(t)) / max(row[k], 1e-9), 3)
        identical = same_bytes(plain, shared)
        diff = upscaled_matches_source(src, shared, overlap_halves(n_layer))
        p, s = rows["plain"], rows["shared"]
        ratio = s["used"] / s["apparent"]
        unique = src.stat().st_size / s["apparent"]  # every source byte once: the floor for sharing
        return {
            "filesystem": f"{fs} on a loop image", "layers": f"{n_layer} -> {n_layer * 3 // 2}",
            "apparent_bytes": s["apparent"],
            "plain_fs_used_bytes": p["used"], "shared_fs_used_bytes": s["used"],
            "shared_used_over_apparent": round(ratio, 3), "unique_content_over_apparent": round(unique, 3),
            "du_st_blocks_bytes": s["st_blocks"], "du_note": "st_blocks (du) counts shared extents in full",
            "plain_s": round(p["s"], 2), "shared_s": round(s["s"], 2),
            "plain_spread": p["s_spread"], "shared_spread": s["s_spread"],
            "shared_over_plain_time": round(s["s"] / p["s"], 3),
            "plain_s_with_sync": round(p["s_synced"], 2), "shared_s_with_sync": round(s["s_synced"], 2),
            "shared_over_plain_time_with_sync": round(s["s_synced"] / p["s_synced"], 3),
            "byte_identical": identical, "matches_source": diff or True,
            "ok": identical and diff is None and unique - 0.02 <= ratio <= unique + 0.02,
        }
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        (work / "reflink.img").unlink(missing_ok=True)


DEMO_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
SWEEP_OVERLAP = "2..10:2"  # five candidates on the 30-layer demo model: 34, 38, ... 50 layers (0 is the source itself)


def demo_model(path: Path | None) -> Path:
    """The demo model (a real tokenizer, so it can be scored): `path`, or models/ of this checkout,
    fetched as `make models/...` does (scripts/fetch_demo_model.py) when missing."""
    if path is not None:
        if not path.is_file():
            raise SystemExit(f"--demo-model {path}: no such file")
        return path
    target = ROOT / "models" / DEMO_MODEL
    if not target.exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "fetch_demo_model.py"), "--dest", str(target.parent)]
        if subprocess.run(cmd).returncode != 0 or not target.exists():
            raise SystemExit("could not fetch the demo model (scripts/fetch_demo_model.py)")
    return target


def fs_type(path: Path) -> str:
    """The filesystem type holding `path`, from /proc/mounts (the longest mount point above it);
    `stat -f` names ext4 "ext2/ext3"."""
    real, best, kind = os.path.realpath(path), "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, f"{parts[2]} ({parts[0]} on {mnt})"
    return kind


def slices_layer_map(slices: str) -> list[int]:
    """'0:16,6:24,14:30' -> the source layer of every output layer."""
    out: list[int] = []
    for part in slices.split(","):
        a, b = part.rstrip("*").split(":")
        out += range(int(a), int(b))
    return out


def bench_sweep(work: Path, threads: int = 2, model: Path | None = None) -> dict:
    """`gguf-upscale sweep` of 5 candidates on the quantized demo model with `--type Q4_1 --mixture source`
    (its own type: nothing re-quantized), candidates built on a loop-mounted XFS holding the source
    (reflink) and in a plain folder. Evaluation: the source's scoring and each candidate's (its child
    process: start, load, decode), from the results file; overhead: everything else in the whole
    process's wall time, measured from outside (start-up, planning, building, removing, results).
    Targets: overhead <= 5% of the wall time on reflink, <= 15% on plain."""
    src = demo_model(model)
    tokens = ["--max-tokens", "128", "--ctx", "128"] if QUICK else ["--max-tokens", "1024", "--ctx", "512"]
    halves: dict[str, tuple[Path, Path]] = {}  # name -> (source, work dir)
    plain = work / "sweep-plain"
    plain.mkdir(exist_ok=True)
    halves["plain"] = (src, plain)
    skipped = None
    mounted = _mount_loop(work, 2 * 1024**3)  # source 98 MB, a candidate <= 143 MB, kept logits 201 MB
    if isinstance(mounted, str):
        skipped = mounted
    else:
        mnt, fs = mounted
        shutil.copyfile(src, mnt / src.name)
        halves["reflink"] = (mnt / src.name, mnt)
    results: dict[str, list[dict]] = {k: [] for k in halves}

    def sweep(name: str) -> Callable[[], Measure]:
        source, folder = halves[name]

        def one() -> Measure:
            out = folder / f"sweep-{len(results[name])}.json"
            m = run_measured(cli("sweep", source, "--overlap", SWEEP_OVERLAP, "--type", "Q4_1", "--mixture", "source",
                                 *tokens, "--threads", threads, "--work-dir", folder, "-o", out, "--force"))
            r = json.loads(out.read_text())
            out.unlink()
            r["wall_seconds"] = m.seconds
            r["loadavg"] = os.getloadavg()[0]  # other work on the machine slows evaluation (2 shared cores)
            results[name].append(r)
            return m
        return one

    try:
        interleaved(RUNS, *(sweep(k) for k in halves))
        res: dict[str, Any] = {"source": f"{src.name} ({src.stat().st_size / 1e6:.1f} MB, 30 layers, Q4_1/Q8_0)",
                               "candidates": f"--overlap {SWEEP_OVERLAP} --type Q4_1 --mixture source",
                               "scored": " ".join(tokens), "threads": threads}
        ok = True
        for name, runs in results.items():
            res.update(_sweep_figures(name, runs, halves[name][1], 0.05 if name == "reflink" else 0.15))
            ok = ok and res[f"{name}_ok"]
        if skipped:
            res["reflink_skipped"] = skipped
        else:
            res.update(_sweep_disk_check(halves["reflink"][0], mnt, results["reflink"][0]))
            ok = ok and res["kept_source_bytes"] is True
        res["ok"] = ok
        return res
    finally:
        shutil.rmtree(plain, ignore_errors=True)
        if not isinstance(mounted, str):
            subprocess.run(["umount", str(mounted[0])], capture_output=True)
            (work / "reflink.img").unlink(missing_ok=True)


def _sweep_figures(name: str, runs: list[dict], folder: Path, target: float) -> dict:
    """Medians over the runs of one half; judged on median overhead / median wall time."""
    def med(f: Callable[[dict], float]) -> float:
        return float(np.median([f(r) for r in runs]))

    def evaluation(r: dict) -> float:  # the source's and each candidate's child: start, load, decode
        return r["source_seconds"] + sum(c["eval_seconds"] for c in r["candidates"])

    failed = [f"{c['label']}: {c['error']}" for r in runs for c in r["candidates"] if c["error"]]
    wall = [r["wall_seconds"] for r in runs]
    overhead = med(lambda r: r["wall_seconds"] - evaluation(r))
    ratio = overhead / med(lambda r: r["wall_seconds"])
    return {
        f"{name}_filesystem": fs_type(folder), f"{name}_same_filesystem": runs[0]["same_filesystem"],
        f"{name}_wall_s": round(med(lambda r: r["wall_seconds"]), 2),
        f"{name}_wall_spread": round((max(wall) - min(wall)) / float(np.median(wall)), 3),
        f"{name}_evaluation_s": round(med(evaluation), 2),
        f"{name}_source_scoring_s": round(med(lambda r: r["source_seconds"]), 2),
        f"{name}_overhead_s": round(overhead, 2),
        f"{name}_build_s": round(med(lambda r: sum(c["build_seconds"] for c in r["candidates"])), 3),
        f"{name}_cleanup_s": round(med(lambda r: sum(c["cleanup_seconds"] for c in r["candidates"])), 3),
        f"{name}_rest_in_sweep_s": round(med(lambda r: r["overhead_seconds"] - sum(
            c["build_seconds"] + c["cleanup_seconds"] for c in r["candidates"])), 3),
        f"{name}_outside_sweep_s": round(med(lambda r: r["wall_seconds"] - r["total_seconds"]), 3),
        f"{name}_overhead_over_wall": round(ratio, 4), f"{name}_target": target,
        f"{name}_overhead_over_wall_runs": [round((r["wall_seconds"] - evaluation(r)) / r["wall_seconds"], 4)
                                            for r in runs],
        f"{name}_candidate_errors": failed or None,
        f"{name}_loadavg_1min": [round(r["loadavg"], 1) for r in runs],
        f"{name}_ok": not failed and len(runs[0]["candidates"]) == 5 and ratio <= target,
    }


def _sweep_disk_check(src: Path, mnt: Path, result: dict) -> dict:
    """The largest candidate built once more (`run`, as the sweep builds it) on the XFS: disk it takes
    (what reflink spared) and whether its tensors are the source's bytes (nothing re-quantized)."""
    cand = max(result["candidates"], key=lambda c: c["block_count"])
    out = mnt / "disk-check.gguf"
    before = _fs_used(mnt)
    run_measured(cli("run", src, "--slices", cand["slices"], "--type", "Q4_1", "--mixture", "source", "--no-smoke",
                     "--no-model-card", "-o", out))
    used = _fs_used(mnt) - before
    diff = upscaled_matches_source(src, out, slices_layer_map(cand["slices"]))
    size = out.stat().st_size
    out.unlink()
    return {"candidate_checked": f"{cand['label']} ({cand['slices']}, {size / 1e6:.1f} MB)",
            "candidate_fs_used_over_size": round(used / size, 3), "kept_source_bytes": diff or True}


BENCHES: dict[str, Callable[..., dict]] = {"upscale": bench_upscale, "quantize": bench_quantize, "run": bench_run,
                                           "reflink": bench_reflink, "sweep": bench_sweep}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: " + ", ".join(BENCHES))
    ap.add_argument("--size-gb", type=float, default=4.0, help="size of the synthetic F16 source for `upscale`")
    ap.add_argument("--dir", type=Path, default=ROOT / "out" / "bench")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads for both quantizers")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic models for the next run")
    ap.add_argument("--runs", type=int, default=3, help="runs of each contender (median and spread reported)")
    ap.add_argument("--quick", action="store_true", help="small sources, one run: check the harness")
    ap.add_argument("--demo-model", type=Path, default=None,
                    help=f"{DEMO_MODEL} for `sweep` (default: models/ here, fetched when missing)")
    args = ap.parse_args()
    global RUNS, QUICK
    RUNS, QUICK = (1 if args.quick else max(1, args.runs)), args.quick
    if args.quick:
        args.size_gb = min(args.size_gb, 0.3)
    args.dir.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for name in (n.strip() for n in args.only.split(",")):
            fn = BENCHES[name]
            print(f"== {name}", flush=True)
            if name == "upscale":
                res = fn(args.dir, args.size_gb)
            elif name == "sweep":
                res = fn(args.dir, threads=args.threads, model=args.demo_model)
            else:
                res = fn(args.dir, threads=args.threads)
            results[name] = res
            for k, v in res.items():
                print(f"  {k:<28} {v}")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / "bench.json").write_text(json.dumps(results, indent=2))
    verdict = {k: v.get("ok") for k, v in results.items()}
    print(json.dumps(verdict))
    missed = [k for k, ok in verdict.items() if ok is False]
    for k in missed:
        print(f"bench: {k} missed its target or its output differs from the reference", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
