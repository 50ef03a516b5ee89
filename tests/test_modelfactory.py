"""The fixture models must be real: llama.cpp loads them, runs them and tokenizes any text."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from modelfactory import ARCHS, SLIDING_WINDOW, build_vocab, eval_logits, make_model, shard_paths, tensor_names

FIXTURES = ["tiny_llama", "tiny_llama_q8", "tiny_llama_tied", "llama80", "tiny_llama_split"]
PROMPT = b"hello world, the model is a llama"


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _field(reader: GGUFReader, key: str):  # type: ignore[no-untyped-def]
    f = reader.get_field(key)
    assert f is not None, key
    return f


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_loads_and_logits_are_sane(fixture: str, request: pytest.FixtureRequest, load_llama) -> None:
    path: Path = request.getfixturevalue(fixture)
    llm = load_llama(path)
    assert llm.n_vocab() == 512
    tokens = llm.tokenize(PROMPT)
    logits = eval_logits(llm, tokens)
    assert logits.shape == (len(tokens), 512)
    assert np.isfinite(logits).all()
    assert (logits.std(axis=1) > 0.5).all(), "logits (nearly) constant"
    probs = _softmax(logits)
    # Peaked but not one-hot: a useful signal for logit-comparison oracles.
    assert (probs.max(axis=1) > 5 / 512).all()
    assert (probs.max(axis=1) < 0.9).all()
    # Positions see different contexts, so their distributions differ.
    assert not np.allclose(logits[1], logits[2])


@pytest.mark.parametrize("fixture", FIXTURES)
def test_greedy_generation(fixture: str, request: pytest.FixtureRequest, load_llama) -> None:
    llm = load_llama(request.getfixturevalue(fixture))
    out = llm.create_completion("hello", max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    again = llm.create_completion("hello", max_tokens=6, temperature=0.0)
    assert again["choices"][0]["text"] == out["choices"][0]["text"]


def test_chat_completion_uses_gguf_template(tiny_llama: Path, load_llama) -> None:
    llm = load_llama(tiny_llama)
    assert llm.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")
    out = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0)
    assert out["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("text", ["こんにちは、世界", "日本語とEnglish\n混在 🦙", "hello world\ttab  two spaces"])
def test_tokenizer_round_trips_any_utf8(tiny_llama: Path, load_llama, text: str) -> None:
    llm = load_llama(tiny_llama)
    tokens = llm.tokenize(text.encode())
    assert tokens[0] == llm.token_bos()
    assert llm.detokenize(tokens).decode() == text


def test_tokenizer_uses_pieces_and_byte_fallback(tiny_llama: Path, load_llama) -> None:
    llm = load_llama(tiny_llama)
    vocab = build_vocab(512)
    hello = llm.tokenize(b"hello", add_bos=False)
    assert [vocab.tokens[t] for t in hello] == ["\u2581hello"]
    ja = llm.tokenize("世".encode(), add_bos=False)  # not a piece -> "▁" + 3 UTF-8 bytes
    assert [vocab.tokens[t] for t in ja] == ["\u2581", "<0xE4>", "<0xB8>", "<0x96>"]
    # ChatML markers are control tokens, parsed only when special=True.
    assert len(llm.tokenize(b"<|im_end|>", add_bos=False, special=True)) == 1


def test_vocab_layout() -> None:
    v = build_vocab(512)
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert v.tokens[3] == "<0x00>" and v.tokens[258] == "<0xFF>"
    assert v.types[3:259] == [6] * 256
    assert v.tokens[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(set(v.tokens)) == 512
    assert len(build_vocab(4096).tokens) == 4096
    with pytest.raises(ValueError):
        build_vocab(200)


def test_split_fixture(tiny_llama_split: Path, tiny_llama: Path, load_llama) -> None:
    assert tiny_llama_split.name == "tiny-llama-F16-00001-of-00003.gguf"
    shards = shard_paths(tiny_llama_split.parent / "tiny-llama-F16.gguf", 3)
    assert shards[0] == tiny_llama_split and all(s.exists() for s in shards)
    first = GGUFReader(tiny_llama_split)
    assert _field(first, "split.count").contents() == 3
    assert _field(first, "split.no").contents() == 0
    assert _field(first, "split.tensors.count").contents() == len(tensor_names(n_layer=4))
    assert first.get_field("general.name") is not None
    assert GGUFReader(shards[1]).get_field("general.name") is None  # metadata only in shard 1
    # Same seed, same tensors: the split model must compute exactly what the single file does.
    tokens = load_llama(tiny_llama).tokenize(PROMPT)
    a = eval_logits(load_llama(tiny_llama), tokens)
    b = eval_logits(load_llama(tiny_llama_split), tokens)
    np.testing.assert_array_equal(a, b)


def test_metadata_and_tensors_match_convert_hf_to_gguf(tiny_llama: Path) -> None:
    r = GGUFReader(tiny_llama)
    assert _field(r, "general.architecture").contents() == "llama"
    for key in ["block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "vocab_size", "rope.dimension_count"]:
        assert _field(r, f"llama.{key}").types == [GGUFValueType.UINT32], key
    assert _field(r, "llama.block_count").contents() == 4
    assert _field(r, "general.file_type").contents() == 1
    assert _field(r, "general.license").contents() == "apache-2.0"
    assert _field(r, "general.base_model.count").contents() == 1
    assert _field(r, "tokenizer.ggml.model").contents() == "llama"
    assert _field(r, "tokenizer.ggml.scores").types == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    assert _field(r, "tokenizer.ggml.token_type").types == [GGUFValueType.ARRAY, GGUFValueType.INT32]

    names = [t.name for t in r.tensors]
    assert names == tensor_names(n_layer=4)
    assert names[0] == "token_embd.weight" and names[-2:] == ["output_norm.weight", "output.weight"]
    assert {n.split(".", 2)[2] for n in names if n.startswith("blk.0.")} == {
        "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
        "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}
    by_name = {t.name: t for t in r.tensors}
    for t in r.tensors:
        want = GGMLQuantizationType.F32 if len(t.shape) == 1 else GGMLQuantizationType.F16
        assert t.tensor_type == want, t.name
    assert list(by_name["blk.0.attn_k.weight"].shape) == [256, 128]  # GGUF order: (in, out); GQA
    assert list(by_name["token_embd.weight"].shape) == [256, 512]
    # Every layer has its own weights (otherwise duplicated-layer tests prove nothing).
    assert not np.array_equal(by_name["blk.0.attn_q.weight"].data, by_name["blk.1.attn_q.weight"].data)
    assert not np.array_equal(by_name["blk.0.ffn_norm.weight"].data, by_name["blk.1.ffn_norm.weight"].data)


def test_quantized_and_tied_layouts(tiny_llama_q8: Path, tiny_llama_tied: Path) -> None:
    r = GGUFReader(tiny_llama_q8)
    assert _field(r, "general.file_type").contents() == 7
    assert _field(r, "general.quantization_version").contents() == 2
    for t in r.tensors:
        want = GGMLQuantizationType.F32 if len(t.shape) == 1 else GGMLQuantizationType.Q8_0
        assert t.tensor_type == want, t.name
    names = [t.name for t in GGUFReader(tiny_llama_tied).tensors]
    assert "output.weight" not in names and "token_embd.weight" in names


def test_llama80_is_a_70b_shape(llama80: Path, load_llama) -> None:
    r = GGUFReader(llama80)
    assert _field(r, "llama.block_count").contents() == 80
    llm = load_llama(llama80)
    assert "70B" in llm._model.desc()  # what llama-quantize's mixture rules key on


def test_llama80_is_fast_to_write(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_model(tmp_path / "m.gguf", n_layer=80, n_ff=256)
    assert time.perf_counter() - start < 5.0


def test_seed_determinism(tmp_path: Path, load_llama) -> None:
    a = make_model(tmp_path / "a.gguf", seed=7)
    b = make_model(tmp_path / "b.gguf", seed=7)
    c = make_model(tmp_path / "c.gguf", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    tokens = load_llama(a).tokenize(PROMPT)
    la = eval_logits(load_llama(a), tokens)
    lc = eval_logits(load_llama(c), tokens)
    assert np.abs(la - lc).max() > 0.5


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_other_dtypes_load(tmp_path: Path, dtype: str, load_llama) -> None:
    path = make_model(tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    llm = load_llama(path)
    assert np.isfinite(eval_logits(llm, llm.tokenize(PROMPT))).all()


def test_hf_tensor_order_is_convert_order_and_computes_the_same(tmp_path: Path, load_llama) -> None:
    natural = make_model(tmp_path / "n.gguf", n_layer=12)
    hf = make_model(tmp_path / "h.gguf", n_layer=12, tensor_order="hf")
    names = [t.name for t in GGUFReader(hf).tensors]
    assert names[:3] == ["output.weight", "token_embd.weight", "blk.0.attn_norm.weight"]
    assert names.index("blk.10.attn_norm.weight") < names.index("blk.2.attn_norm.weight")
    assert names[-1] == "output_norm.weight"
    tokens = load_llama(natural).tokenize(PROMPT)
    np.testing.assert_array_equal(eval_logits(load_llama(natural), tokens), eval_logits(load_llama(hf), tokens))


def test_extra_kv(tmp_path: Path, load_llama) -> None:
    path = make_model(
        tmp_path / "kv.gguf",
        extra_kv={
            "llama.feed_forward_length": ([512] * 4, GGUFValueType.ARRAY, GGUFValueType.UINT32),
            "general.name": "Renamed",
            "general.tags": ["a", "b"],
            "my.flag": True,
            "general.license": None,  # deletion
        },
    )
    r = GGUFReader(path)
    ff = _field(r, "llama.feed_forward_length")
    assert ff.types == [GGUFValueType.ARRAY, GGUFValueType.UINT32] and ff.contents() == [512] * 4
    assert _field(r, "general.name").contents() == "Renamed"
    assert _field(r, "general.tags").contents() == ["a", "b"]
    assert _field(r, "my.flag").contents() is True
    assert r.get_field("general.license") is None
    llm = load_llama(path)  # per-layer n_ff array is accepted by llama.cpp
    assert np.isfinite(eval_logits(llm, llm.tokenize(PROMPT))).all()
    with pytest.raises(TypeError):
        make_model(tmp_path / "bad.gguf", extra_kv={"llama.block_count": 4})


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_registered_arch_runs(tmp_path: Path, arch: str, load_llama) -> None:
    natural = make_model(tmp_path / f"{arch}.gguf", arch=arch, dtype="Q8_0", name=f"Tiny {arch}")
    llm = load_llama(natural)
    assert llm.metadata["general.architecture"] == arch
    tokens = llm.tokenize(PROMPT)
    logits = eval_logits(llm, tokens)
    assert np.isfinite(logits).all()
    probs = _softmax(logits)
    assert (probs.max(axis=1) < 0.9).all() and (probs.max(axis=1) > 5 / 512).all()
    assert llm.create_completion("hello", max_tokens=3, temperature=0.0)["usage"]["completion_tokens"] >= 1
    # Tensor order does not change the model: same names -> same per-tensor RNG -> same logits.
    # A property of the fixture maker, not of each family: checked on a few different layouts.
    if arch not in ("llama", "qwen2moe", "deci", "gemma2", "falcon"):
        return
    hf = make_model(tmp_path / f"{arch}-hf.gguf", arch=arch, dtype="Q8_0", name=f"Tiny {arch}", tensor_order="hf")
    np.testing.assert_array_equal(logits, eval_logits(load_llama(hf), tokens))


def test_gemma2_swa_pattern_array_is_honoured(tmp_path: Path, load_llama) -> None:
    """llama.cpp reads a per-layer BOOL sliding_window_pattern; the upscaler relies on that."""
    key = "gemma2.attention.sliding_window_pattern"
    default = make_model(tmp_path / "d.gguf", arch="gemma2")
    same = make_model(tmp_path / "s.gguf", arch="gemma2",
                      extra_kv={key: ([True, False] * 2, GGUFValueType.ARRAY, GGUFValueType.BOOL)})
    swapped = make_model(tmp_path / "w.gguf", arch="gemma2",
                         extra_kv={key: ([False, True] * 2, GGUFValueType.ARRAY, GGUFValueType.BOOL)})
    llm = load_llama(default)
    tokens = llm.tokenize(b"the cat and the dog " * 20)
    assert len(tokens) > 2 * SLIDING_WINDOW
    d = eval_logits(llm, tokens)
    np.testing.assert_array_equal(d, eval_logits(load_llama(same), tokens))
    w = eval_logits(load_llama(swapped), tokens)
    np.testing.assert_array_equal(d[:SLIDING_WINDOW], w[:SLIDING_WINDOW])  # window not yet full
    assert np.abs(d[SLIDING_WINDOW + 8:] - w[SLIDING_WINDOW + 8:]).max() > 0.1
