"""End-to-end upscales with real GGUF files, checked byte-for-byte and by llama.cpp's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType

from helpers import cli, leftovers, metadata, tensor_bytes
from modelfactory import eval_logits, make_model
from upscaler.format.source import SourceModel

SEED_YAML = """\
merge_method: passthrough
slices:
  - sources:
      - model: ./karakuri-lm-70b-chat-v0.1
        layer_range: [0, 40]
  - sources:
      - model: ./karakuri-lm-70b-chat-v0.1
        layer_range: [20, 60]
  - sources:
      - model: ./karakuri-lm-70b-chat-v0.1
        layer_range: [40, 80]
dtype: bfloat16
"""

PROMPT_TOKENS = [1, 300, 301, 302, 310, 320, 330, 340, 350, 360, 370, 380]


def _logits(load_llama, path: Path) -> np.ndarray:
    return eval_logits(load_llama(path), PROMPT_TOKENS)


def _expected_bytes(src: dict[str, bytes], layer_map: list[int]) -> dict[str, bytes]:
    out = {k: v for k, v in src.items() if not k.startswith("blk.")}
    for i, j in enumerate(layer_map):
        for name, data in src.items():
            prefix = f"blk.{j}."
            if name.startswith(prefix):
                out[f"blk.{i}.{name[len(prefix):]}"] = data
    return out


def test_identity_is_byte_exact_and_same_logits(tiny_llama: Path, tmp_path: Path, load_llama) -> None:
    out = tmp_path / "identity.gguf"
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", out, check=True)
    assert tensor_bytes(out) == tensor_bytes(tiny_llama)
    np.testing.assert_array_equal(_logits(load_llama, out), _logits(load_llama, tiny_llama))
    assert leftovers(tmp_path) == []


def test_seed_yaml_verbatim_on_80_layers(llama80: Path, tmp_path: Path, load_llama) -> None:
    cfg = tmp_path / "seed.yaml"
    cfg.write_text(SEED_YAML)
    out = tmp_path / "seed-120.gguf"
    proc = cli("upscale", llama80, "--config", cfg, "-o", out, check=True)
    assert "120 layers" in proc.stdout
    layer_map = list(range(0, 40)) + list(range(20, 60)) + list(range(40, 80))
    assert tensor_bytes(out) == _expected_bytes(tensor_bytes(llama80), layer_map)
    md = metadata(out)
    assert md["llama.block_count"] == 120
    assert SourceModel(out).kvs["llama.block_count"].vtype == GGUFValueType.UINT32
    assert list(md["upscale.layer_source_index"]) == layer_map
    assert md["general.base_model.count"] == 1
    assert md["general.base_model.0.name"] == "Llama80"
    llm = load_llama(out)
    text = llm.create_completion("hello", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert isinstance(text, str)
    logits = eval_logits(llm, PROMPT_TOKENS)
    assert np.isfinite(logits).all()


def test_llama_pro_zero_copies_leave_logits_unchanged(tiny_llama: Path, tmp_path: Path, load_llama) -> None:
    out = tmp_path / "pro.gguf"
    cli("upscale", tiny_llama, "--preset", "llama-pro:every=2", "-o", out, check=True)
    md = metadata(out)
    assert md["llama.block_count"] == 6
    assert list(md["upscale.layer_source_index"]) == [0, 1, 1, 2, 3, 3]
    data = tensor_bytes(out)
    for blk in (2, 5):  # the inserted copies
        assert set(data[f"blk.{blk}.attn_output.weight"]) == {0}
        assert set(data[f"blk.{blk}.ffn_down.weight"]) == {0}
        assert set(data[f"blk.{blk}.attn_q.weight"]) != {0}
    np.testing.assert_allclose(_logits(load_llama, out), _logits(load_llama, tiny_llama), rtol=1e-4, atol=1e-4)


def test_split_input_and_output_load(tiny_llama: Path, tiny_llama_split: Path, tmp_path: Path, load_llama) -> None:
    middle_shard = tiny_llama_split.with_name(tiny_llama_split.name.replace("00001-of", "00002-of"))
    out = tmp_path / "split-out.gguf"
    proc = cli("upscale", middle_shard, "--slices", "0:4", "-o", out, "--split-max-size", "2M", check=True)
    shards = sorted(tmp_path.glob("split-out-*-of-*.gguf"))
    assert len(shards) >= 3, proc.stdout
    assert not out.exists()
    assert shards[0].name == f"split-out-00001-of-{len(shards):05d}.gguf"
    assert tensor_bytes(shards[1]) == tensor_bytes(tiny_llama)  # any shard opens the whole set
    md = metadata(shards[0])
    assert "split.count" not in md  # split keys are per shard and not carried as model metadata
    np.testing.assert_array_equal(_logits(load_llama, shards[0]), _logits(load_llama, tiny_llama))


def test_four_bit_source_duplicated_byte_exact(tiny_llama: Path, tmp_path: Path, load_llama) -> None:
    import llama_cpp

    q4 = tmp_path / "tiny-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(tiny_llama).encode(), str(q4).encode(), params) == 0
    out = tmp_path / "q4-up.gguf"
    cli("upscale", q4, "--slices", "0:3,1:4", "-o", out, check=True)
    assert tensor_bytes(out) == _expected_bytes(tensor_bytes(q4), [0, 1, 2, 1, 2, 3])
    assert np.isfinite(_logits(load_llama, out)).all()


def test_tied_model_stays_tied(tiny_llama_tied: Path, tmp_path: Path, load_llama) -> None:
    out = tmp_path / "tied-up.gguf"
    cli("upscale", tiny_llama_tied, "--preset", "solar", "-o", out, check=True)
    names = set(tensor_bytes(out))
    assert "output.weight" not in names and "token_embd.weight" in names
    assert metadata(out)["llama.block_count"] == 6  # 4 layers, drop 1: [0,3] + [1,4]
    assert np.isfinite(_logits(load_llama, out)).all()


def test_goliath_style_two_models(tmp_path: Path, load_llama) -> None:
    a = make_model(tmp_path / "a.gguf", seed=1, name="Model A")
    b = make_model(tmp_path / "b.gguf", seed=2, name="Model B")
    cfg = tmp_path / "goliath.yaml"
    cfg.write_text("""
