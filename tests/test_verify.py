"""`verify`: clean upscales pass; one flipped byte in any tensor, or tampered metadata, is found and named."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType

from helpers import cli
from modelfactory import make_model
from upscaler.checks.verify import format_report, verify_file
from upscaler.errors import RecipeError, SourceError, UpscaleError
from upscaler.format.source import SourceModel
from upscaler.quant.imatrix import ImatrixData, LegacyEntry, save_imatrix

SWA = "llama.attention.sliding_window_pattern"

TWO_MODELS = """\
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 3]}]
  - sources: [{model: b, layer_range: [1, 4]}]
"""

HALF_O_PROJ = """\
merge_method: passthrough
slices:
  - sources: [{model: src, layer_range: [0, 3]}]
  - sources:
      - model: src
        layer_range: [1, 4]
        parameters:
          scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]
"""

WHOLE_MODEL = """\
merge_method: passthrough
models:
  - model: src
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Sources and outputs, each output in its own folder (no source beside it): name -> (output, verify kwargs)."""
    d = tmp_path_factory.mktemp("verify")
    swa = {SWA: ([True, False, True, False], GGUFValueType.ARRAY, GGUFValueType.BOOL)}  # a per-layer array
    src = make_model(d / "src" / "tiny-F16.gguf", extra_kv=swa)
    other = make_model(d / "src" / "other-F16.gguf", seed=1, extra_kv=swa)
    split_src = make_model(d / "src" / "split" / "tiny-F16.gguf", split_max_size=2_000_000)
    (d / "two.yaml").write_text(TWO_MODELS)
    (d / "half.yaml").write_text(HALF_O_PROJ)
    (d / "whole.yaml").write_text(WHOLE_MODEL)
    one = {"sources": [str(src)]}
    jobs = {
        "slices": (["upscale", src, "--slices", "0:3,1:4"], one),
        "split": (["upscale", split_src, "--slices", "0:3,1:4", "--split-max-size", "3M"], {"sources": [str(split_src)]}),
        "llama-pro": (["upscale", src, "--preset", "llama-pro:every=2"], one),
        "half": (["upscale", src, "--config", d / "half.yaml"], one),
        "two-models": (["upscale", "--config", d / "two.yaml", "--model", f"a={src}", "--model", f"b={other}"],
                       {"models": [f"a={src}", f"b={other}"]}),
        "whole": (["upscale", src, "--config", d / "whole.yaml"], one),
        "q4": (["run", src, "--preset", "llama-pro:every=2", "--no-smoke", "--threads", "2"], one),
    }
    out: dict[str, tuple[Path, dict]] = {"_src": (src, {}), "_other": (other, {})}
    for name, (args, kwargs) in jobs.items():
        folder = d / name
        folder.mkdir()
        dest = folder / "out.gguf"
        cli(*args, "-o", dest, check=True)
        first = next(folder.glob("*-00001-of-*.gguf"), dest)
        out[name] = (first, kwargs)
    return out


def source_imatrix(model: Path, path: Path, seed: int = 0) -> Path:
    """A legacy imatrix for every 2-D weight but token_embd, as llama-imatrix writes it (ncall = 1)."""
    rng = np.random.default_rng(seed)
    entries = {name: LegacyEntry(1, rng.random(t.shape[0], dtype=np.float32) + 0.1)
               for name, t in sorted(SourceModel(model).tensors.items())
               if len(t.shape) == 2 and name != "token_embd.weight"}
    save_imatrix(ImatrixData(format="dat", entries=entries, datasets=["synthetic"], chunk_count=10), path)
    return path


def _copy(path: Path, dest: Path) -> Path:
    """Copy a file or shard set into `dest`; returns the path to give verify."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in SourceModel(path).paths:
        shutil.copy(p, dest / p.name)
    return dest / path.name


def _flip(path: Path, offset: int, rng: random.Random) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ rng.randrange(1, 256)]))


def _flip_tensor(path: Path, name: str, seed: int = 0) -> Path:
    """Flip one byte at a random place inside tensor `name` (any shard); returns that shard."""
    t = SourceModel(path).tensors[name]
    rng = random.Random(f"{name}:{seed}")
    _flip(t.path, t.offset + rng.randrange(t.n_bytes), rng)
    return t.path


