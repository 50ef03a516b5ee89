"""quantize / run / imatrix / smoke through the CLI, checked against llama.cpp's own quantizer."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_one_line_error, cli, leftovers, tensor_bytes, tensor_types
from modelfactory import eval_logits, make_model
from upscaler.format.source import SourceModel
from upscaler.quant.imatrix import ImatrixData, LegacyEntry, save_imatrix
from upscaler.quant.quant_types import parse_quant_type

SEED = "0:40,20:60,40:80"


def llama_quantize(src: Path, dst: Path, type_name: str, imatrix: dict[str, np.ndarray] | None = None) -> Path:
    """The reference: llama.cpp's own driver (llama_model_quantize), like `llama-quantize`, with
    parameters from llama-cpp-python's constants (tests/llama_reference.py), not the code under test."""
    from llama_reference import Imatrix
    from llama_reference import llama_quantize as reference
    return reference(src, dst, type_name, imatrix=Imatrix(dict(imatrix)) if imatrix is not None else None)


def source_imatrix(model: Path, path: Path, seed: int = 0) -> Path:
    """A legacy imatrix for every 2-D weight of `model`, as llama-imatrix would write (ncall = 1)."""
    rng = np.random.default_rng(seed)
    entries = {}
    for name, t in sorted(SourceModel(model).tensors.items()):
        if len(t.shape) == 2 and name != "token_embd.weight":
            entries[name] = LegacyEntry(1, (rng.random(t.shape[0], dtype=np.float32) + 0.1))
    save_imatrix(ImatrixData(format="dat", entries=entries, datasets=["synthetic"], chunk_count=10), path)
    return path


@pytest.mark.parametrize("type_name", ["Q4_K_M", "q5_k_s", "Q8_0", "IQ4_XS"])
def test_quantize_equals_llama_quantize(tiny_llama: Path, tmp_path: Path, type_name: str) -> None:
    ours = tmp_path / "ours.gguf"
    cli("quantize", tiny_llama, "-o", ours, "--type", type_name, "--threads", "2", check=True)
    ref = llama_quantize(tiny_llama, tmp_path / "ref.gguf", type_name.upper())
    assert ours.read_bytes() == ref.read_bytes()  # whole file: metadata, order, types, bytes


def test_quantize_requantizes_with_a_warning(tiny_llama_q8: Path, tmp_path: Path) -> None:
    ours = tmp_path / "q4.gguf"
    proc = cli("quantize", tiny_llama_q8, "-o", ours, check=True)
    assert "already quantized" in proc.stderr and "compounds" in proc.stderr
    ref = llama_quantize(tiny_llama_q8, tmp_path / "ref.gguf", "Q4_K_M")
    assert ours.read_bytes() == ref.read_bytes()


def test_quantize_split_output(tiny_llama: Path, tmp_path: Path, load_llama) -> None:
    out = tmp_path / "q.gguf"
    cli("quantize", tiny_llama, "-o", out, "--split-max-size", "600K", check=True)
    shards = sorted(tmp_path.glob("q-*-of-*.gguf"))
    assert len(shards) >= 2
    ref = llama_quantize(tiny_llama, tmp_path / "ref.gguf", "Q4_K_M")
    assert tensor_bytes(shards[0]) == tensor_bytes(ref)
    assert load_llama(shards[0]) is not None


