"""Per-architecture support: every supported arch upscales into a model llama.cpp loads, with the
source's logits for an identity recipe and for zero-residual inserted layers; positional metadata
is re-expressed per layer (sliding-window patterns) or refused with one clear line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from typer.testing import CliRunner

from helpers import assert_one_line_error, cli, metadata, tensor_bytes
from modelfactory import ARCHS, SLIDING_WINDOW, eval_logits, load_llama, make_model
from upscaler.planning import archs

BOOL, U32 = GGUFValueType.BOOL, GGUFValueType.UINT32
TEXT = b"the cat and the dog " * 20  # ~100 tokens: well past the fixtures' 32-token sliding window

# arch -> (n_layer, extra make_model kwargs), from the one fixture table (modelfactory.ARCHS): every
# row is a supported architecture and every supported architecture has a row. Small widths (n_embd
# 256, 512-token vocab), 4 layers unless a rule needs more (gemma3's period of 6, smollm3's every
# 4th layer, deci's per-layer kinds).
FIXTURES: dict[str, tuple[int, dict[str, Any]]] = {
    name: (spec.fixture.get("n_layer", 4), {k: v for k, v in spec.fixture.items() if k != "n_layer"})
    for name, spec in ARCHS.items()
}
PER_LAYER = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")

# Every architecture name in the vendored llama.cpp's src/llama-arch.cpp (llama-cpp-python 0.3.36).
LLAMA_CPP_ARCHS = """
clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert nomic-bert
nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2 qwen2moe qwen2vl qwen3 qwen3moe
qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell orion internlm2
minicpm minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2 mamba mamba2 maple
jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm arctic deepseek
deepseek2 deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2 nemotron
nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe granitehybrid
graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe bailingmoe2 bailingmoe3 dots1 dots3note arcee
afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe
dream smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm rnd1
pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35 spark2_5 llama-embed maincoder kimi-linear
kimi-k3 glm5-next talkie mellum nanbeige qwen3tts pockettts
""".split()

_cache: dict[str, tuple[Path, np.ndarray]] = {}


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI in-process (the same Typer app, no interpreter start-up) for the many successful runs;
    refusals go through helpers.cli, a real separate process."""
    from upscaler.cli import app
    r = CliRunner().invoke(app, [str(a) for a in args])
    proc = subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)
    if check and r.exit_code != 0:
        raise AssertionError(f"gguf-upscale {' '.join(map(str, args))} failed ({r.exit_code}):\n{r.stderr}{r.exception!r}")
    return proc


def _load(path: Path):
    return load_llama(path, n_threads=1, n_threads_batch=1)  # same math; no thread spinning on busy CI cores


def _logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = _load(path)
    try:
        return eval_logits(llm, tokens)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def tokens(model_dir: Path) -> list[int]:
    llm = _load(make_model(model_dir / "arch-tok.gguf", n_layer=1))
    try:
        return llm.tokenize(TEXT)
    finally:
        llm.close()


def _source(model_dir: Path, arch: str, tokens: list[int]) -> tuple[Path, np.ndarray]:
    if arch not in _cache:
        n_layer, kw = FIXTURES[arch]
        path = make_model(model_dir / f"arch-{arch}.gguf", arch=arch, n_layer=n_layer, name=f"Tiny {arch}", **kw)
        _cache[arch] = (path, _logits(path, tokens))
    return _cache[arch]


def _zero_block_first(tmp_path: Path, n: int) -> Path:
    """A zero-residual copy of layer 0 (o_proj, down_proj at 0) in front of all n layers: every
    source layer moves one position on, and the model's function stays the same."""
    return _yaml(tmp_path, f"""
merge_method: passthrough
slices:
  - sources:
      - model: src
        layer_range: [0, 1]
        parameters: {{scale: [{{filter: o_proj, value: 0}}, {{filter: down_proj, value: 0}}, {{value: 1}}]}}
  - sources: [{{model: src, layer_range: [0, {n}]}}]
""")


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def _zero_insert_yaml(tmp_path: Path, n: int, k: int) -> Path:
    """[0,k] + zero-residual copies of [0,k] + [k,n]: the copies are identity blocks."""
    return _yaml(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: src, layer_range: [0, {k}]}}]
  - sources:
      - model: src
        layer_range: [0, {k}]
        parameters: {{scale: [{{filter: o_proj, value: 0}}, {{filter: down_proj, value: 0}}, {{value: 1}}]}}
  - sources: [{{model: src, layer_range: [{k}, {n}]}}]
