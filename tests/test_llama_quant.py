"""llama.cpp's quantizer is the oracle: target_types must predict its output, ggml must reproduce its bytes."""

from __future__ import annotations

import ctypes
import logging
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from llama_reference import Imatrix, ftype_of, llama_quantize

from modelfactory import make_model
from upscaler.errors import QuantizeError
from upscaler.format.gguf_header import tensor_nbytes
from upscaler.format.source import SourceModel
from upscaler.quant import ggml, llama_log, quant_types
from upscaler.quant.llama_quant import (
    Mixture,
    llama_tensor_order,
    quantize_file,
    target_types,
)
from upscaler.quant.quant_types import QUANT_TYPES, approx_bits_per_weight, parse_quant_type

Quantized = Callable[..., Path]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama120(model_dir: Path) -> Path:
    """120 layers, 4 heads / 1 KV head (n_gqa = 4)."""
    return make_model(model_dir / "llama120-F16.gguf", n_layer=120, n_ff=256, n_head_kv=1)


@pytest.fixture(scope="module")
def llama16(model_dir: Path) -> Path:
    """Enough layers that n_layer/8 > 0, so the first ffn_down layers follow their own rules."""
    return make_model(model_dir / "llama16-F16.gguf", n_layer=16, n_ff=256)


@pytest.fixture(scope="module")
def odd_ff(model_dir: Path) -> Path:
    """n_ff = 320: ffn_down rows have 320 columns, not a multiple of 256 (k-quant fallback)."""
    return make_model(model_dir / "odd-ff-F16.gguf", n_ff=320)


@pytest.fixture(scope="module")
def tiny_bf16(model_dir: Path) -> Path:
    return make_model(model_dir / "tiny-llama-BF16.gguf", dtype="BF16")


def _imatrix(path: Path) -> dict[str, np.ndarray]:
    """Deterministic random positive importances for every matrix (per column)."""
    out = {}
    for t in SourceModel(path).tensors.values():
        if len(t.shape) >= 2:
            rng = np.random.default_rng(zlib.crc32(t.name.encode()))
            out[t.name] = rng.uniform(0.05, 3.0, t.shape[0]).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    """llama_model_quantize's real output for (source, type, imatrix?), computed once per module."""
    cache: dict[tuple[Path, str, bool], Path] = {}
    out_dir = tmp_path_factory.mktemp("quantized")

    def get(src: Path, ftype: str, with_imatrix: bool = False) -> Path:
        key = (src, ftype, with_imatrix)
        if key not in cache:
            out = out_dir / f"{src.stem}-{ftype}{'-imat' if with_imatrix else ''}.gguf"
            # llama.cpp's driver with its own LLAMA_FTYPE_* constants (tests/llama_reference.py),
            # not the code under test
            llama_quantize(src, out, ftype, imatrix=Imatrix(_imatrix(src)) if with_imatrix else None)
            cache[key] = out
        return cache[key]

    return get


def _file_types(path: Path) -> dict[str, int]:
    """Tensor name -> ggml type, in file order."""
    return {t.name: int(t.tensor_type) for t in GGUFReader(path).tensors}


def _assert_exact(src: Path, out: Path, ftype: str, with_imatrix: bool, mixture: Mixture | None = None) -> dict[str, int]:
    model = SourceModel(src)
    predicted = target_types(list(model.tensors.values()), model.kvs.values(), ftype, imatrix=with_imatrix,
                             mixture=mixture)
    real = _file_types(out)
    wrong = {n: (ggml.type_name(predicted[n]), ggml.type_name(real[n])) for n in real if predicted.get(n) != real[n]}
    assert not wrong, f"predicted vs llama.cpp: {wrong}"
    assert list(predicted) == list(real) == llama_tensor_order(real)
    return predicted


def _names_of(types: dict[str, int], suffix: str) -> list[str]:
    return [ggml.type_name(types[n]) for n in llama_tensor_order(types) if n.endswith(suffix)]


# --------------------------------------------------------------------------- type names