def _kv_offset(path: Path, key: str) -> int:
    """Offset of the value of metadata `key` (after its type field) in `path`."""
    raw = path.read_bytes()[:4_000_000]
    needle = struct.pack("<Q", len(key)) + key.encode()
    at = raw.index(needle)
    return at + len(needle) + 4


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _named(report, name: str) -> list[str]:
    return [p for p in report.problems if p.startswith(f"{name}:") or f" {name} " in f" {p} "]


# --------------------------------------------------------------------------- clean outputs


@pytest.mark.parametrize("case", ["slices", "split", "llama-pro", "half", "two-models", "whole", "q4"])
def test_clean_output_verifies(built, case: str) -> None:
    out, kwargs = built[case]
    rep = verify_file(out, **kwargs)
    assert rep.ok, rep.problems
    c = rep.checked
    assert c["exact"] == c["tensors"] == len(SourceModel(out).tensors)
    assert c["not_verified"] == 0 and c["metadata_keys"] > 30
    if case == "llama-pro":
        assert c["zero"] == 4 and c["copy"] == c["tensors"] - 4
    if case == "half":
        assert c["scale"] == 3  # attn_output of the three layers of the second slice
    if case == "split":
        assert len(rep.files) > 1
    if case == "q4":
        assert rep.quantized and c["quantize"] > 0 and c["zero"] == 4
    json.dumps(rep.to_dict())
    assert format_report(rep).splitlines()[-1].startswith("ok: ")


def test_sources_found_beside_the_output(built, tmp_path: Path) -> None:
    src, _ = built["_src"]
    out, _ = built["slices"]
    shutil.copy(out, src.parent / "beside.gguf")
    try:
        rep = verify_file(src.parent / "beside.gguf")
    finally:
        (src.parent / "beside.gguf").unlink()
    assert rep.ok and rep.sources == {"tiny-F16.gguf": str(src)}
    assert rep.checked["exact"] == rep.checked["tensors"]


def test_two_models_matched_by_file_name(built) -> None:
    out, _ = built["two-models"]
    src, other = built["_src"][0], built["_other"][0]
    rep = verify_file(out, sources=[str(other), str(src)])  # order does not matter: recorded file names do
    assert rep.ok, rep.problems
    assert rep.sources == {"a": str(src), "b": str(other)}


def test_without_sources_checks_what_it_can(built) -> None:
    out, _ = built["llama-pro"]
    rep = verify_file(out)
    assert rep.ok and rep.mode == "no-sources"
    c = rep.checked
    assert c["zero"] == 4 and c["duplicates"] > 0 and c["values_only"] > 0
    assert any("not found" in n for n in rep.notes)


# --------------------------------------------------------------------------- one flipped byte


def _pick(out: Path, kind: str) -> str:
    names = list(SourceModel(out).tensors)
    return {"first": names[0], "last": names[-1], "norm": "blk.3.attn_norm.weight", "token_embd": "token_embd.weight",
            "zero": "blk.2.ffn_down.weight", "duplicate": "blk.5.attn_q.weight",
            "copied-from": "blk.1.attn_q.weight"}[kind]


KINDS = ["first", "last", "norm", "token_embd", "zero", "duplicate", "copied-from"]


@pytest.mark.parametrize("kind", KINDS)
def test_flipped_byte_is_found_and_named(built, tmp_path: Path, kind: str) -> None:
    out, kwargs = built["llama-pro"]  # layers 0 1 1z 2 3 3z: zero tensors and duplicated copies
    bad = _copy(out, tmp_path)
    name = _pick(bad, kind)
    _flip_tensor(bad, name)
    rep = verify_file(bad, **kwargs)
    assert not rep.ok
    assert rep.problems_total == 1 and _named(rep, name), rep.problems
    assert "byte " in rep.problems[0]


@pytest.mark.parametrize("kind", ["zero", "duplicate", "copied-from"])
def test_flipped_byte_found_without_sources(built, tmp_path: Path, kind: str) -> None:
    out, _ = built["llama-pro"]
    bad = _copy(out, tmp_path)
    name = _pick(bad, kind)
    _flip_tensor(bad, name)
    rep = verify_file(bad)
    assert not rep.ok and _named(rep, name), rep.problems


def test_flipped_byte_in_every_tensor_of_a_split_output(built, tmp_path: Path) -> None:
    out, kwargs = built["split"]
    names = list(SourceModel(out).tensors)
    for i, name in enumerate(names[::7] + [names[-1]]):
        bad = _copy(out, tmp_path / str(i))
        _flip_tensor(bad, name, seed=i)
        rep = verify_file(bad, **kwargs)
        assert rep.problems_total == 1 and _named(rep, name), (name, rep.problems)


