"""Smoke test and llama.cpp log routing, on real (tiny) models loaded by llama.cpp."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from modelfactory import make_model
from upscaler.checks import kl_stats, llama_session, scoring, smoke
from upscaler.checks.smoke import SmokeReport, run_smoke
from upscaler.errors import SmokeError, UpscaleError
from upscaler.quant import llama_log

# Small windows and few tokens keep every run well under a second on the 4-layer fixture.
FAST = dict(n_ctx=64, max_tokens_scored=160, n_predict=8, n_threads=1)


def _perturbed_copy(src: Path, dst: Path, layer: int) -> Path:
    """Copy ``src`` with every 2-D weight of block ``layer`` replaced by noise of the same scale."""
    shutil.copyfile(src, dst)
    reader = GGUFReader(dst, "r+")
    rng = np.random.default_rng(123)
    n = 0
    for t in reader.tensors:
        if t.name.startswith(f"blk.{layer}.") and len(t.shape) == 2:
            data = t.data
            std = float(np.asarray(data, dtype=np.float32).std())
            data[...] = (rng.standard_normal(data.shape) * std).astype(data.dtype)
            n += 1
    reader.data.flush()
    del reader
    assert n == 7
    return dst


def _poisoned_copy(src: Path, dst: Path, token: int) -> Path:
    """Copy ``src`` with token ``token``'s embedding set to NaN."""
    shutil.copyfile(src, dst)
    reader = GGUFReader(dst, "r+")
    (emb,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    emb.data[token] = np.nan
    reader.data.flush()
    del reader
    return dst


@pytest.fixture(scope="module")
def noisy_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _perturbed_copy(tiny_llama, tmp_path_factory.mktemp("noisy") / "noisy.gguf", layer=2)


# --------------------------------------------------------------------------- KL / agreement oracles


def test_model_against_itself_is_identical(tiny_llama: Path) -> None:
    r = run_smoke(tiny_llama, reference=tiny_llama, **FAST)
    assert r.loaded
    assert r.n_tokens_scored == 160
    assert abs(r.kl_divergence) < 1e-6
    assert r.kl_divergence_max is not None and abs(r.kl_divergence_max) < 1e-6
    assert r.top1_agreement == 1.0
    assert r.perplexity == r.reference_perplexity
    assert 1.0 < r.perplexity < 1e5
    assert (r.n_layer, r.reference_n_layer) == (4, 4)
    assert r.n_params == r.reference_n_params > 0


def test_kl_orders_quantization_below_a_broken_layer(tiny_llama: Path, tiny_llama_q8: Path, noisy_llama: Path) -> None:
    """Same model < Q8_0 rounding < a layer replaced by noise: the metric ranks damage correctly."""
    q8 = run_smoke(tiny_llama_q8, reference=tiny_llama, **FAST)
    noisy = run_smoke(noisy_llama, reference=tiny_llama, **FAST)
    assert 0.0 < q8.kl_divergence < 0.05
    assert q8.top1_agreement > 0.9
    assert noisy.kl_divergence > 10 * q8.kl_divergence
    assert noisy.kl_divergence > 0.05
    assert noisy.top1_agreement < q8.top1_agreement
    assert noisy.top1_agreement < 0.95
    assert noisy.reference_perplexity == q8.reference_perplexity  # same reference, same tokens


def test_spilled_and_chunked_paths_give_the_same_numbers(
    tiny_llama: Path, noisy_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept logits in a temp-file memmap and 3-row log-softmax chunks change nothing."""
    ram = run_smoke(noisy_llama, reference=tiny_llama, **FAST)
    monkeypatch.setattr(scoring, "RAM_BUDGET", 0)
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 3 * 512 * 8)
    spilled = run_smoke(noisy_llama, reference=tiny_llama, **FAST)
    assert spilled.top1_agreement == ram.top1_agreement
    assert math.isclose(spilled.kl_divergence, ram.kl_divergence, rel_tol=1e-12)
    assert math.isclose(spilled.perplexity, ram.perplexity, rel_tol=1e-12)


def test_min_agreement_threshold(tiny_llama: Path, noisy_llama: Path) -> None:
    run_smoke(tiny_llama, reference=tiny_llama, min_agreement=1.0, **FAST)
    with pytest.raises(SmokeError, match=r"top-1 agreement with the reference is 0\.\d+, below the minimum 0\.990"):
        run_smoke(noisy_llama, reference=tiny_llama, min_agreement=0.99, **FAST)
    with pytest.raises(SmokeError, match="needs a reference"):
        run_smoke(tiny_llama, min_agreement=0.5, **FAST)


def test_reference_with_another_vocab_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    other = make_model(tmp_path / "bigger-vocab.gguf", n_vocab=640)
    with pytest.raises(SmokeError, match="vocabularies differ: reference has 640 tokens, model has 512"):
        run_smoke(tiny_llama, reference=other, **FAST)


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n_tokens,n_ctx,max_scored", [(10, 64, 100), (200, 64, 1000), (200, 64, 100), (65, 64, 64), (7, 9, 6)])
def test_windows_score_every_token_once_with_context(n_tokens: int, n_ctx: int, max_scored: int) -> None:
    windows = llama_session.text_windows(n_tokens, n_ctx, max_scored)
    scored: list[int] = []
    for i, (begin, end, score_from) in enumerate(windows):
        assert end - begin <= n_ctx
        assert begin <= score_from < end
        if i:
            assert score_from - begin >= n_ctx - n_ctx // 2  # later windows keep half a window of context
        scored += range(score_from, end)
    assert scored == list(range(1, min(n_tokens, max_scored + 1)))


def test_empty_text_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(SmokeError, match="text is empty"):
        run_smoke(tiny_llama, text=" \n", **FAST)
    assert run_smoke(tiny_llama, text="a", **FAST).n_tokens_scored == 1  # <s> ▁a


# --------------------------------------------------------------------------- generation and UTF-8


def test_generation_is_greedy_and_deterministic(tiny_llama: Path) -> None:
    a = run_smoke(tiny_llama, prompt="hello world", **FAST)
    b = run_smoke(tiny_llama, prompt="hello world", **FAST)
    assert a.text == b.text and a.n_generated == 8
    assert a.prompt == "hello world"


def test_japanese_round_trips_through_byte_pieces(tiny_llama: Path, load_llama) -> None:
    """Byte-fallback tokens split characters; joining bytes before decoding restores them."""
    llm = load_llama(tiny_llama)
    vocab = llama_session.vocab_of(llm)
    text = "日本語のテキスト、東京へ行きます。"
    tokens = llama_session.tokenize(vocab, text)
    pieces = [llama_session.token_piece(vocab, t) for t in tokens]
    partial = [p for p in pieces if p]
    assert any(_invalid_utf8(p) for p in partial), "expected byte-fallback fragments"
    assert tokens[0] == 1  # BOS; SentencePiece then prefixes the text with a space
    assert llama_session.detokenize(vocab, tokens[1:]) == " " + text
    # Cut inside the last character: the fragment is dropped, not shown as U+FFFD.
    assert llama_session.detokenize(vocab, tokens[1:-2]) == " " + text[:-1]
    # A stray continuation byte in the middle is the model's fault and stays visible.
    stray = 3 + 0x80  # <0x80>: the fixture vocab keeps byte tokens at ids 3..258
    assert llama_session.token_piece(vocab, stray) == b"\x80"
    assert llama_session.detokenize(vocab, [stray, *tokens[1:]]) == "\ufffd " + text


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_japanese_prompt_and_text(tiny_llama: Path) -> None:
    text = "海辺の町では朝の空気が少し塩の匂いを含んでいる。" * 4
    r = run_smoke(tiny_llama, reference=tiny_llama, prompt="日本語で答えてください：", text=text, **FAST)
    assert isinstance(r.text, str)
    assert r.kl_divergence == 0.0
    d = json.loads(json.dumps(r.to_dict(), ensure_ascii=False))
    assert d["prompt"] == "日本語で答えてください："


def test_chat_mode_uses_the_models_template(tiny_llama: Path, tmp_path: Path) -> None:
    r = run_smoke(tiny_llama, prompt="こんにちは", chat=True, **FAST)
    assert isinstance(r.text, str) and r.chat
    plain = make_model(tmp_path / "no-template.gguf", extra_kv={"tokenizer.chat_template": None})
    with pytest.raises(SmokeError, match="no chat template"):
        run_smoke(plain, chat=True, **FAST)


# --------------------------------------------------------------------------- failures


def test_garbage_file_is_refused_before_llama_cpp(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(UpscaleError, match=r"garbage\.gguf: not a GGUF file \(bad magic\)"):
        run_smoke(bad, **FAST)


def test_truncated_file_is_refused_before_llama_cpp(tiny_llama: Path, tmp_path: Path) -> None:
    """Our strict reader sees every file first: one line naming the file, for model and reference."""
    cut = tmp_path / "cut.gguf"
    data = tiny_llama.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UpscaleError, match=r"cut\.gguf: tensor .* lies beyond the end of the file") as e:
        run_smoke(cut, **FAST)
    assert "\n" not in str(e.value)
    with pytest.raises(UpscaleError, match=r"cut\.gguf: tensor .* beyond the end"):
        run_smoke(tiny_llama, reference=cut, **FAST)


def test_llama_cpp_refusal_is_quoted(tmp_path: Path) -> None:
    """A well-formed GGUF llama.cpp still refuses (a required key missing): its reason, one line."""
    model = make_model(tmp_path / "no-embd.gguf", extra_kv={"llama.embedding_length": None})
    with pytest.raises(SmokeError, match=r"model .*no-embd\.gguf failed to load: .*llama\.embedding_length") as e:
        run_smoke(model, **FAST)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SmokeError, match="no such file"):
        run_smoke(tmp_path / "nope.gguf", **FAST)


def test_non_finite_logits_name_the_token(tiny_llama: Path, tmp_path: Path, load_llama) -> None:
    """A NaN embedding poisons the logits of every position in the batch that sees it.

    (llama.cpp masks future positions by adding -inf, and NaN + -inf is NaN, so the
    whole decode batch holding the token turns non-finite, not just later positions.)
    """
    clean = "hello world the cat and the sun. " * 8
    text = clean + "the dog"
    vocab = llama_session.vocab_of(load_llama(tiny_llama))
    tokens = llama_session.tokenize(vocab, text)
    dog = llama_session.tokenize(vocab, " dog")[-1]
    assert tokens.index(dog) > 40 and dog not in llama_session.tokenize(vocab, clean)
    bad = _poisoned_copy(tiny_llama, tmp_path / "nan.gguf", dog)
    run_smoke(bad, prompt="hello", text=clean, **FAST)  # fine while the token is never seen
    with pytest.raises(SmokeError, match=r"^model nan\.gguf produced non-finite logits at token (\d+)$") as e:
        run_smoke(bad, prompt="hello", text=text, **FAST)
    first_bad = int(str(e.value).rsplit(" ", 1)[1])
    assert FAST["n_ctx"] // 2 <= first_bad <= tokens.index(dog)  # the first half-window decoded cleanly
    # Generation only asks for the prompt's last row: [<s>, ▁hello, ▁the, ▁dog] -> token 3.
    with pytest.raises(SmokeError, match=r"^model nan\.gguf produced non-finite logits at token 3$"):
        run_smoke(bad, prompt="hello the dog", text=clean, **FAST)


def test_split_model_loads_from_first_shard(tiny_llama_split: Path, tiny_llama: Path) -> None:
    r = run_smoke(tiny_llama_split, reference=tiny_llama, **FAST)
    assert r.kl_divergence == 0.0 and r.top1_agreement == 1.0


# --------------------------------------------------------------------------- report


def test_report_json_contract(tiny_llama: Path) -> None:
    r = run_smoke(tiny_llama, reference=tiny_llama, **FAST)
    d = json.loads(json.dumps(r.to_dict()))
    for key in ("loaded", "text", "perplexity", "reference_perplexity", "kl_divergence", "top1_agreement"):
        assert key in d
    assert d["loaded"] is True and d["elapsed"] > 0
    without_ref = run_smoke(tiny_llama, **FAST).to_dict()
    assert without_ref["kl_divergence"] is None and without_ref["reference"] is None


def test_non_finite_report_value_is_an_error() -> None:
    r = SmokeReport(model="m", loaded=True, text="", prompt="p", chat=False, perplexity=float("nan"),
                    n_tokens_scored=0, n_ctx=8, n_vocab=1)
    with pytest.raises(SmokeError, match="perplexity is not finite"):
        r.to_dict()


def test_default_text_is_packaged() -> None:
    text = smoke.default_text()
    assert 600 <= len(text.split()) and "海辺" in text


# --------------------------------------------------------------------------- llama_log


def test_capture_collects_load_log_and_recent_keeps_it(tiny_llama: Path, load_llama) -> None:
    llama_log.install()
    llama_log.install()  # idempotent
    with llama_log.capture() as outer:
        with llama_log.capture() as lines:
            load_llama(tiny_llama)
    assert any("llama_model_loader" in ln for ln in lines)
    assert outer[: len(lines)] == lines
    assert all("\n" not in ln for ln in lines)
    assert len(llama_log.recent(5)) == 5
    assert llama_log.recent(0) == []


def test_partial_lines_and_levels_through_the_c_callback(caplog: pytest.LogCaptureFixture) -> None:
    """Pieces without a newline (progress dots, CONT level) are joined into one line."""
    cb = llama_log._callback
    llama_log.install(verbose=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="upscaler.llama"), llama_log.capture() as lines:
            llama_log._callback(3, b"loading ", None)  # WARN
            llama_log._callback(5, b"...", None)  # CONT
            llama_log._callback(5, b" done\nsecond", None)
        assert lines == ["loading ... done", "second"]
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, "loading ... done")]
        llama_log._callback(2, b"\n", None)  # finishes "second"
        assert llama_log.recent(2) == ["loading ... done", "second"]
    finally:
        llama_log.install(verbose=False)
    assert llama_log._callback is cb or cb is None


def test_reason_prefers_the_specific_line() -> None:
    lines = [
        "gguf_init_from_reader: invalid magic characters: 'UN??', expected 'GGUF'",
        "llama_model_load: error loading model: llama_model_loader: failed to load model from x.gguf",
        "llama_model_load_from_file_impl: failed to load model",
    ]
    assert llama_log.reason(lines) == "invalid magic characters: 'UN??', expected 'GGUF'"
    assert llama_log.reason(["all good"]) is None


def test_nothing_reaches_the_terminal(tiny_llama: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """llama.cpp's log goes through the callback, never raw to fd 1/2, in plain and chat mode."""
    run_smoke(tiny_llama, reference=tiny_llama, **FAST)
    run_smoke(tiny_llama, chat=True, **FAST)
    assert capfd.readouterr() == ("", "")


def test_verbose_forwards_to_logging_only(
    tiny_llama: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    llama_log.install(verbose=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="upscaler.llama"):
            run_smoke(tiny_llama, chat=True, **FAST)
    finally:
        llama_log.install(verbose=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "upscaler.llama"]
    assert any("llama_model_loader" in m for m in messages)  # native log
    assert any("Model metadata" in m for m in messages)  # llama-cpp-python's own print()s
    assert capfd.readouterr() == ("", "")


def test_numbers_match_a_direct_computation(tiny_llama: Path, tiny_llama_q8: Path, load_llama) -> None:
    """Independent oracle: llama-cpp-python's own eval (all logits) and a textbook KL/PPL in numpy."""
    from modelfactory import eval_logits

    text = "the cat and the dog in the sun, hello world. 日本語"
    r = run_smoke(tiny_llama_q8, reference=tiny_llama, text=text, **FAST)
    tokens = llama_session.tokenize(llama_session.vocab_of(load_llama(tiny_llama)), text)
    assert len(tokens) <= FAST["n_ctx"]  # one window: every position after the first is scored
    p_logits = eval_logits(load_llama(tiny_llama, n_threads=1), tokens)[:-1].astype(np.float64)
    q_logits = eval_logits(load_llama(tiny_llama_q8, n_threads=1), tokens)[:-1].astype(np.float64)

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    logp, logq = log_softmax(p_logits), log_softmax(q_logits)
    targets = np.array(tokens[1:])
    rows = np.arange(len(targets))
    assert r.n_tokens_scored == len(targets)
    assert math.isclose(r.perplexity, math.exp(-logq[rows, targets].mean()), rel_tol=1e-9)
    assert math.isclose(r.reference_perplexity, math.exp(-logp[rows, targets].mean()), rel_tol=1e-9)
    kl = (np.exp(logp) * (logp - logq)).sum(axis=1)
    assert math.isclose(r.kl_divergence, kl.mean(), rel_tol=1e-9)
    assert r.top1_agreement == np.mean(p_logits.argmax(1) == q_logits.argmax(1))


# --------------------------------------------------------------------------- llama-perplexity's statistics


def _llama_perplexity_stats(nll_q: list[float], nll_base: list[float], kld: list[float], same: list[bool]) -> dict:
    """perplexity.cpp's kl_divergence() summary, transcribed line by line (plain Python sums)."""
    count = len(kld)

    def mean_and_uncertainty(s: float, s2: float) -> tuple[float, float]:
        f = s / count
        df = s2 / count - f * f
        return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)

    log_ppl = mean_and_uncertainty(sum(nll_q), sum(x * x for x in nll_q))
    log_ppl_base = mean_and_uncertainty(sum(nll_base), sum(x * x for x in nll_base))
    cov = 0.0
    if count >= 10:
        cov = (sum(a * b for a, b in zip(nll_q, nll_base)) / count
               - (sum(nll_q) / count) * (sum(nll_base) / count)) / (count - 1)
    ratio_log = log_ppl[0] - log_ppl_base[0]
    ratio_unc = math.sqrt(log_ppl[1] ** 2 + log_ppl_base[1] ** 2 - 2.0 * cov)
    kl = mean_and_uncertainty(sum(kld), sum(x * x for x in kld))
    values = sorted(np.float32(x) for x in kld)
    n = len(values)
    med = np.float32(0.5) * (values[n // 2] + values[n // 2 - 1]) if n % 2 == 0 else values[n // 2]
    p = np.float32(0.99) * np.float32(n - 1)
    ip = int(p)
    p = np.float32(p - ip)
    p99 = (np.float32(1) - p) * values[ip] + p * values[min(ip + 1, n - 1)]
    same_top = sum(same) / count
    ppl, ppl_base = math.exp(log_ppl[0]), math.exp(log_ppl_base[0])
    return dict(perplexity=ppl, perplexity_uncertainty=ppl * log_ppl[1],
                reference_perplexity=ppl_base, reference_perplexity_uncertainty=ppl_base * log_ppl_base[1],
                perplexity_ratio=math.exp(ratio_log), perplexity_ratio_uncertainty=math.exp(ratio_log) * ratio_unc,
                kl_divergence=kl[0], kl_divergence_uncertainty=kl[1], kl_divergence_median=float(med),
                kl_divergence_p99=float(p99), kl_divergence_max=float(values[-1]),
                top1_agreement=same_top, top1_agreement_uncertainty=math.sqrt(same_top * (1 - same_top) / (count - 1)))


def _per_token(p_logits: np.ndarray, q_logits: np.ndarray, targets: np.ndarray):
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    logp, logq = log_softmax(p_logits), log_softmax(q_logits)
    rows = np.arange(len(targets))
    kl = (np.exp(logp) * (logp - logq)).sum(axis=1)
    return (list(-logq[rows, targets]), list(-logp[rows, targets]), list(kl),
            list(p_logits.argmax(1) == q_logits.argmax(1)))


@pytest.mark.parametrize("windows", ["sliding", "chunks"])
def test_statistics_follow_llama_perplexity(tiny_llama: Path, noisy_llama: Path, load_llama, windows: str) -> None:
    """Independent oracle: logits from llama-cpp-python's own eval on the windows llama-perplexity
    would use (chunks: disjoint n_ctx windows, BOS first, second half scored), then perplexity.cpp's
    formulas transcribed above. Every figure of the report must match."""
    from modelfactory import eval_logits

    text = "the cat and the dog in the sun, hello world. " * 12
    n_ctx = 64
    r = run_smoke(noisy_llama, reference=tiny_llama, text=text, n_ctx=n_ctx, max_tokens_scored=1000,
                  n_predict=1, n_threads=1, windows=windows)
    ref_llm, llm = load_llama(tiny_llama, n_threads=1), load_llama(noisy_llama, n_threads=1)
    tokens = llama_session.tokenize(llama_session.vocab_of(ref_llm), text)
    nll_q, nll_p, kld, same = [], [], [], []
    if windows == "chunks":
        assert len(tokens) >= 2 * n_ctx
        for c in range(len(tokens) // n_ctx):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
            chunk[0] = 1  # BOS at every chunk start
            first = n_ctx // 2
            sl = slice(first, n_ctx - 1)
            got = _per_token(eval_logits(ref_llm, chunk)[sl], eval_logits(llm, chunk)[sl], np.array(chunk[first + 1:]))
            for acc, vals in zip((nll_q, nll_p, kld, same), got):
                acc += vals
        assert r.n_tokens_scored == (len(tokens) // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    else:
        for begin, end, score_from in llama_session.text_windows(len(tokens), n_ctx, 1000):
            window = list(tokens[begin:end])
            if begin:
                window[0] = 1
            sl = slice(score_from - 1 - begin, end - 1 - begin)
            got = _per_token(eval_logits(ref_llm, window)[sl], eval_logits(llm, window)[sl],
                             np.array(tokens[score_from:end]))
            for acc, vals in zip((nll_q, nll_p, kld, same), got):
                acc += vals
        assert r.n_tokens_scored == len(tokens) - 1
    expected = _llama_perplexity_stats(nll_q, nll_p, kld, same)
    got = r.to_dict()
    assert got["windows"] == windows and got["n_tokens_text"] == len(tokens)
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, got[key], value)
    assert 0 < got["kl_divergence_median"] <= got["kl_divergence_p99"] <= got["kl_divergence_max"]
    assert got["perplexity_uncertainty"] > 0 and got["kl_divergence_uncertainty"] > 0


def test_statistics_known_answers() -> None:
    assert kl_stats.mean_and_uncertainty(np.array([1.0, 3.0])) == (2.0, 0.0)  # 10 values or fewer: no uncertainty
    x = np.arange(1.0, 12.0)  # 11 values, mean 6, population variance 10
    assert kl_stats.mean_and_uncertainty(x) == (6.0, math.sqrt(10 / 10))
    assert kl_stats.covariance(x[:9], x[:9]) == 0.0 and math.isclose(kl_stats.covariance(x, x), 10 / 10)
    v = np.array([0.0, 1.0, 2.0, 10.0], dtype=np.float32)
    assert kl_stats.median(v) == 1.5 and kl_stats.median(v[:3]) == 1.0
    assert kl_stats.percentile(v, 0.5) == 1.5 and kl_stats.percentile(v, 1.0) == 10.0
    assert math.isclose(kl_stats.percentile(v, 0.99), 10.0 - 0.03 * 8, rel_tol=1e-6)  # p = 2.97: 0.03*2 + 0.97*10
    s = kl_stats.kl_statistics(np.full(20, 2.0), np.full(20, 1.0), np.zeros(20), np.ones(20, dtype=bool))
    assert math.isclose(s.perplexity_ratio, math.e) and s.perplexity_ratio_uncertainty == 0.0
    assert s.top1_agreement == 1.0 and s.top1_agreement_uncertainty == 0.0 and s.kl_divergence_max == 0.0


def test_chunk_windows_are_llama_perplexity_chunks() -> None:
    assert llama_session.text_windows(300, 64, 10_000, "chunks") == [(i * 64, i * 64 + 64, i * 64 + 33) for i in range(4)]
    assert llama_session.text_windows(300, 64, 62, "chunks") == [(0, 64, 33), (64, 128, 97)]  # 31 scored per chunk
    with pytest.raises(SmokeError, match="too short for chunks of 64 tokens"):
        llama_session.text_windows(63, 64, 100, "chunks")