""")


def test_every_llama_cpp_arch_is_classified() -> None:
    assert len(LLAMA_CPP_ARCHS) == len(set(LLAMA_CPP_ARCHS)) == 153
    assert set(archs.SUPPORTED).isdisjoint(archs.REFUSED)
    assert set(LLAMA_CPP_ARCHS) == set(archs.SUPPORTED) | set(archs.REFUSED)
    assert set(archs.SUPPORTED) == set(FIXTURES)  # supported means tested here


@pytest.mark.parametrize("arch", sorted(FIXTURES))
def test_supported_arch_upscales_and_loads(arch: str, model_dir: Path, tmp_path: Path, tokens: list[int]) -> None:
    src, ref = _source(model_dir, arch, tokens)
    n = FIXTURES[arch][0]

    # identity: every tensor byte and every logit
    ident = tmp_path / "identity.gguf"
    run("upscale", src, "--slices", f"0:{n}", "-o", ident)
    assert tensor_bytes(ident) == tensor_bytes(src)
    np.testing.assert_array_equal(_logits(ident, tokens), ref)

    # zero-residual copies inserted (o_proj/down_proj hit the right GGUF tensors in this arch): same
    # logits, also for sliding-window archs whose kept layers all moved to new positions
    zero = tmp_path / "zero.gguf"
    if arch == "smollm3":
        recipe = ["--config", _zero_insert_yaml(tmp_path, n, 4), "--model", f"src={src}"]
        layer_map = [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    else:
        recipe = ["--preset", "llama-pro:every=1"]
        layer_map = [j for j in range(n) for _ in (0, 1)]
    run("upscale", *([src] if arch != "smollm3" else []), *recipe, "-o", zero)
    md = metadata(zero)
    assert md[f"{arch}.block_count"] == len(layer_map)
    assert md["upscale.layer_source_index"] == layer_map
    src_md = metadata(src)
    for key in (f"{arch}.{k}" for k in PER_LAYER if isinstance(src_md[f"{arch}.{k}"], list)):
        assert md[key] == [src_md[key][j] for j in layer_map], key  # DeciLM: moved with the layers
    np.testing.assert_array_equal(_logits(zero, tokens), ref)  # sliding-window kinds judged by llama.cpp

    # the seed recipe's shape: duplicated middle layers; loads and runs
    over = tmp_path / "overlap.gguf"
    slices = "0:8,4:8" if arch == "smollm3" else None
    run("upscale", src, *(["--slices", slices] if slices else ["--preset", "overlap-halves"]), "-o", over)
    md = metadata(over)
    layer_map = md["upscale.layer_source_index"]
    assert len(layer_map) == md[f"{arch}.block_count"] > n
    logits = _logits(over, tokens)
    assert logits.shape == ref.shape and np.isfinite(logits).all()
    assert np.abs(logits - ref).max() > 1e-3  # a different model, not a copy


def test_llama_with_experts(model_dir: Path, tmp_path: Path, tokens: list[int]) -> None:
    """Mixtral-style llama: experts are ordinary blk.N tensors; mergekit 0.1.5's HF names
    (mlp.experts.down_proj, stacked) hit them."""
    src = make_model(model_dir / "arch-mixtral.gguf", n_expert=4, n_expert_used=2, name="Tiny Mixtral")
    ref = _logits(src, tokens)
    ident = tmp_path / "identity.gguf"
    run("upscale", src, "--slices", "0:4", "-o", ident)
    np.testing.assert_array_equal(_logits(ident, tokens), ref)
    cfg = _yaml(tmp_path, """
