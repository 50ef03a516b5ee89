"""At the prompt, as a newcomer on an 80-column terminal: --version, pipes, --help, plan's layout,
progress bars, imatrix without --source, dtype in a recipe, packaging."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, assert_one_line_error, cli, metadata
from upscaler import __version__

COMMANDS = ["plan", "upscale", "quantize", "run", "smoke", "imatrix", "verify", "inspect"]


def test_version_without_a_command() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gguf-upscale {__version__}"


def _piped(args: list[str], reader: str) -> subprocess.CompletedProcess[bytes]:
    """`gguf-upscale ARGS | READER` through a real pipe, in a shell as a user types it."""
    cmd = " ".join([sys.executable, "-c", "'from upscaler.cli import main; main()'", *args])
    return subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | {reader}"], capture_output=True,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "80"}, timeout=300)


@pytest.mark.parametrize("reader", ["head -2", "grep -q layers", "head -c 10"])
def test_closed_pipe_is_quiet(llama80: Path, reader: str) -> None:
    # a long output (the 80-layer plan, 120 layers of JSON) into a reader that stops early
    proc = _piped(["plan", str(llama80), "--slices", "0:40,20:60,40:80", "--json"], reader)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b"", proc.stderr


def test_help_reads_well_at_80_columns() -> None:
    for c in ["", *COMMANDS]:
        proc = cli(*([c] if c else []), "--help", env={"COLUMNS": "80"})
        assert proc.returncode == 0, (c, proc.stderr)
        lines = proc.stdout.splitlines()
        assert all(len(l) <= 80 for l in lines), (c, [l for l in lines if len(l) > 80])
        assert not re.search(r"…|\.\.\.$|<bool>|<str>|<int>|<path>|<list|\[\[|\{[A-Z]", proc.stdout), (c, proc.stdout)
        assert not [l for l in lines if re.search(r"[a-z]-$", l)], (c, "a word cut at its hyphen")
        assert len(lines) <= 80, (c, len(lines))
    run_help = cli("run", "--help", env={"COLUMNS": "80"}).stdout
    for opt in ("--output-tensor-type", "--token-embedding-type", "--pure", "--tensor-type", "--override-kv",
                "--allow-requantize", "Q4_K_M", "IQ4_XS"):
        assert opt in run_help
    assert re.search(r"15 Q4_K_M +4\.\d\d", run_help)  # bits per weight, as llama-quantize lists types
    assert "--keep-split" in cli("quantize", "--help").stdout


@pytest.mark.parametrize("columns", [80, 100, 160])
def test_plan_fits_the_terminal(llama80: Path, columns: int) -> None:
    proc = cli("plan", llama80, "--slices", "0:40,20:60,40:80", env={"COLUMNS": str(columns)}, check=True)
    lines = proc.stdout.splitlines()
    too_long = [l for l in lines if len(l) > columns and not l.startswith("  /")]
    assert not too_long, too_long
    ticks = next(l for l in lines if re.match(r"^ +0 ", l))
    rows = [l for l in lines if "src " in l]
    assert len(rows) == 3
    # each bar starts in the column of the tick of its first source layer: 0, 20 (n/4), 40 (n/2)
    for row, tick in zip(rows, ("0", "20", "40")):
        start = row.index("█")
        assert ticks[start:start + len(tick)] == tick, (row, ticks)
    copies = next(l for l in lines if l.strip().startswith("copies"))
    assert copies.index("1") == ticks.index("0")  # the copies row shares the origin
    assert copies.rstrip().endswith("1") and "2" in copies
    assert any("RAM" in l for l in lines) and any("KV cache" in l for l in lines)


def test_progress_bar_one_line_tensors_not_bytes() -> None:
    from rich.console import Console

    from upscaler.progress import BarProgress

    class T:
        name = "blk.0.attn_q.weight"

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bar = BarProgress("upscale+quantize", enabled=True, console=Console(file=io.StringIO(), width=80))
    bar.start(5_000_000_000, 407)
    for _ in range(200):
        bar.advance(T(), 10_000_000)
    console.print(bar._p.make_tasks_table(bar._p.tasks))
    bar.finish()
    lines = [l for l in buf.getvalue().splitlines() if l.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    assert "200/407 tensors" in lines[0] and "407 bytes" not in lines[0]
    assert re.search(r"2\.0/5\.0 GB", lines[0]), lines[0]


def test_imatrix_without_source(tiny_llama: Path, tmp_path: Path) -> None:
    from test_quantize_cli import source_imatrix
    im = source_imatrix(tiny_llama, tmp_path / "source.dat")
    with_src, without = tmp_path / "a.dat", tmp_path / "b.dat"
    cli("imatrix", im, "--source", tiny_llama, "--slices", "0:3,1:4", "-o", with_src, check=True)
    cli("imatrix", im, "--slices", "0:3,1:4", "-o", without, check=True)  # depth read from the imatrix
    assert with_src.read_bytes() == without.read_bytes()
    assert_one_line_error(cli("imatrix", im, "--preset", "overlap-halves", "-o", tmp_path / "c.dat"), "--source")
    assert_one_line_error(cli("imatrix", im, "--slices", "0:3,2:5", "-o", tmp_path / "d.dat"), "covers 4 layers")
    cli("imatrix", im, "--source", tiny_llama, "--preset", "overlap-halves", "-o", tmp_path / "e.dat", check=True)


def test_dtype_is_said_once_and_recorded(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("merge_method: passthrough\nslices:\n  - sources:\n      - model: src\n        layer_range: [0, 3]\n"
                   "  - sources:\n      - model: src\n        layer_range: [1, 4]\ndtype: bfloat16\n")
    out = tmp_path / "up.gguf"
    proc = cli("upscale", "--config", cfg, "--model", f"src={tiny_llama}", "-o", out, check=True)
    notes = [l for l in proc.stderr.splitlines() if "dtype" in l]
    assert len(notes) == 1 and "bfloat16" in notes[0] and "source types" in notes[0]
    assert yaml.safe_load(metadata(out)["upscale.recipe"])["dtype"] == "bfloat16"
    card = out.with_suffix(".md").read_text()
    assert "dtype: bfloat16" in card


def test_model_card_relation_size_and_title(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "up.gguf"
    proc = cli("upscale", tiny_llama, "--slices", "0:3,1:4", "-o", out, check=True)
    card = out.with_suffix(".md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model_relation"] == "merge"
    size = re.search(r"\), ([\d.]+ [KMG]?B)$", proc.stdout.splitlines()[0]).group(1)
    assert f"{size} in 1 file" in card
    long_name = "models--acme--tiny-llama-4l-instruct/snapshots/0123456789abcdef0123456789abcdef"
    src = tmp_path / "long.gguf"
    from modelfactory import make_model
    make_model(src, name=long_name)
    out2 = tmp_path / "long-up.gguf"
    proc = cli("upscale", src, "--slices", "0:3,1:4", "-o", out2, check=True)
    assert "--name" in proc.stderr
    body = out2.with_suffix(".md").read_text().split("\n---\n", 1)[1]
    title = next(l for l in body.splitlines() if l.startswith("# "))
    assert len(title) <= 52 and "snapshots" not in title, title


def test_packaging_is_warning_free(tmp_path: Path) -> None:
    """A fresh, isolated build of the wheel (setuptools as pyproject.toml asks for it): no warning
    about our own files (license table, classifiers, version), the LICENSE file inside."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", tmp_path, str(ROOT)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for bad in ("SetuptoolsDeprecationWarning", "License classifiers", "license` as a TOML table", "2027-Feb-18"):
        assert bad not in text, bad
    wheel = next(tmp_path.glob("gguf_upscale-*.whl"))
    assert f"-{__version__}-" in wheel.name
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in meta and f"Version: {__version__}" in meta
