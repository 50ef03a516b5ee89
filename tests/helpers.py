"""Small helpers shared by the CLI-level tests: run the real command, read tensors back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from upscaler.format.source import SourceModel

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: object, check: bool = False, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `gguf-upscale ARGS...` as a user would (separate process, real exit code and stderr)."""
    cmd = [sys.executable, "-c", "from upscaler.cli import main; main()", *map(str, args)]
    full_env = {**os.environ, "COLUMNS": "120", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"gguf-upscale {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Non-zero exit, exactly one `error: ...` line on stderr, no traceback, naming what is wrong."""
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def shard_files(path: Path) -> list[Path]:
    """`path` itself, or every shard of the set when it is one `-0000I-of-0000N.gguf` shard."""
    m = re.fullmatch(r"(.*)-\d{5}-of-(\d{5})\.gguf", Path(path).name)
    if m is None:
        return [Path(path)]
    n = int(m.group(2))
    return [Path(path).with_name(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes, by name (any file or shard set), read by gguf-py's GGUFReader:
    an oracle independent of the project's own reader."""
    out: dict[str, bytes] = {}
    for p in shard_files(path):
        for t in GGUFReader(p).tensors:
            out[t.name] = np.ascontiguousarray(t.data).tobytes()
    return out


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for p in shard_files(path) for t in GGUFReader(p).tensors}


def metadata(path: Path) -> dict[str, object]:
    return {k: v.value for k, v in SourceModel(path).kvs.items()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders the writer might have left behind."""
    return [p.name for p in folder.iterdir() if ".gguf-upscale-tmp." in p.name]