merge_method: passthrough
slices:
  - sources: [{model: src, layer_range: [0, 2]}]
  - sources:
      - model: src
        layer_range: [1, 2]
        parameters: {scale: [{filter: o_proj, value: 0}, {filter: experts.down_proj, value: 0}, {value: 1}]}
  - sources: [{model: src, layer_range: [2, 4]}]
""")
    zero = tmp_path / "zero.gguf"
    run("upscale", "--config", cfg, "--model", f"src={src}", "-o", zero)
    assert metadata(zero)["llama.expert_count"] == 4
    np.testing.assert_array_equal(_logits(zero, tokens), ref)
    pro = tmp_path / "pro.gguf"  # the preset zeroes the experts' down projections too
    run("upscale", src, "--preset", "llama-pro:every=2", "-o", pro)
    assert metadata(pro)["llama.block_count"] == 6
    np.testing.assert_array_equal(_logits(pro, tokens), ref)
    over = tmp_path / "overlap.gguf"
    run("upscale", src, "--preset", "overlap-halves", "-o", over)
    assert np.isfinite(_logits(over, tokens)).all()


def _patch_bool_array(path: Path, key: str, values: list[bool]) -> None:
    """Overwrite a BOOL array's bytes in place (same length): a control file with other layer kinds."""
    data = bytearray(path.read_bytes())
    kb = key.encode()
    at = data.index(len(kb).to_bytes(8, "little") + kb) + 8 + len(kb)
    assert int.from_bytes(data[at:at + 4], "little") == GGUFValueType.ARRAY
    assert int.from_bytes(data[at + 4:at + 8], "little") == BOOL
    assert int.from_bytes(data[at + 8:at + 16], "little") == len(values)
    data[at + 16:at + 16 + len(values)] = bytes(int(v) for v in values)
    path.write_bytes(bytes(data))


def test_gemma2_layer_kinds_follow_their_layers(model_dir: Path, tmp_path: Path, tokens: list[int]) -> None:
    """Without the per-layer array llama.cpp would give moved layers the kind of their new position."""
    src, ref = _source(model_dir, "gemma2", tokens)
    out = tmp_path / "pro.gguf"
    run("upscale", src, "--preset", "llama-pro:every=1", "-o", out)
    key = "gemma2.attention.sliding_window_pattern"
    assert metadata(out)[key] == [True, True, False, False] * 2  # source [T, F, T, F], each layer twice
    np.testing.assert_array_equal(_logits(out, tokens), ref)
    _patch_bool_array(out, key, [il % 2 == 0 for il in range(8)])  # llama.cpp's positional default
    wrong = _logits(out, tokens)
    np.testing.assert_array_equal(wrong[:SLIDING_WINDOW], ref[:SLIDING_WINDOW])  # window not yet full
    assert np.abs(wrong[SLIDING_WINDOW + 8:] - ref[SLIDING_WINDOW + 8:]).max() > 0.1


@pytest.mark.parametrize("arch, value", [
    # a scalar period in the source: gemma3 with every 3rd layer full
    ("gemma3", (3, U32, None)),
    # a per-layer array in the source keeps its element type and moves with its layers
    ("gemma3", ([True, False, False, True, True, False], GGUFValueType.ARRAY, BOOL)),
    ("cohere2", (2, U32, None)),
    ("gemma2", None),
    ("olmo2", (2, U32, None)),
    # OLMo 3 as convert_hf_to_gguf writes it: a per-layer BOOL array from the config's layer_types
    ("olmo2", ([True, True, True, False], GGUFValueType.ARRAY, BOOL)),
    ("gpt-oss", (4, U32, None)),
])
def test_sliding_window_layers_keep_their_kind(arch: str, value: Any, tmp_path: Path, tokens: list[int]) -> None:
    """Judged by llama.cpp, not by a re-implementation of its rule: a zero-residual block in front
    moves every layer one position on, and the logits must stay the source's, token for token,
    also past the sliding window (where a layer of the wrong kind would see other tokens)."""
    assert len(tokens) > SLIDING_WINDOW + 8
    n = 6 if value is None or value[1] != GGUFValueType.ARRAY else len(value[0])
    key = f"{arch}.attention.sliding_window_pattern"
    src = make_model(tmp_path / "src.gguf", arch=arch, n_layer=n, extra_kv={key: value} if value else None)
    ref = _logits(src, tokens)
    out = tmp_path / "out.gguf"
    run("upscale", "--config", _zero_block_first(tmp_path, n), "--model", f"src={src}", "-o", out)
    assert metadata(out)["upscale.layer_source_index"] == [0] + list(range(n))
    kv = GGUFReader(out).fields[key]
    assert kv.types == [GGUFValueType.ARRAY, GGUFValueType.BOOL]  # per layer, as load_swa_pattern reads it
    np.testing.assert_array_equal(_logits(out, tokens), ref)
    # the same file with llama.cpp's positional default instead is a different model: the check can fail
    kinds = [bool(kv.parts[i][0]) for i in kv.data]
    shifted = kinds[1:] + kinds[:1]
    if shifted != kinds:
        _patch_bool_array(out, key, shifted)
        wrong = _logits(out, tokens)
        assert np.abs(wrong[SLIDING_WINDOW + 8:] - ref[SLIDING_WINDOW + 8:]).max() > 1e-3


