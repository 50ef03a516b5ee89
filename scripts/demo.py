#!/usr/bin/env python3
"""`make demo`: the whole pipeline on a real small model, through the CLI a user would type.

plan -> upscale (tensor types kept) -> quantize to Q4_K_M -> smoke test against the source,
then the one-shot `run` (with its model card) and `verify`; `layers` (which layers change the
hidden state least) and a `sweep` of the preset against a plan that repeats those layers; and a
short report of sizes, perplexities, agreement and text.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(title: str, *args: object, capture: bool = False, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["gguf-upscale", *map(str, args)]
    if not quiet:
        print(f"\n== {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from upscaler.cli import main; main()", *map(str, args)],
                          text=True, capture_output=capture)
    if capture:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed: {title} (exit {proc.returncode})")
    if not quiet:
        print(f"   ({time.perf_counter() - t0:.1f} s)")
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--preset", default="overlap-halves")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    up = args.out / "upscaled.gguf"
    q4 = args.out / "upscaled-Q4_K_M.gguf"
    one = args.out / "oneshot-Q4_K_M.gguf"

    step("plan: validate the recipe and show the layer map", "plan", args.source, "--preset", args.preset)
    step("upscale: write the deeper model, tensor types unchanged", "upscale", args.source,
         "--preset", args.preset, "-o", up, "--force")
    step("inspect the result", "inspect", up)
    step("quantize to Q4_K_M with llama.cpp's kernels", "quantize", up, "-o", q4, "--type", "Q4_K_M", "--force")
    smoke = step("smoke test against the source", "smoke", q4, "--reference", args.source,
                 "--prompt", "The capital of France is", "--json", capture=True)
    report = json.loads(smoke.stdout)
    step("one-shot run: upscale + quantize once per distinct tensor + smoke test + model card", "run", args.source,
         "--preset", args.preset, "-o", one, "--type", "Q4_K_M", "--force")
    step("verify: recompute every tensor of the one-shot output from the source", "verify", one,
         "--source", args.source)
    card = one.with_suffix(".md")
    step("layers: how much each layer changes the hidden state", "layers", args.source, "--max-tokens", 512)
    n = json.loads(step("", "inspect", args.source, "--json", capture=True, quiet=True).stdout)["block_count"]
    mid = f"0:{n * 5 // 8},{n * 3 // 8}:{n}"  # the middle quarter twice: where `layers` finds the least change
    results = args.out / "sweep.json"
    step("sweep: the preset against a plan repeating the middle layers, scored against the source", "sweep",
         args.source, "--preset", args.preset, "--slices", mid, "--max-tokens", 512, "-o", results, "--force")
    sweep = json.loads(results.read_text(encoding="utf-8"))

    def mb(p: Path) -> str:
        files = [p] if p.exists() else sorted(p.parent.glob(f"{p.stem}-*-of-*.gguf"))
        return f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB"

    print("\n== report")
    print(f"  source          {args.source.name}: {mb(args.source)}")
    print(f"  upscaled        {up.name}: {mb(up)}")
    print(f"  Q4_K_M          {q4.name}: {mb(q4)}")
    print(f"  one-shot Q4_K_M {one.name}: {mb(one)}"
          + (" (byte-identical to the two-step "
             "file)" if one.read_bytes() == q4.read_bytes() else " (DIFFERS from the two-step file)"))
    print(f"  perplexity      {report['perplexity']:.2f} ± {report['perplexity_uncertainty']:.2f} "
          f"(source {report['reference_perplexity']:.2f} ± {report['reference_perplexity_uncertainty']:.2f}; "
          f"ratio {report['perplexity_ratio']:.3f} ± {report['perplexity_ratio_uncertainty']:.3f})")
    print(f"  KL divergence   {report['kl_divergence']:.4f} ± {report['kl_divergence_uncertainty']:.4f} nats/token "
          f"(median {report['kl_divergence_median']:.4f}, 99% {report['kl_divergence_p99']:.3f}, "
          f"max {report['kl_divergence_max']:.3f})")
    print(f"  top-1 agreement {report['top1_agreement']:.1%} ± {report['top1_agreement_uncertainty']:.1%} "
          f"over {report['n_tokens_scored']} tokens (llama-perplexity's \"same top p\")")
    print(f"  generated       {report['text']!r}")
    ranked = "; ".join(f"{c['label']} {c['perplexity']:.2f}" for c in sweep["candidates"] if c.get("perplexity"))
    print(f"  sweep           PPL {ranked} (source {sweep['source_perplexity']:.2f}); best: {sweep['best']}")
    print(f"  model card      {card} ({len(card.read_text(encoding='utf-8').splitlines())} lines, ready to publish "
          "as README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
