"""`layers`: block influence read through llama.cpp's eval callback, on models whose answer is known.

The fixture is an 8-layer llama in which layers 2, 3 and 4 are exact identities (their
attention output and FFN down projections are zero, so each adds nothing to the residual
stream) and layer 6 is made to matter (those projections scaled up 16x). Oracles:

- the known answer: an identity layer's distance is 0; the scaled layer's is the largest;
- llama.cpp's public embeddings API: with the output norm's weight set to 1, the per-token
  embeddings of a model truncated to k layers point along the hidden state after layer k,
  so two truncated models give a layer's distance without our callback (layer 0's input is
  the token's row of token_embd, read from the file);
- a sweep of plans that repeat the identity layers vs the mattering ones: repeating an
  identity layer cannot change the output (KL 0, the source's perplexity), repeating layer 6 must.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from helpers import assert_one_line_error, cli
from modelfactory import ARCHS, make_model
from upscaler.checks.layer_influence import measure_layers, windows_of
from upscaler.checks.llama_params import open_llama
from upscaler.errors import SmokeError

IDENTITY = (2, 3, 4)
MATTERS = 6
TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 4).strip()


def _edit(path: Path, fn) -> None:
    reader = GGUFReader(path, "r+")
    for t in reader.tensors:
        fn(t)
    reader.data.flush()
    del reader


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 layers, F32 (exact zeros and scales); identity layers 2-4, layer 6 scaled; output norm 1."""
    path = make_model(tmp_path_factory.mktemp("layers") / "known.gguf", n_layer=8, dtype="F32", seed=7)

    def edit(t) -> None:
        name = t.name
        if name == "output_norm.weight":
            t.data[...] = 1.0
        for il in IDENTITY:
            if name in (f"blk.{il}.attn_output.weight", f"blk.{il}.ffn_down.weight"):
                t.data[...] = 0.0
        if name in (f"blk.{MATTERS}.attn_output.weight", f"blk.{MATTERS}.ffn_down.weight"):
            t.data[...] *= 16.0

    _edit(path, edit)
    return path


@pytest.fixture(scope="module")
def measured(known: Path):
    return measure_layers(known, text=TEXT, n_ctx=256, max_tokens=1000, n_threads=1)


def test_identity_layers_measure_zero_and_the_scaled_layer_the_most(measured) -> None:
    pl = measured.per_layer.mean
    assert measured.n_layer == 8 and len(pl) == 8
    for il in IDENTITY:
        assert pl[il] < 1e-4, (il, pl)
    others = [pl[i] for i in range(8) if i not in IDENTITY]
    assert min(others) > 0.01, pl
    assert max(range(1, 8), key=lambda i: pl[i]) == MATTERS, pl
    assert measured.per_layer.least() in IDENTITY
    assert measured.spans[2].least() in (2, 3)  # layers 2-3 or 3-4: both identities
    assert measured.spans[2].mean[measured.spans[2].least()] < 1e-4
    assert measured.spans[4].least() in (1, 2)  # the 4-span holding the three identities
    assert 8 in measured.spans and len(measured.spans[8].mean) == 1


def test_span_distance_is_the_distance_between_its_ends(measured) -> None:
    """A span of identities changes nothing; a span's distance is not a sum of its layers'."""
    s2 = measured.spans[2].mean
    assert s2[2] < 1e-4 and s2[3] < 1e-4
    assert s2[1] == pytest.approx(measured.per_layer.mean[1], abs=1e-4)  # layer 2 adds nothing to 1
    assert s2[4] == pytest.approx(measured.per_layer.mean[5], abs=1e-4)  # layer 4 adds nothing to 5


def _embeddings(path: Path) -> np.ndarray:
    """Per-token embeddings (llama.cpp's result_norm) of TEXT, through the public API."""
    import llama_cpp

    llm = open_llama(path, n_ctx=256, n_batch=256, n_ubatch=256, embedding=True,
                     pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, verbose=False, n_threads=1)
    try:
        return np.asarray(llm.embed(TEXT), dtype=np.float64)
    finally:
        llm.close()


def _first(path: Path, k: int, folder: Path) -> Path:
    """The model's first k layers (llama.cpp reads it as a k-layer model)."""
    out = folder / f"first{k}.gguf"
    cli("upscale", path, "--slices", f"0:{k}", "-o", out, check=True)
    return out