def test_gemma3_without_sliding_window_writes_no_pattern(tmp_path: Path) -> None:
    """gemma3 without attention.sliding_window has no SWA layers: a scalar pattern is inert, not refused."""
    src = make_model(tmp_path / "src.gguf", arch="gemma3", extra_kv={
        "gemma3.attention.sliding_window": None, "gemma3.attention.sliding_window_pattern": (6, U32, None)})
    out = tmp_path / "out.gguf"
    run("upscale", src, "--slices", "0:3,1:4", "-o", out)
    assert metadata(out)["gemma3.attention.sliding_window_pattern"] == 6


def _write_arch(path: Path, arch: str, extra: dict[str, tuple[Any, GGUFValueType]] | None = None) -> Path:
    """A minimal 2-layer file claiming `arch` (refused before any tensor is read)."""
    w = GGUFWriter(path, arch)
    w.add_block_count(2)
    for key, (value, vtype) in (extra or {}).items():
        w.add_key_value(key, value, vtype)
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(256, np.float32))
    w.add_tensor("token_embd.weight", np.zeros((8, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch, fragment", [
    ("llama4", "no-RoPE"),
    ("deepseek2", "leading dense"),
    ("qwen3next", "full_attention_interval"),
    ("gemma3n", "per-layer embeddings"),
    ("minicpm", "1.4/sqrt(n_layer)"),
    ("baichuan", "ALiBi"),
    ("t5", "enc.blk.N"),
    ("bert", "embedding"),
    ("mellum", "refused until a fixture test covers it"),
    ("grok", "refused until a fixture test covers it"),
    ("no-such-arch", "not an architecture llama.cpp knows"),
])
def test_refused_architectures(arch: str, fragment: str, tmp_path: Path) -> None:
    src = _write_arch(tmp_path / f"{arch}.gguf", arch)
    out = tmp_path / "out.gguf"
    proc = run("plan", src, "--slices", "0:2,0:2", check=False)
    assert_one_line_error(proc, f"architecture {arch!r} is not supported", fragment, "supported: ")
    assert_one_line_error(cli("upscale", src, "--slices", "0:2,0:2", "-o", out), fragment)
    assert not out.exists()


def test_smollm3_no_rope_layers_must_keep_their_positions(model_dir: Path, tmp_path: Path,
                                                          tokens: list[int]) -> None:
    src, _ = _source(model_dir, "smollm3", tokens)
    proc = cli("plan", src, "--slices", "0:8,1:8")
    assert_one_line_error(proc, "smollm3", "every 4th layer has no RoPE", "source layer 3", "output layer 10")
    assert_one_line_error(cli("plan", src, "--preset", "llama-pro:every=2"), "smollm3", "position")
    run("plan", src, "--slices", "0:8,4:8,0:4")


def test_deci_first_layer_must_keep_its_heads(model_dir: Path, tmp_path: Path, tokens: list[int]) -> None:
    """llama.cpp sizes every attention head from layer 0's head count: a DeciLM output must not start
    with the source's attention-free layer (source layer 1 of the fixture has 0 heads)."""
    src, _ = _source(model_dir, "deci", tokens)
    assert metadata(src)["deci.attention.head_count"][:2] == [4, 0]
    assert_one_line_error(cli("plan", src, "--slices", "1:6,0:6"), "deci", "output layer 0", "no attention heads")
    run("plan", src, "--slices", "0:6,1:6")  # the same layers, attention-free one not first
    # what the refusal prevents: llama.cpp does not load a DeciLM whose first layer has no heads
    first_free = make_model(tmp_path / "d0.gguf", arch="deci", n_embd_head=64, head_counts=[0, 4, 4, 4],
                            head_counts_kv=[0, 2, 2, 2], ff_lengths=[512] * 4)
    with pytest.raises(ValueError, match="Failed to load"):
        _load(first_free)


def test_gemma2_depth_that_changes_the_attention_scale_is_refused(tmp_path: Path) -> None:
    """46 layers = "27B" for llama.cpp, which then scales queries by 1/sqrt(n_embd/n_head)."""
    src = make_model(tmp_path / "g.gguf", arch="gemma2", n_layer=4, n_embd_head=128)  # n_embd/n_head = 64
    proc = cli("plan", src, "--slices", ",".join(["0:4"] * 11 + ["0:2"]))  # 46 layers
    assert_one_line_error(proc, "gemma2", "46 layers", "1/sqrt(64)", "1/sqrt(128)")
    run("plan", src, "--slices", ",".join(["0:4"] * 11 + ["0:1"]))  # 45 layers: fine
    same = make_model(tmp_path / "s.gguf", arch="gemma2", n_layer=4)  # head_dim == n_embd/n_head
    run("plan", same, "--slices", ",".join(["0:4"] * 11 + ["0:2"]))


def test_command_r_qk_norm_depth_rule(model_dir: Path, tmp_path: Path, tokens: list[int]) -> None:
    src, _ = _source(model_dir, "command-r", tokens)
    proc = cli("plan", src, "--slices", ",".join(["0:4"] * 16))  # 64 layers without q/k norms
    assert_one_line_error(proc, "command-r", "attn_q_norm", "64")
    run("plan", src, "--slices", ",".join(["0:4"] * 15 + ["0:3"]))  # 63 layers


@pytest.mark.parametrize("arch, filt, hits", [
    ("phi3", "gate_up_proj", "ffn_up.weight"),  # fused gate+up
    ("phi3", "qkv_proj", "attn_qkv.weight"),  # fused q/k/v
    ("command-r", "o_proj", "attn_output.weight"),
    ("gemma2", "down_proj", "ffn_down.weight"),
    ("qwen2moe", "shared_expert.down_proj", "ffn_down_shexp.weight"),
    ("qwen2moe", "shared_expert_gate", "ffn_gate_inp_shexp.weight"),
    ("falcon", "dense_4h_to_h", "ffn_down.weight"),  # Falcon's HF names, not llama's
    ("internlm2", "feed_forward.w2", "ffn_down.weight"),
    ("exaone", "out_proj", "attn_output.weight"),
    ("granitemoe", "output_linear", "ffn_down_exps.weight"),
    ("gpt-oss", "sinks", "attn_sinks.weight"),
    ("mpt", "out_proj", "attn_output.weight"),
    ("qwen", "mlp.c_proj", "ffn_down.weight"),
])
def test_hf_filters_hit_the_right_tensors(arch: str, filt: str, hits: str, model_dir: Path, tmp_path: Path,
                                          tokens: list[int]) -> None:
    src, _ = _source(model_dir, arch, tokens)
    cfg = _yaml(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: src, layer_range: [0, 4], parameters: {{scale: [{{filter: {filt}, value: 0.5}}, {{value: 1}}]}}}}]