def test_parse_quant_type() -> None:
    assert parse_quant_type("q4_k_m").ftype == quant_types.MOSTLY_Q4_K_M
    assert parse_quant_type("Q4_K").ftype == quant_types.MOSTLY_Q4_K_M  # alias
    assert parse_quant_type("iq4_xs").default_type == T.IQ4_XS
    assert parse_quant_type("15").name == "Q4_K"  # numeric: first entry with that ftype, like quantize.cpp
    assert parse_quant_type(0).name == "F32" and parse_quant_type("copy").only_copy
    with pytest.raises(QuantizeError, match=r"unknown quantization type 'Q4_K_XL'; valid types: Q1_0, .*IQ4_XS"):
        parse_quant_type("Q4_K_XL")


def test_type_names_are_llama_cpps() -> None:
    """Every type name maps to the llama_ftype llama-cpp-python defines for it (Q5_K_S, Q5_K_M too)."""
    import llama_cpp
    for q in QUANT_TYPES:
        assert q.ftype == ftype_of(q.name), q.name
    assert parse_quant_type("Q5_K_S").ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S
    assert parse_quant_type("Q5_K_M").ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M
    # and every llama_ftype llama-cpp-python knows (but the guessed and the removed) has a name here
    known = {int(getattr(llama_cpp, k)) for k in dir(llama_cpp)
             if k.startswith("LLAMA_FTYPE_") and k != "LLAMA_FTYPE_GUESSED"}
    assert known <= {q.ftype for q in QUANT_TYPES} | _REMOVED_FTYPES, sorted(known - {q.ftype for q in QUANT_TYPES})


# llama.h: Q4_1_SOME_F16 = 4 and Q4_2 / Q4_3 = 5 / 6 are gone, Q4_0_4_4 .. Q4_0_8_8 = 33..35 removed;
# NVFP4 = 39 is declared but llama-quantize does not offer it (not in quantize.cpp's QUANT_OPTIONS)
_REMOVED_FTYPES = {4, 5, 6, 33, 34, 35, 39}


def test_default_types_match_llama_cpp() -> None:
    lib = ctypes.CDLL(str(ggml.lib_dir() / "libllama.so"))
    fn = lib._Z28llama_ftype_get_default_type11llama_ftype  # C++ helper from llama-ext.h
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    for q in QUANT_TYPES:
        assert q.default_type == fn(q.ftype), q.name


def test_approx_bits_per_weight() -> None:
    assert approx_bits_per_weight("q4_k_m") == approx_bits_per_weight("Q4_K") == pytest.approx(4.9, abs=0.05)
    assert approx_bits_per_weight("F16") == 16
    bpw = [approx_bits_per_weight(n) for n in ("IQ1_S", "IQ2_XXS", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K",
                                               "Q8_0", "BF16", "F32")]
    assert bpw == sorted(bpw)
    assert all(approx_bits_per_weight(q) > 1 for q in QUANT_TYPES if not q.only_copy)
    with pytest.raises(QuantizeError, match="COPY"):
        approx_bits_per_weight("COPY")


def test_needs_imatrix_is_what_llama_cpp_decides(tiny_llama: Path) -> None:
    for q in QUANT_TYPES:
        lines = quantize_file(tiny_llama, None, q, dry_run=True).lines
        refused = any("will require an imatrix" in line for line in lines)
        assert refused == q.needs_imatrix, q.name


# --------------------------------------------------------------------------- tensor order


def test_llama_tensor_order() -> None:
    names = ["token_embd.weight", "blk.10.attn_q.weight", "blk.2.ffn_up.weight", "output.weight",
             "blk.2.attn_q.weight", "rope_freqs.weight"]
    assert llama_tensor_order(names) == ["output.weight", "rope_freqs.weight", "token_embd.weight",
                                         "blk.2.attn_q.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


# --------------------------------------------------------------------------- target_types == llama.cpp


@pytest.mark.parametrize("with_imatrix", [False, True])
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "IQ4_XS", "Q8_0"])
def test_target_types_4_layers(tiny_llama: Path, quantized: Quantized, ftype: str, with_imatrix: bool) -> None:
    types = _assert_exact(tiny_llama, quantized(tiny_llama, ftype, with_imatrix), ftype, with_imatrix)
    assert types["blk.0.attn_norm.weight"] == T.F32  # 1-D tensors are never quantized


def test_target_types_tied_embeddings(tiny_llama_tied: Path, quantized: Quantized) -> None:
    types = _assert_exact(tiny_llama_tied, quantized(tiny_llama_tied, "Q4_K_M"), "Q4_K_M", False)
    assert types["token_embd.weight"] == T.Q6_K  # quantized like the output it doubles as