def test_flipped_byte_in_scaled_tensor(built, tmp_path: Path) -> None:
    out, kwargs = built["half"]
    bad = _copy(out, tmp_path)
    _flip_tensor(bad, "blk.4.attn_output.weight")
    rep = verify_file(bad, **kwargs)
    assert _named(rep, "blk.4.attn_output.weight") and "x 0.5" in rep.problems[0]


@pytest.mark.parametrize("name", ["blk.2.ffn_down.weight", "blk.5.attn_q.weight", "token_embd.weight"])
def test_flipped_byte_in_quantized_output(built, tmp_path: Path, name: str) -> None:
    out, kwargs = built["q4"]
    bad = _copy(out, tmp_path)
    _flip_tensor(bad, name)
    rep = verify_file(bad, **kwargs)
    assert rep.problems_total == 1 and _named(rep, name), rep.problems


def test_bytes_after_the_last_tensor(built, tmp_path: Path) -> None:
    out, kwargs = built["slices"]
    bad = _copy(out, tmp_path)
    with open(bad, "ab") as f:
        f.write(bytes(64))
    rep = verify_file(bad, **kwargs)
    assert rep.problems_total == 1 and "64 unexpected bytes after the last tensor" in rep.problems[0], rep.problems


# --------------------------------------------------------------------------- metadata


def test_block_count_tampered(built, tmp_path: Path) -> None:
    out, kwargs = built["slices"]
    bad = _copy(out, tmp_path)
    _poke(bad, _kv_offset(bad, "llama.block_count"), struct.pack("<I", 7))
    for kw in (kwargs, {}):
        rep = verify_file(bad, **kw)
        assert any("llama.block_count is 7" in p and "6 layers" in p for p in rep.problems), rep.problems


def test_per_layer_array_tampered(built, tmp_path: Path) -> None:
    out, kwargs = built["slices"]  # layers 0 1 2 1 2 3: the pattern T F T F T F
    assert SourceModel(out).kvs[SWA].value == [True, False, True, False, True, False]
    bad = _copy(out, tmp_path)
    _poke(bad, _kv_offset(bad, SWA) + 4 + 8 + 3, b"\x01")  # sub type, count, then entry 3
    rep = verify_file(bad, **kwargs)
    assert rep.problems_total == 1 and f"{SWA}[3] is True, expected False" in rep.problems[0], rep.problems
    assert "layer 1 of" in rep.problems[0]
    rep = verify_file(bad)  # without the source: layer 3 and layer 1 are copies of the same layer
    assert any(f"{SWA}[3]" in p for p in rep.problems), rep.problems


@pytest.mark.parametrize("key,value,fragment", [
    ("split.count", struct.pack("<H", 4), "split.count is 4, expected"),
    ("split.tensors.count", struct.pack("<i", 50), "split.tensors.count is 50, expected"),
    ("split.no", struct.pack("<H", 0), "split.no is 0, expected 1"),
])
def test_split_keys_tampered(built, tmp_path: Path, key: str, value: bytes, fragment: str) -> None:
    out, kwargs = built["split"]
    bad = _copy(out, tmp_path)
    second = SourceModel(bad).paths[1]
    _poke(second, _kv_offset(second, key), value)
    rep = verify_file(bad, **kwargs)
    assert not rep.ok and any(fragment in p and second.name in p for p in rep.problems), rep.problems


def test_recorded_layer_map_tampered(built, tmp_path: Path) -> None:
    out, kwargs = built["slices"]
    bad = _copy(out, tmp_path)
    _poke(bad, _kv_offset(bad, "upscale.layer_source_index") + 4 + 8 + 4 * 3, struct.pack("<I", 0))
    for kw in (kwargs, {}):
        rep = verify_file(bad, **kw)
        assert any("output layer 3 is recorded as layer 0" in p for p in rep.problems), rep.problems


# --------------------------------------------------------------------------- wrong sources


def test_wrong_depth_source_is_an_error(built, tmp_path: Path) -> None:
    out, _ = built["slices"]
    deeper = make_model(tmp_path / "deeper.gguf", n_layer=5)
    with pytest.raises(SourceError, match="has 5 layers; the output was made from a model with 4") as e:
        verify_file(out, sources=[str(deeper)])
    assert "\n" not in str(e.value)