merge_method: passthrough
slices:
  - sources: [{model: model-a, layer_range: [0, 2]}]
  - sources: [{model: model-b, layer_range: [1, 3]}]
  - sources: [{model: model-a, layer_range: [2, 4]}]
  - sources: [{model: model-b, layer_range: [3, 4]}]
""")
    out = tmp_path / "goliath.gguf"
    cli("upscale", "--config", cfg, "--model", f"model-a={a}", "--model", f"model-b={b}", "-o", out, check=True)
    got, ta, tb = tensor_bytes(out), tensor_bytes(a), tensor_bytes(b)
    src = [("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    for i, (m, j) in enumerate(src):
        ref = ta if m == "a" else tb
        assert got[f"blk.{i}.ffn_up.weight"] == ref[f"blk.{j}.ffn_up.weight"]
    assert got["token_embd.weight"] == ta["token_embd.weight"]  # first slice's model
    assert got["output.weight"] == tb["output.weight"]  # last slice's model
    assert got["output_norm.weight"] == tb["output_norm.weight"]
    md = metadata(out)
    assert md["general.base_model.count"] == 2
    assert {md["general.base_model.0.name"], md["general.base_model.1.name"]} == {"Model A", "Model B"}
    assert np.isfinite(_logits(load_llama, out)).all()


def test_linear_one_nonzero_source_is_passthrough(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a.gguf", seed=1)
    b = make_model(tmp_path / "b.gguf", seed=2)
    cfg = tmp_path / "miquliz.yaml"
    cfg.write_text("""