def test_target_types_requantize_q8_0_source(tiny_llama_q8: Path, quantized: Quantized) -> None:
    _assert_exact(tiny_llama_q8, quantized(tiny_llama_q8, "Q4_K_M"), "Q4_K_M", False)


def test_target_types_80_layer_gqa_llama_is_70b(llama80: Path, quantized: Quantized) -> None:
    types = _assert_exact(llama80, quantized(llama80, "Q4_K_M"), "Q4_K_M", False)
    attn_v = _names_of(types, "attn_v.weight")
    # use_more_bits layers get Q6_K; the 70B rule lifts all the others from Q4_K to Q5_K
    assert set(attn_v) == {"q5_K", "q6_K"} and attn_v[:10] == ["q6_K"] * 10

    # Without GQA llama.cpp calls an 80-layer llama "65B": no bump, attn_v back to Q4_K.
    model = SourceModel(llama80)
    kvs = dict(model.kvs)
    kvs["llama.attention.head_count_kv"] = kvs["llama.attention.head_count_kv"].with_value(4)
    mha = target_types(list(model.tensors.values()), kvs.values(), "Q4_K_M")
    assert "q4_K" in _names_of(mha, "attn_v.weight")


def test_target_types_120_layers(llama120: Path, quantized: Quantized) -> None:
    types = _assert_exact(llama120, quantized(llama120, "Q4_K_M"), "Q4_K_M", False)
    down = _names_of(types, "ffn_down.weight")
    assert down[:15] == ["q6_K"] * 15 and down[15:18] == ["q4_K", "q4_K", "q6_K"]


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K"])
def test_target_types_fallback_for_odd_row_length(odd_ff: Path, quantized: Quantized, ftype: str) -> None:
    types = _assert_exact(odd_ff, quantized(odd_ff, ftype), ftype, False)
    assert set(_names_of(types, "ffn_down.weight")) <= {"q5_0", "q8_0"}


def test_target_types_follow_the_imatrix(llama16: Path, quantized: Quantized) -> None:
    plain = _assert_exact(llama16, quantized(llama16, "Q4_0"), "Q4_0", False)
    with_im = _assert_exact(llama16, quantized(llama16, "Q4_0", True), "Q4_0", True)
    assert _names_of(plain, "ffn_down.weight")[:3] == ["q4_0"] * 3
    assert _names_of(with_im, "ffn_down.weight")[:3] == ["q4_1", "q4_1", "q4_0"]


def test_target_types_with_mixture_options(tiny_llama: Path, tmp_path: Path) -> None:
    mixture = Mixture(tensor_types=(("ffn_down", T.Q8_0),), token_embedding_type="q4_0",
                      output_tensor_type=T.Q5_K)
    out = tmp_path / "mix.gguf"
    quantize_file(tiny_llama, out, "Q4_K_M", n_threads=1, mixture=mixture)
    types = _assert_exact(tiny_llama, out, "Q4_K_M", False, mixture)
    assert types["blk.1.ffn_down.weight"] == T.Q8_0 and types["token_embd.weight"] == T.Q4_0
    assert types["output.weight"] == T.Q5_K


def test_target_types_need_every_tensor_reported(tiny_llama: Path) -> None:
    model = SourceModel(tiny_llama)
    tensors = list(model.tensors.values())
    with pytest.raises(QuantizeError, match="duplicate tensor names"):
        target_types(tensors + tensors[:1], model.kvs.values(), "Q4_K_M")
    kvs = {k: v for k, v in model.kvs.items() if k != "general.architecture"}
    with pytest.raises(QuantizeError, match="llama.cpp could not quantize this model to Q4_K_M: .*architecture"):
        target_types(tensors, kvs.values(), "Q4_K_M")


# --------------------------------------------------------------------------- ggml reproduces the bytes


@pytest.mark.parametrize("with_imatrix", [False, True])
@pytest.mark.parametrize(("source", "ftype"), [("tiny_llama", "Q4_K_M"), ("tiny_llama", "IQ4_XS"),
                                               ("tiny_bf16", "Q4_K_M"), ("tiny_llama_q8", "Q5_K_M")])
