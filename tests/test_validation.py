"""Every refusal happens before a byte is written: one `error:` line, non-zero exit, no output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter

from helpers import assert_one_line_error, cli, leftovers
from modelfactory import make_model


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def _check(proc, out: Path, *fragments: str) -> None:
    assert_one_line_error(proc, *fragments)
    assert not out.exists()
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("slices, fragments", [
    ("0:2,2:9", ("slice 1", "[2, 9]", "outside the model's 4 layers")),
    ("0:2,2:2", ("slice 1", "[2, 2]", "empty")),
    ("3:1", ("slice 0", "[3, 1]", "reversed")),
    ("0:2,x:4", ("--slices", "'x:4'")),
    ("0-4", ("--slices", "START:END")),
    ("-1:3", ("negative",)),
    ("0:99999999", ("absurdly large",)),
])
def test_bad_layer_ranges(tiny_llama: Path, tmp_path: Path, slices: str, fragments: tuple[str, ...]) -> None:
    out = tmp_path / "out.gguf"
    _check(cli("upscale", tiny_llama, "--slices", slices, "-o", out), out, *fragments)


def test_plan_reports_the_same_errors(tiny_llama: Path) -> None:
    assert_one_line_error(cli("plan", tiny_llama, "--slices", "0:2,2:9"), "outside the model's 4 layers")


def test_unknown_model_name(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, """
merge_method: passthrough
slices:
  - sources: [{model: base, layer_range: [0, 2]}]
  - sources: [{model: other-finetune, layer_range: [1, 4]}]
""")
    out = tmp_path / "out.gguf"
    _check(cli("upscale", "--config", cfg, "--model", f"base={tiny_llama}", "-o", out), out,
           "'other-finetune'", "--model other-finetune=PATH")


def test_model_option_not_in_recipe(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, "merge_method: passthrough\nslices:\n  - sources: [{model: base, layer_range: [0, 2]}]\n")
    out = tmp_path / "out.gguf"
    _check(cli("upscale", "--config", cfg, "--model", f"base={tiny_llama}", "--model", f"typo={tiny_llama}",
               "-o", out), out, "--model typo")


@pytest.mark.parametrize("method", ["slerp", "ties", "dare_ties", "task_arithmetic"])
def test_unsupported_merge_method(tiny_llama: Path, tmp_path: Path, method: str) -> None:
    cfg = _yaml(tmp_path, f"merge_method: {method}\nslices:\n  - sources: [{{model: m, layer_range: [0, 2]}}]\n")
    out = tmp_path / "out.gguf"
    _check(cli("upscale", tiny_llama, "--config", cfg, "-o", out), out, f"merge_method '{method}'")


def test_passthrough_slice_with_two_sources(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, """
merge_method: passthrough
slices:
  - sources: [{model: m, layer_range: [0, 2]}, {model: m, layer_range: [2, 4]}]
""")
    out = tmp_path / "out.gguf"
    _check(cli("upscale", tiny_llama, "--config", cfg, "-o", out), out, "slice 0 has 2 sources")


def test_linear_with_two_nonzero_sources_is_a_real_merge(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, """
merge_method: linear
parameters: {weight: 0.5}
slices:
  - sources: [{model: m, layer_range: [0, 2]}, {model: m, layer_range: [2, 4]}]
""")
    out = tmp_path / "out.gguf"
    _check(cli("upscale", tiny_llama, "--config", cfg, "-o", out), out, "slice 0: 2 sources have a non-zero weight")


def test_unsupported_architecture(tmp_path: Path) -> None:
    src = tmp_path / "mamba.gguf"
    w = GGUFWriter(src, "mamba")
    w.add_block_count(2)
    for i in range(2):
        w.add_tensor(f"blk.{i}.ssm_in.weight", np.zeros((4, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    _check(cli("upscale", src, "--slices", "0:2,0:2", "-o", out), out, "architecture 'mamba' is not supported")


def test_positional_metadata_refused_when_layers_move(tmp_path: Path) -> None:
    src = make_model(tmp_path / "dense.gguf",
                     extra_kv={"llama.leading_dense_block_count": (1, GGUFValueType.UINT32, None)})
    out = tmp_path / "out.gguf"
    _check(cli("upscale", src, "--slices", "0:3,1:4", "-o", out), out, "llama.leading_dense_block_count", "position")
    cli("upscale", src, "--slices", "0:4", "-o", out, check=True)  # identity keeps every layer in place


def test_incompatible_models_name_the_difference(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a.gguf", n_ff=512)
    b = make_model(tmp_path / "b.gguf", n_ff=256)
    cfg = _yaml(tmp_path, """
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 2]}]
  - sources: [{model: b, layer_range: [2, 4]}]