def test_wrong_width_source_is_an_error(built, tmp_path: Path) -> None:
    out, _ = built["slices"]
    wider = make_model(tmp_path / "wider.gguf", n_embd=512, n_ff=512)
    with pytest.raises(SourceError, match="does not match the output"):
        verify_file(out, sources=[str(wider)])


def test_same_shape_other_weights_every_copy_differs(built) -> None:
    out, _ = built["slices"]
    rep = verify_file(out, sources=[str(built["_other"][0])])
    assert not rep.ok
    assert rep.problems[0].startswith("no tensor matches its source")
    assert rep.problems_not_shown > 0  # capped, with the count of the rest
    assert "more" in format_report(rep)


def test_bad_source_options_are_errors(built, tmp_path: Path) -> None:
    out, _ = built["two-models"]
    src = str(built["_src"][0])
    with pytest.raises(RecipeError, match="names no model 'c'"):
        verify_file(out, models=[f"c={src}"])
    with pytest.raises(SourceError, match="no source given for model 'b'"):
        verify_file(out, models=[f"a={src}"])
    with pytest.raises(SourceError, match="no such file"):
        verify_file(out, models=[f"a={src}", f"b={tmp_path / 'missing.gguf'}"])
    plain = built["_src"][0]
    with pytest.raises(UpscaleError, match="no upscale recipe recorded"):
        verify_file(plain)


# --------------------------------------------------------------------------- importance matrix


def test_imatrix_quantized_output(built, tmp_path: Path) -> None:
    src = built["_src"][0]
    im = source_imatrix(src, tmp_path / "source.dat")
    out = tmp_path / "out" / "im.gguf"
    out.parent.mkdir()
    cli("run", src, "--slices", "0:3,1:4", "-o", out, "--imatrix", im, "--no-smoke", "--threads", "2", check=True)
    rep = verify_file(out, sources=[str(src)])
    assert rep.ok, rep.problems
    assert rep.checked["not_verified"] > 0 and any("importance matrix" in n for n in rep.notes)
    rep = verify_file(out, sources=[str(src)], imatrix=[str(im)])
    assert rep.ok and rep.checked["exact"] == rep.checked["tensors"], rep.problems
    _flip_tensor(out, "blk.4.ffn_up.weight")  # a copy of source layer 2, imatrix-quantized
    rep = verify_file(out, sources=[str(src)], imatrix=[str(im)])
    assert rep.problems_total == 1 and _named(rep, "blk.4.ffn_up.weight"), rep.problems
    rep = verify_file(out, sources=[str(src)])  # without the matrix: it differs from its identical copy blk.2
    assert rep.problems_total == 1 and "identical copy blk.2.ffn_up.weight" in rep.problems[0], rep.problems


def test_progress_sees_every_tensor(built) -> None:
    out, kwargs = built["slices"]
    calls: list[tuple] = []

    class Recorder:
        def start(self, total_bytes: int, total_tensors: int) -> None:
            calls.append(("start", total_bytes, total_tensors))

        def advance(self, tensor, n_bytes: int) -> None:
            calls.append(("advance", tensor.name, n_bytes))

        def finish(self) -> None:
            calls.append(("finish",))

    rep = verify_file(out, progress=Recorder(), **kwargs)
    assert rep.ok
    advanced = [c for c in calls if c[0] == "advance"]
    assert calls[0] == ("start", rep.checked["bytes"], len(advanced)) and calls[-1] == ("finish",)
    assert sum(c[2] for c in advanced) == rep.checked["bytes"]


def test_cli_verify_ok_and_flipped_byte(built, tmp_path: Path) -> None:
    """The command a user runs: exit 0 and an `ok:` summary; after one flipped byte, exit 1, the
    tensor named on stdout and one `error:` line on stderr."""
    out, kwargs = built["llama-pro"]
    good = cli("verify", out, "--source", kwargs["sources"][0])
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().splitlines()[-1].startswith("ok: ")
    bad = _copy(out, tmp_path)
    _flip_tensor(bad, "blk.2.ffn_down.weight")
    proc = cli("verify", bad, "--source", kwargs["sources"][0], "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and any("blk.2.ffn_down.weight" in p for p in doc["problems"])
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert errors == [f"error: {bad}: 1 problem(s) found"] and "Traceback" not in proc.stderr