def test_ggml_reproduces_llama_cpp_bytes(source: str, ftype: str, with_imatrix: bool,
                                         request: pytest.FixtureRequest, quantized: Quantized) -> None:
    src_path: Path = request.getfixturevalue(source)
    out = GGUFReader(quantized(src_path, ftype, with_imatrix))
    src = {t.name: t for t in GGUFReader(src_path).tensors}
    imatrix = _imatrix(src_path) if with_imatrix else {}
    n_requantized = 0
    for t in out.tensors:
        s = src[t.name]
        raw = np.asarray(s.data).view(np.uint8).reshape(-1)
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        if t.tensor_type == s.tensor_type:
            assert np.array_equal(got, raw), t.name
            continue
        ne0 = int(s.shape[0])
        f32 = ggml.dequantize_rows(s.tensor_type, raw, ne0)
        ours = ggml.quantize_tensor(f32, t.tensor_type, imatrix.get(t.name), n_threads=2)
        assert got.nbytes == tensor_nbytes(t.tensor_type, [int(d) for d in t.shape])
        assert np.array_equal(ours, got), f"{t.name}: {s.tensor_type.name} -> {t.tensor_type.name}"
        n_requantized += 1
    assert n_requantized == 4 * 7 + 2  # every matrix


# --------------------------------------------------------------------------- failures and logs


def test_missing_imatrix_is_a_one_line_error(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "iq2.gguf"
    with pytest.raises(QuantizeError, match=r"requires an imatrix.*offending tensor: blk\.0\.attn_k\.weight") as e:
        quantize_file(tiny_llama, out, "IQ2_XXS")
    assert "\n" not in str(e.value)
    imatrix = _imatrix(tiny_llama)
    del imatrix["blk.0.attn_output.weight"]  # blk.0.attn_k comes first and is quantized; then this one fails
    with pytest.raises(QuantizeError, match=r"Missing importance matrix for tensor blk\.0\.attn_output\.weight"):
        quantize_file(tiny_llama, out, "IQ2_XXS", imatrix=imatrix)
    assert list(tmp_path.iterdir()) == []  # no partial output left behind


def test_requantize_needs_permission(tiny_llama_q8: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="requantizing from type q8_0 is disabled"):
        quantize_file(tiny_llama_q8, tmp_path / "q.gguf", "Q4_K_M")
    with pytest.raises(QuantizeError, match="same file"):
        quantize_file(tiny_llama_q8, tiny_llama_q8, "Q4_K_M")
    with pytest.raises(QuantizeError, match="no such file"):
        quantize_file(tmp_path / "missing.gguf", tmp_path / "q.gguf", "Q4_K_M")


def test_log_lines_are_kept_and_shown_when_verbose(tiny_llama: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    llama_log.install(verbose=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="upscaler.llama"):
            report = quantize_file(tiny_llama, tmp_path / "q8.gguf", "Q8_0", n_threads=1)
    finally:
        llama_log.install(verbose=False)
    assert any("converting to q8_0" in line for line in report.lines)
    assert any("converting to q8_0" in r.getMessage() for r in caplog.records)
    assert [t.name for t in report.tensors] == list(_file_types(tmp_path / "q8.gguf"))
    assert all(t.dst_type == (T.Q8_0 if len(t.shape) > 1 and t.shape[1] > 1 else T.F32) for t in report.tensors)


def test_report_survives_lines_llama_cpp_inserts_mid_tensor(tiny_llama: Path, tmp_path: Path) -> None:
    imatrix = _imatrix(tiny_llama)
    del imatrix["blk.1.attn_q.weight"]  # Q4_K does not need it: llama.cpp only says so, mid-line
    out = tmp_path / "q4.gguf"
    report = quantize_file(tiny_llama, out, "Q4_K_M", n_threads=1, imatrix=imatrix)
    assert any("did not find weights for blk.1.attn_q.weight" in line for line in report.lines)
    assert {t.name: t.dst_type for t in report.tensors} == _file_types(out)


def test_kv_overrides_are_written(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "kv.gguf"
    quantize_file(tiny_llama, out, "Q8_0", n_threads=1,
                  kv_overrides={"general.name": "Overridden", "llama.context_length": 512})
    model = SourceModel(out)
    assert model.get("general.name") == "Overridden"
    assert model.get("llama.context_length") == 512
    assert model.get("general.file_type") == quant_types.MOSTLY_Q8_0