merge_method: linear
parameters:
  weight: 1.0
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
        parameters:
          weight: 0
  - sources:
      - model: a
        layer_range: [1, 3]
        parameters:
          weight: 0
      - model: b
        layer_range: [1, 3]
  - sources:
      - model: a
        layer_range: [3, 4]
""")
    out = tmp_path / "miquliz.gguf"
    cli("upscale", "--config", cfg, "--model", f"a={a}", "--model", f"b={b}", "-o", out, check=True)
    got, ta, tb = tensor_bytes(out), tensor_bytes(a), tensor_bytes(b)
    assert got["blk.0.attn_q.weight"] == ta["blk.0.attn_q.weight"]
    assert got["blk.2.attn_q.weight"] == tb["blk.1.attn_q.weight"]
    assert got["blk.4.attn_q.weight"] == ta["blk.3.attn_q.weight"]
    assert metadata(out)["llama.block_count"] == 5


def test_half_scale_on_f16(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "half.yaml"
    cfg.write_text("""
merge_method: passthrough
slices:
  - sources:
      - model: m
        layer_range: [0, 4]
        parameters:
          scale:
            - filter: down_proj
              value: 0.5
            - value: 1.0
""")
    out = tmp_path / "half.gguf"
    cli("upscale", tiny_llama, "--config", cfg, "-o", out, check=True)
    got, src = tensor_bytes(out), tensor_bytes(tiny_llama)
    a = np.frombuffer(got["blk.2.ffn_down.weight"], np.float16).astype(np.float32)
    b = np.frombuffer(src["blk.2.ffn_down.weight"], np.float16).astype(np.float32)
    np.testing.assert_array_equal(a, (b * 0.5).astype(np.float16).astype(np.float32))
    assert got["blk.2.ffn_up.weight"] == src["blk.2.ffn_up.weight"]


def test_per_layer_arrays_move_with_layers(tmp_path: Path) -> None:
    src = make_model(tmp_path / "arr.gguf", n_layer=4, n_ff=256,
                     extra_kv={"llama.attention.head_count_kv": ([2, 2, 2, 2], GGUFValueType.ARRAY, GGUFValueType.UINT32),
                               "llama.feed_forward_length": ([256, 256, 256, 256], GGUFValueType.ARRAY, GGUFValueType.UINT32)})
    out = tmp_path / "arr-up.gguf"
    cli("upscale", src, "--slices", "0:3,1:4", "-o", out, check=True)
    kv = SourceModel(out).kvs["llama.feed_forward_length"]
    assert kv.vtype == GGUFValueType.ARRAY and kv.sub_type == GGUFValueType.UINT32
    assert list(kv.value) == [256] * 6


def test_refuses_to_overwrite_without_force(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"precious")
    proc = cli("upscale", tiny_llama, "--slices", "0:4", "-o", out)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "--force" in proc.stderr
    assert out.read_bytes() == b"precious"
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", out, "--force", check=True)
    assert tensor_bytes(out) == tensor_bytes(tiny_llama)


def test_refuses_output_that_is_an_input(tiny_llama: Path, tmp_path: Path) -> None:
    link = tmp_path / "same.gguf"
    link.symlink_to(tiny_llama)
    before = tiny_llama.read_bytes()
    proc = cli("upscale", tiny_llama, "--slices", "0:4", "-o", link, "--force")
    assert proc.returncode != 0 and "one of its inputs" in proc.stderr
    assert tiny_llama.read_bytes() == before


@pytest.mark.parametrize("dtype", ["BF16", "Q8_0"])
def test_other_source_types_copy_exactly(dtype: str, tmp_path: Path, load_llama) -> None:
    src = make_model(tmp_path / f"src-{dtype}.gguf", dtype=dtype)
    out = tmp_path / f"up-{dtype}.gguf"
    cli("upscale", src, "--preset", "overlap-halves", "-o", out, check=True)
    assert tensor_bytes(out) == _expected_bytes(tensor_bytes(src), [0, 1, 1, 2, 2, 3])
    assert np.isfinite(_logits(load_llama, out)).all()