""")
    out = tmp_path / "out.gguf"
    proc = cli("upscale", "--config", cfg, "--model", f"a={a}", "--model", f"b={b}", "-o", out)
    _check(proc, out, "models 'a' and 'b'", "feed_forward_length")


def test_incompatible_vocabularies(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a.gguf", n_vocab=512)
    b = make_model(tmp_path / "b.gguf", n_vocab=768)
    cfg = _yaml(tmp_path, """
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 2]}]
  - sources: [{model: b, layer_range: [2, 4]}]
""")
    out = tmp_path / "out.gguf"
    _check(cli("upscale", "--config", cfg, "--model", f"a={a}", "--model", f"b={b}", "-o", out), out, "vocab")


@pytest.mark.parametrize("text, fragment", [
    ("merge_method: passthrough\nslices: [\n", "malformed YAML"),
    ("- just\n- a list\n", "expected a mergekit YAML mapping"),
    ("merge_method: passthrough\n", "neither slices nor models"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: m}]\n", "layer_range"),
    ("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
     "too many nodes"),
])
def test_malformed_config(tiny_llama: Path, tmp_path: Path, text: str, fragment: str) -> None:
    out = tmp_path / "out.gguf"
    _check(cli("upscale", tiny_llama, "--config", _yaml(tmp_path, text), "-o", out), out, fragment)


def test_unknown_keys_warn(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, "merge_method: passthrough\nslicez: 1\nslices:\n  - sources: [{model: m, layer_range: [0, 4]}]\n")
    proc = cli("plan", tiny_llama, "--config", cfg)
    assert proc.returncode == 0
    assert "warning:" in proc.stderr and "slicez" in proc.stderr


def test_recipe_options_are_exclusive(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    _check(cli("upscale", tiny_llama, "--slices", "0:4", "--preset", "solar", "-o", out), out, "exactly one of")
    _check(cli("upscale", tiny_llama, "-o", out), out, "exactly one of")


def test_unknown_preset_and_option(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    _check(cli("upscale", tiny_llama, "--preset", "nope", "-o", out), out, "unknown preset 'nope'", "llama-pro")
    _check(cli("upscale", tiny_llama, "--preset", "solar:every=2", "-o", out), out, "solar", "drop=N")


def test_source_problems(tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    _check(cli("upscale", tmp_path / "missing.gguf", "--slices", "0:1", "-o", out), out, "no such file")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOTGGUF" * 100)
    _check(cli("upscale", junk, "--slices", "0:1", "-o", out), out, "junk.gguf", "not a GGUF file")


def test_missing_shard(tiny_llama_split: Path, tmp_path: Path) -> None:
    import shutil
    folder = tmp_path / "partial"
    folder.mkdir()
    shards = sorted(tiny_llama_split.parent.glob("*-of-*.gguf"))
    for s in shards[:-1]:
        shutil.copy(s, folder / s.name)
    out = tmp_path / "out.gguf"
    _check(cli("upscale", folder / shards[0].name, "--slices", "0:4", "-o", out), out, "incomplete", shards[-1].name)


def test_truncated_source(tiny_llama: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_llama.read_bytes()[:-100_000])
    out = tmp_path / "out.gguf"
    _check(cli("upscale", cut, "--slices", "0:4", "-o", out), out, "cut.gguf", "truncated")


def test_no_space_is_refused_up_front(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil
    if shutil.which("mount") is None:
        pytest.skip("no mount")
    import os
    import subprocess
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "out.gguf"
        _check(cli("upscale", tiny_llama, "--slices", "0:4", "-o", out), out, "not enough free space")
    finally:
        subprocess.run(["umount", str(mnt)])