def test_unknown_type_and_missing_imatrix(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    assert_one_line_error(cli("quantize", tiny_llama, "-o", out, "--type", "Q4_K_X"), "Q4_K_X", "Q4_K_M")
    assert_one_line_error(cli("quantize", tiny_llama, "-o", out, "--type", "iq2_xxs"), "IQ2_XXS", "importance matrix")
    assert not out.exists() and leftovers(tmp_path) == []


def test_imatrix_remap_enables_iq2(tiny_llama: Path, tmp_path: Path, load_llama) -> None:
    im = source_imatrix(tiny_llama, tmp_path / "source.dat")
    up = tmp_path / "up.gguf"
    cli("upscale", tiny_llama, "--slices", "0:3,1:4", "-o", up, check=True)
    # the source's imatrix does not name blk.4/blk.5: refused with a clear error, nothing written
    bad = tmp_path / "bad.gguf"
    proc = cli("quantize", up, "-o", bad, "--type", "IQ2_XXS", "--imatrix", im)
    assert_one_line_error(proc, "blk.4.", "gguf-upscale imatrix")
    assert not bad.exists()
    # carried over: quantizes, and equals llama.cpp's quantizer given the same remapped imatrix
    mapped = tmp_path / "up.dat"
    cli("imatrix", im, "--source", tiny_llama, "--slices", "0:3,1:4", "-o", mapped, check=True)
    ours = tmp_path / "iq2.gguf"
    cli("quantize", up, "-o", ours, "--type", "IQ2_XXS", "--imatrix", mapped, check=True)
    from upscaler.quant.imatrix import load_imatrix, quantize_entries
    ref = llama_quantize(up, tmp_path / "ref.gguf", "IQ2_XXS", quantize_entries(load_imatrix(mapped)))
    assert tensor_bytes(ours) == tensor_bytes(ref)
    assert "IQ2_XXS" in set(tensor_types(ours).values())
    assert np.isfinite(eval_logits(load_llama(ours), [1, 300, 301, 302])).all()


def test_run_target_mixture_equals_two_step_on_seed_plan(llama80: Path, tmp_path: Path) -> None:
    up = tmp_path / "up.gguf"
    cli("upscale", llama80, "--slices", SEED, "-o", up, check=True)
    two = llama_quantize(up, tmp_path / "two.gguf", "Q4_K_M")
    one = tmp_path / "one.gguf"
    proc = cli("run", llama80, "--slices", SEED, "-o", one, "--no-smoke", check=True)
    assert "reused" in proc.stdout
    assert one.read_bytes() == two.read_bytes()
    types = tensor_types(one)
    # the 120-layer model is no longer "70B": llama.cpp's positional rules decide per output layer
    assert types["blk.0.attn_v.weight"] == "Q6_K"
    assert len({types[f"blk.{i}.ffn_down.weight"] for i in range(120)}) == 2


def test_run_target_mixture_with_odd_widths(tmp_path: Path) -> None:
    src = make_model(tmp_path / "odd.gguf", n_layer=8, n_ff=320)
    up = tmp_path / "up.gguf"
    cli("upscale", src, "--preset", "overlap-halves", "-o", up, check=True)
    two = llama_quantize(up, tmp_path / "two.gguf", "Q4_K_M")
    one = tmp_path / "one.gguf"
    cli("run", src, "--preset", "overlap-halves", "-o", one, "--no-smoke", check=True)
    assert one.read_bytes() == two.read_bytes()
    assert tensor_types(one)["blk.0.ffn_down.weight"] in ("Q5_0", "Q8_0", "Q6_K")


def test_run_source_mixture_copies_are_identical(llama80: Path, tmp_path: Path) -> None:
    out = tmp_path / "src-mix.gguf"
    cli("run", llama80, "--slices", SEED, "-o", out, "--mixture", "source", "--no-smoke", check=True)
    data = tensor_bytes(out)
    sources = list(range(0, 40)) + list(range(20, 60)) + list(range(40, 80))
    copies: dict[int, list[int]] = defaultdict(list)
    for i, j in enumerate(sources):
        copies[j].append(i)
    suffixes = [n.split(".", 2)[2] for n in data if n.startswith("blk.0.")]
    for j, outs in copies.items():
        for suffix in suffixes:
            assert len({data[f"blk.{i}.{suffix}"] for i in outs}) == 1, (j, suffix)
    # and those bytes are what quantizing the 80-layer source gives for that layer
    ref = tensor_bytes(llama_quantize(llama80, tmp_path / "src-q4.gguf", "Q4_K_M"))
    assert data["blk.45.attn_v.weight"] == ref["blk.25.attn_v.weight"]
    assert data["blk.45.ffn_down.weight"] == ref["blk.25.ffn_down.weight"]


def test_run_with_source_imatrix_maps_it(tiny_llama: Path, tmp_path: Path) -> None:
    im = source_imatrix(tiny_llama, tmp_path / "source.dat")
    one = tmp_path / "one.gguf"
    cli("run", tiny_llama, "--slices", "0:3,1:4", "-o", one, "--type", "IQ2_XXS", "--imatrix", im, "--no-smoke", check=True)
    up = tmp_path / "up.gguf"
    cli("upscale", tiny_llama, "--slices", "0:3,1:4", "-o", up, check=True)
    mapped = tmp_path / "up.dat"
    cli("imatrix", im, "--source", tiny_llama, "--slices", "0:3,1:4", "-o", mapped, check=True)
    from upscaler.quant.imatrix import load_imatrix, quantize_entries
    two = llama_quantize(up, tmp_path / "two.gguf", "IQ2_XXS", quantize_entries(load_imatrix(mapped)))
    assert tensor_bytes(one) == tensor_bytes(two)
    md = SourceModel(one).kvs
    assert md["quantize.imatrix.entries_count"].value == 4 * 7 + 1  # the source imatrix as given
    assert md["quantize.imatrix.file"].value == str(im)
    assert md["general.file_type"].value == parse_quant_type("IQ2_XXS").ftype


def test_run_on_four_bit_source_copies_tensors(tiny_llama: Path, tmp_path: Path) -> None:
    q4 = llama_quantize(tiny_llama, tmp_path / "q4.gguf", "Q4_K_M")
    out = tmp_path / "up-q4.gguf"
    proc = cli("run", q4, "--slices", "0:3,1:4", "-o", out, "--no-smoke", check=True)
    assert "already quantized" in proc.stderr
    assert "copied unchanged" in proc.stdout
    src, got = tensor_bytes(q4), tensor_bytes(out)
    assert got["blk.4.ffn_up.weight"] == src["blk.2.ffn_up.weight"]


def test_run_smoke_report(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "q8.gguf"
    proc = cli("run", tiny_llama, "--slices", "0:4", "-o", out, "--type", "Q8_0", "--threads", "1", check=True)
    assert "smoke: loaded" in proc.stdout and "top-1 agreement" in proc.stdout


def test_smoke_identity_and_noise(tiny_llama: Path, tmp_path: Path) -> None:
    ident = tmp_path / "ident.gguf"
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", ident, check=True)
    rep = json.loads(cli("smoke", ident, "--reference", tiny_llama, "--json", "--threads", "1",
                         "--prompt", "日本語で", check=True).stdout)
    for key in ("loaded", "text", "perplexity", "reference_perplexity", "kl_divergence", "top1_agreement"):
        assert key in rep
    assert rep["loaded"] is True and rep["kl_divergence"] < 1e-6 and rep["top1_agreement"] == 1.0
    noisy = make_model(tmp_path / "noisy.gguf", seed=123)  # every weight different: a broken model
    proc = cli("smoke", noisy, "--reference", tiny_llama, "--json", "--threads", "1", "--min-agreement", "0.9")
    assert_one_line_error(proc, "agreement")


def test_smoke_refuses_garbage(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(100))
    assert_one_line_error(cli("smoke", junk))


def test_plan_sizes_are_exact(tiny_llama: Path, tmp_path: Path) -> None:
    doc = json.loads(cli("plan", tiny_llama, "--slices", "0:3,1:4", "--json", check=True).stdout)
    sizes = doc["stats"]["size_bytes_by_type"]
    out = tmp_path / "q.gguf"
    cli("run", tiny_llama, "--slices", "0:3,1:4", "-o", out, "--type", "Q4_K_M", "--no-smoke", check=True)
    assert sizes["Q4_K_M"] == SourceModel(out).n_bytes
    assert doc["plan"]["block_count"] == 6 and doc["stats"]["parameters"] > 0