def _tokens(path: Path) -> list[int]:
    llm = open_llama(path, n_ctx=256, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(TEXT.encode("utf-8"), add_bos=True, special=False)
    finally:
        llm.close()


def test_distances_match_llama_cpp_embeddings_of_truncated_models(known: Path, measured, tmp_path: Path) -> None:
    embs = {k: _embeddings(_first(known, k, tmp_path)) for k in (4, 5, 6, 7)}
    assert embs[4].shape[0] == measured.n_tokens + 1  # one window; its first token left out
    embs[1] = _embeddings(_first(known, 1, tmp_path))
    # layer 0's input is the token's embedding row (llama does not scale it): read it from the file
    tokens = _tokens(known)
    table = {t.name: t for t in GGUFReader(known).tensors}["token_embd.weight"]
    embs[0] = np.asarray(table.data, dtype=np.float64)[tokens]
    for k in (0, 4, 5, 6):
        a, b = embs[k][1:], embs[k + 1][1:]
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        want = float(np.mean(np.arccos(np.clip(cos, -1, 1)) / math.pi))
        assert measured.per_layer.mean[k] == pytest.approx(want, abs=2e-4), k  # layer k: state k -> k+1
    assert embs[4].shape[0] == len(tokens)


def test_windows_leave_out_each_first_token_and_stop_at_max_tokens() -> None:
    assert windows_of(10, 4, 100) == [(0, 4), (4, 8), (8, 10)]
    assert windows_of(100, 16, 20) == [(0, 16), (16, 22)]  # 15 + 5 measured
    with pytest.raises(SmokeError, match="too short"):
        windows_of(1, 16, 20)


def test_cli_chart_json_and_80_columns(known: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    proc = cli("layers", known, "--text-file", text, "--ctx", 64, "--threads", 1, env={"COLUMNS": "80"},
               check=True)
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "text.txt" in proc.stdout and "8 layers" in proc.stdout
    assert any(line.strip().startswith("2 layers") and ("layers 2-3" in line or "layers 3-4" in line)
               for line in lines), proc.stdout
    js = json.loads(cli("layers", known, "--text-file", text, "--ctx", 64, "--threads", 1, "--json",
                        check=True).stdout)
    assert [row["layer"] for row in js["layers"]] == list(range(8))
    assert js["layers"][3]["distance"] < 1e-4
    assert set(js["spans"]) == {"2", "4", "8"}
    assert js["spans"]["8"]["least"] == {"first": 0, "last": 7, "distance": js["spans"]["8"]["spans"][0]["distance"]}
    assert js["n_tokens_measured"] > 0 and js["text"] == "text.txt"


def test_plot_is_written_and_not_overwritten_without_force(known: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    cli("layers", known, "--ctx", 64, "--max-tokens", 64, "--threads", 1, "--plot", png, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.read_bytes()
    proc = cli("layers", known, "--ctx", 64, "--max-tokens", 64, "--plot", png)
    assert_one_line_error(proc, "exists", "--force")
    assert png.read_bytes() == before


def test_bad_input_is_one_line(known: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli("layers", tmp_path / "missing.gguf"), "missing.gguf")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert_one_line_error(cli("layers", known, "--text-file", empty), "empty")
    assert_one_line_error(cli("layers", known, "--ctx", 2), "--ctx")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(known.read_bytes()[:5000])
    assert_one_line_error(cli("layers", bad), "bad.gguf")


def test_a_crash_in_llama_cpp_is_one_line(known: Path) -> None:
    proc = cli("layers", known, "--ctx", 64, "--max-tokens", 64, env={"GGUF_UPSCALE_EVAL_CRASH": "measuring:SIGSEGV"})
    assert_one_line_error(proc, "crashed")


def test_sweep_sees_repeated_identities_as_the_source(known: Path, tmp_path: Path) -> None:
    """Repeating identity layers cannot change the output; repeating layer 6 must (known answer).

    (The fixture's random weights make its perplexity meaningless, so which way layer 6 moves it is
    not known: tests/test_sweep.py checks the ranking against separately measured perplexities.)"""
    res = tmp_path / "sweep.json"
    shutil.copy(known, tmp_path / "src.gguf")
    proc = cli("sweep", tmp_path / "src.gguf", "--slices", "0:7,5:8", "--slices", "0:5,2:8",
               "--slices", "0:4,3:8", "--ctx", 64, "--max-tokens", 120, "--threads", 1, "-o", res, "--json")
    assert proc.returncode == 0, proc.stderr
    js = json.loads(res.read_text())
    rows = {c["label"]: c for c in js["candidates"]}
    for label in ("0:5,2:8", "0:4,3:8"):  # identities repeated: the source's output exactly
        assert rows[label]["kl_divergence"] < 1e-6 and rows[label]["top1_agreement"] == 1.0, rows[label]
        assert rows[label]["perplexity"] == pytest.approx(js["source_perplexity"], rel=1e-6)
    moved = rows["0:7,5:8"]
    assert moved["kl_divergence"] > 1e-3 and moved["top1_agreement"] < 1.0, moved
    ppl = [c["perplexity"] for c in js["candidates"]]
    assert ppl == sorted(ppl)  # ranked by perplexity, whichever way layer 6 moved it


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_supported_family_is_measured(arch: str, tmp_path: Path) -> None:
    """Pre-norm, post-norm (olmo2), learned positions (gpt2), scaled embeddings (gemma), experts:
    each family's graph gives layer 0's input and every l_out-N."""
    path = make_model(tmp_path / f"{arch}.gguf", arch=arch, n_layer=4)
    r = measure_layers(path, text=TEXT, n_ctx=64, max_tokens=64, n_threads=1)
    assert r.n_layer == 4 and r.arch == arch and r.n_tokens == 64
    assert all(0.0 < d < 1.0 for d in r.per_layer.mean), r.per_layer.mean