""")
    proc = run("plan", "--config", cfg, "--model", f"src={src}", "--json")
    layers = json.loads(proc.stdout)["plan"]["layers"]
    assert all(layer["scales"] == {hits: 0.5} for layer in layers)


@pytest.mark.parametrize("filt, tensor", [
    ("pre_feedforward_layernorm", "blk.0.ffn_norm.weight"),  # gemma's HF name for ffn_norm
    ("post_feedforward_layernorm", "blk.0.post_ffw_norm.weight"),
    ("input_layernorm", "blk.0.attn_norm.weight"),
])
def test_gemma_norm_scales_are_refused(filt: str, tensor: str, model_dir: Path, tmp_path: Path,
                                       tokens: list[int]) -> None:
    """Gemma GGUFs hold 1 + w in norm weights; scaling them would not be mergekit's scale."""
    src, _ = _source(model_dir, "gemma2", tokens)
    cfg = _yaml(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: src, layer_range: [0, 4], parameters: {{scale: [{{filter: {filt}, value: 0.5}}, {{value: 1}}]}}}}]
""")
    proc = (cli if tensor == "blk.0.ffn_norm.weight" else run)("plan", "--config", cfg, "--model", f"src={src}",
                                                               **({} if tensor == "blk.0.ffn_norm.weight" else {"check": False}))
    assert_one_line_error(proc, "gemma2", tensor, "1 + w")


def test_nemotron_norm_scales_are_refused(model_dir: Path, tmp_path: Path, tokens: list[int]) -> None:
    """Nemotron's LayerNorm1P weights are stored as 1 + w, like Gemma's."""
    src, _ = _source(model_dir, "nemotron", tokens)
    cfg = _yaml(tmp_path, """
