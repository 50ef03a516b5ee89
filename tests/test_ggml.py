"""upscaler.quant.ggml: the bundled ggml's sizes, conversions and quantization kernels, called from Python."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from upscaler.errors import QuantizeError
from upscaler.quant import ggml

RNG = np.random.default_rng(1234)


def _weights(rows: int, cols: int) -> np.ndarray:
    return RNG.standard_normal((rows, cols), dtype=np.float32)


# Q8_1 is an intermediate type that never appears in files; gguf-py's size for it is stale.
@pytest.mark.parametrize("t", [t for t in T if t in GGML_QUANT_SIZES and t != T.Q8_1])
def test_sizes_match_gguf_py(t: T) -> None:
    block, size = GGML_QUANT_SIZES[t]
    assert ggml.block_size(t) == block
    assert ggml.type_size(t) == size
    assert ggml.row_size(t, 4 * 256) == 4 * 256 // block * size
    assert ggml.type_by_name()[ggml.type_name(t)] == t


def test_bad_types_and_shapes_are_refused() -> None:
    with pytest.raises(QuantizeError, match="unknown ggml type"):
        ggml.type_name(4)  # Q4_2: removed from ggml
    with pytest.raises(QuantizeError, match="unknown ggml type"):
        ggml.block_size(ggml.GGML_TYPE_COUNT)
    with pytest.raises(QuantizeError, match="block size 256"):
        ggml.row_size(T.Q4_K, 320)


def test_dequantize_float_types_exactly() -> None:
    w = _weights(8, 64)
    h = w.astype(np.float16)
    assert np.array_equal(ggml.dequantize_rows(T.F16, h.view(np.uint8), 64), h.astype(np.float32))
    bf = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated bf16 bit patterns
    expect = (bf.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(ggml.dequantize_rows(T.BF16, bf.view(np.uint8), 64), expect)
    assert np.array_equal(ggml.dequantize_rows(T.F32, w.view(np.uint8), 64), w)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K])
def test_dequantize_matches_gguf_py_reference(t: T) -> None:
    raw = ggml.quantize_rows(t, _weights(16, 512)).reshape(16, -1)
    ours = ggml.dequantize_rows(t, raw, 512)
    assert ours.shape == (16, 512)
    np.testing.assert_allclose(ours, ref_dequantize(raw, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q5_1])
def test_quantize_matches_gguf_py_reference(t: T) -> None:
    """gguf-py's numpy quantizers are bit-exact ports of ggml's reference code."""
    w = _weights(32, 256)
    assert np.array_equal(ggml.quantize_rows(t, w), ref_quantize(w, t).reshape(-1))


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K, T.IQ4_XS, T.Q4_0, T.IQ3_S])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_chunking_and_threads_do_not_change_bytes(t: T, with_imatrix: bool) -> None:
    w = _weights(300, 512)  # 300 rows: chunks of unequal size
    im = RNG.uniform(0.1, 2.0, 512).astype(np.float32) if with_imatrix else None
    whole = ggml.quantize_rows(t, w, im)
    assert whole.nbytes == 300 * ggml.row_size(t, 512)
    for n_threads in (2, 3, 8):
        assert np.array_equal(ggml.quantize_tensor(w, t, im, n_threads=n_threads), whole)
    one_row_at_a_time = np.concatenate([ggml.quantize_rows(t, w[i:i + 1], im) for i in range(300)])
    assert np.array_equal(one_row_at_a_time, whole)
    assert ggml.validate_rows(t, whole)


def test_imatrix_changes_the_result() -> None:
    w = _weights(64, 256)
    im = RNG.uniform(0.01, 10.0, 256).astype(np.float32)
    assert not np.array_equal(ggml.quantize_rows(T.Q4_K, w), ggml.quantize_rows(T.Q4_K, w, im))


def test_experts_use_their_own_imatrix_slice() -> None:
    w = RNG.standard_normal((3, 40, 256), dtype=np.float32)
    im = RNG.uniform(0.1, 2.0, (3, 256)).astype(np.float32)
    whole = ggml.quantize_tensor(w, T.Q4_K, im, n_threads=2)
    per_expert = np.concatenate([ggml.quantize_rows(T.Q4_K, w[e], im[e]) for e in range(3)])
    assert np.array_equal(whole, per_expert)


def test_writes_into_caller_buffer() -> None:
    w = _weights(10, 256)
    out = np.zeros(10 * ggml.row_size(T.Q8_0, 256), dtype=np.uint8)
    assert ggml.quantize_tensor(w, T.Q8_0, out=out) is out
    assert np.array_equal(out, ggml.quantize_rows(T.Q8_0, w))
    with pytest.raises(ValueError, match="bytes"):
        ggml.quantize_tensor(w, T.Q8_0, out=out[:-1])


def test_types_that_require_an_imatrix() -> None:
    assert ggml.requires_imatrix(T.IQ2_XXS) and ggml.requires_imatrix(T.IQ1_S)
    assert not ggml.requires_imatrix(T.Q4_K)
    w = _weights(4, 256)
    with pytest.raises(QuantizeError, match="requires an importance matrix"):
        ggml.quantize_rows(T.IQ2_XXS, w)
    q = ggml.quantize_rows(T.IQ2_XXS, w, np.ones(256, np.float32))
    assert q.nbytes == 4 * ggml.row_size(T.IQ2_XXS, 256)
    with pytest.raises(QuantizeError, match="imatrix has 255 values"):
        ggml.quantize_rows(T.Q4_K, w, np.ones(255, np.float32))


# IQ1_S/IQ1_M/IQ2_S build their lookup grids on first use, which takes seconds.
@pytest.mark.parametrize("t", sorted(ggml.QUANTIZABLE - {T.IQ1_S, T.IQ1_M, T.IQ2_S}))
def test_every_quantizable_type_round_trips(t: int) -> None:
    w = _weights(2, 256)
    q = ggml.quantize_tensor(w, t, np.ones(256, np.float32), n_threads=2)
    assert q.nbytes == 2 * ggml.row_size(t, 256) and ggml.validate_rows(t, q)
    assert ggml.can_requantize(t)
    assert np.abs(ggml.dequantize_rows(t, q, 256) - w).max() < 3.5  # even 1.1-bit types stay in range


@pytest.mark.parametrize("t", [T.Q8_1, T.Q8_K, T.I8, T.I32, T.F64])
def test_types_ggml_cannot_quantize_are_refused_not_aborted(t: T) -> None:
    assert not ggml.can_requantize(t)
    with pytest.raises(QuantizeError, match="cannot quantize"):
        ggml.quantize_rows(t, _weights(1, 256))


def test_validate_rows_catches_bad_scales() -> None:
    q = ggml.quantize_rows(T.Q8_0, _weights(2, 64)).copy()
    assert ggml.validate_rows(T.Q8_0, q)
    q[0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # first block's fp16 scale
    assert not ggml.validate_rows(T.Q8_0, q)


def test_round_trip_is_close() -> None:
    w = _weights(16, 1024)
    for t in (T.Q8_0, T.Q6_K, T.Q4_K):
        back = ggml.dequantize_rows(t, ggml.quantize_rows(t, w), 1024)
        assert np.abs(back - w).max() < 0.5