merge_method: passthrough
slices:
  - sources: [{model: src, layer_range: [0, 4], parameters: {scale: [{filter: layernorm, value: 0.5}, {value: 1}]}}]
""")
    assert_one_line_error(cli("plan", "--config", cfg, "--model", f"src={src}"), "nemotron", "1 + w")


def test_positional_keys_refused_per_arch(tmp_path: Path) -> None:
    """Keys llama.cpp reads by position and cannot take per layer: refused once layers move."""
    src = make_model(tmp_path / "gv.gguf", arch="granite",
                     extra_kv={"granite.deepstack_mapping": ([-1, 0, -1, -1], GGUFValueType.ARRAY, GGUFValueType.INT32)})
    assert_one_line_error(cli("plan", src, "--slices", "0:3,1:4"), "granite.deepstack_mapping", "position")
    src = make_model(tmp_path / "mtp.gguf", arch="qwen3", extra_kv={"qwen3.nextn_predict_layers": (1, U32)})
    assert_one_line_error(cli("plan", src, "--slices", "0:3,1:4"), "qwen3.nextn_predict_layers", "position")
    src = make_model(tmp_path / "sw.gguf", arch="llama", extra_kv={"llama.attention.sliding_window_pattern": (4, U32)})
    assert_one_line_error(cli("plan", src, "--slices", "0:3,1:4"), "llama.attention.sliding_window_pattern")
    # a count of 0 positions nothing (converters write leading_dense_block_count = 0, nextn = 0)
    src = make_model(tmp_path / "zero.gguf", arch="qwen3", extra_kv={"qwen3.nextn_predict_layers": (0, U32),
                                                                     "qwen3.leading_dense_block_count": (0, U32)})
    run("plan", src, "--slices", "0:3,1:4")



def test_models_must_agree_on_global_hyperparameters(tmp_path: Path) -> None:
    """Two gemma2 fine-tunes with different sliding windows cannot both keep theirs in one stack."""
    a = make_model(tmp_path / "a.gguf", arch="gemma2")
    b = make_model(tmp_path / "b.gguf", arch="gemma2", seed=1,
                   extra_kv={"gemma2.attention.sliding_window": (64, U32)})
    cfg = _yaml(tmp_path, """
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 2]}]
  - sources: [{model: b, layer_range: [2, 4]}]
""")
    proc = cli("plan", "--config", cfg, "--model", f"a={a}", "--model", f"b={b}")
    assert_one_line_error(proc, "models 'a' and 'b'", "gemma2.attention.sliding_window")
