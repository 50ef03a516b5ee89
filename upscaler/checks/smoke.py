"""Smoke test: prove a GGUF model loads and behaves, optionally against its source model.

What it measures, and why each piece is there:

- **load**: llama.cpp opens the file (or the first shard of a split set) and its
  reason is quoted when it refuses.
- **generation**: a few greedy tokens, so a human can eyeball that the text is not
  noise. Plain mode feeds the prompt raw; ``chat=True`` goes through the model's own
  chat template.
- **perplexity** over a fixed text (``data/smoke_text.txt`` by default).
- with a **reference** (the source model): per scored position, KL(reference || model)
  and whether both models' top token agree, on exactly the same token ids; summarised
  with llama-perplexity's own definitions (mean KL and its uncertainty, median, 99th
  percentile and maximum; "same top p" and its uncertainty; the perplexity ratio and its
  uncertainty, see :func:`kl_statistics`). This is the number that tells a broken upscale
  from a working one; perplexity alone cannot, because a random text has no absolute
  "good" perplexity.

Isolation. llama.cpp runs in a child process (:mod:`upscaler.checks.eval_worker`), on plain CPU
buffers (:mod:`upscaler.checks.llama_params`): a crash, a GGML_ASSERT abort or an OOM kill there
becomes one error line naming the stage and the signal, and this process stays up to say
what became of the caller's output.

Windowing. The text is tokenized once. Windows are ``n_ctx`` tokens long and advance
by ``n_ctx // 2``; the first window scores every token after the first, each later
window scores only its second half (the tokens no earlier window scored), so every
token except the first is scored exactly once and always with at least ``n_ctx // 2``
tokens of context once past the first window. This is llama.cpp's perplexity rule
("score the second half of the window", including its BOS substitution at window
start) made to use the whole text: llama.cpp's tool uses disjoint chunks and throws
the first half of every chunk away, which wastes a short text. ``windows="chunks"``
uses llama.cpp's layout instead, for figures comparable with ``llama-perplexity``.
Both models are always scored on the same windows.

Memory. We decode through llama.cpp's batch API and ask for logits only at scored
positions, in pieces of ``n_ctx // 2`` tokens, so llama.cpp's logits buffer holds at
most ``n_ctx // 2`` rows (150k vocab x 256 rows x 4 B = 155 MB). Log-softmax runs in
float64 on row chunks of ~8 MB. With a reference, the models are loaded one at a
time in the one child process: the model under test is evaluated first and its raw
float32 logits for the scored positions are kept (plus float64 log-sum-exp and argmax
per row), in RAM when small and in a temporary file (numpy memmap, pages the OS may
evict) when larger than 256 MB; it is closed before the reference is loaded. Keeping
raw logits instead of rounded log-probs makes a model compared with itself give KL
exactly 0 (llama.cpp stores the base model's log-probs as 16-bit values and skips
probabilities below e^-16; our KL sums the whole vocabulary in float64).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import SmokeError
from ..quant import llama_log
from . import scoring
from .eval_worker import Reporter, run_isolated
from .kl_stats import kl_statistics, mean_and_uncertainty, perplexity_of
from .llama_session import (
    WINDOWS,
    Decoder,
    check_finite,
    check_same_tokens,
    checked_model_path,
    count_scored,
    detokenize,
    model_facts,
    open_model,
    text_windows,
    tokenize,
    vocab_of,
    vocab_only_tokens,
)
from .scoring import KeptLogits, score_windows

__all__ = [
    "DEFAULT_MAX_TOKENS_SCORED",
    "DEFAULT_PROMPT",
    "SmokeReport",
    "SmokeThresholdError",
    "default_text",
    "run_smoke",
]

DEFAULT_PROMPT = "Here is a short description of a quiet seaside town:"
DEFAULT_MAX_TOKENS_SCORED = 1024
_MIN_N_CTX = 8
RAM_BUDGET = 256 * 2**20  # kept logits above this go to a temporary file
CHUNK_BYTES = 8 * 2**20  # one float64 chunk of rows; at most ~3 live at once
def default_text() -> str:
    """The packaged perplexity text (English prose with a Japanese paragraph)."""
    return resources.files("upscaler").joinpath("data/smoke_text.txt").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- report


@dataclass
class SmokeReport:
    """Everything one smoke run found; ``to_dict`` is the ``--json`` output."""

    model: str
    loaded: bool
    text: str
    prompt: str
    chat: bool
    perplexity: float
    n_tokens_scored: int
    n_ctx: int
    n_vocab: int
    n_layer: int | None = None
    n_params: int | None = None
    n_generated: int = 0
    n_tokens_text: int | None = None  # tokens in the text (scored: at most max_tokens_scored of them)
    windows: str = "sliding"
    extra_buffer_types: bool = False  # llama.cpp's weight repacking; always off (llama_params.py)
    perplexity_uncertainty: float | None = None
    reference: str | None = None
    reference_perplexity: float | None = None
    reference_perplexity_uncertainty: float | None = None
    perplexity_ratio: float | None = None
    perplexity_ratio_uncertainty: float | None = None
    kl_divergence: float | None = None
    kl_divergence_uncertainty: float | None = None
    kl_divergence_median: float | None = None
    kl_divergence_p99: float | None = None
    kl_divergence_max: float | None = None
    top1_agreement: float | None = None
    top1_agreement_uncertainty: float | None = None
    reference_n_layer: int | None = None
    reference_n_params: int | None = None
    elapsed: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; a non-finite number is an error (JSON has no NaN), not a silent null."""
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise SmokeError(f"smoke result {key} is not finite ({value})")
        return d


# --------------------------------------------------------------------------- generation


def _generate(llm: Any, prompt: str, n_predict: int, what: str = "model") -> tuple[str, int]:
    """Greedy continuation of the raw prompt; bytes are joined before decoding (see detokenize)."""
    import llama_cpp

    vocab = vocab_of(llm)
    tokens = tokenize(vocab, prompt)
    if not tokens:
        raise SmokeError("prompt is empty")
    n_ctx = llm.n_ctx()
    if len(tokens) >= n_ctx:
        raise SmokeError(f"prompt is {len(tokens)} tokens, does not fit the context of {n_ctx}")
    budget = min(n_predict, n_ctx - len(tokens))
    dec = Decoder(llm, what)
    out: list[int] = []
    try:
        dec.clear()
        logits = np.empty(0)
        for start in range(0, len(tokens), dec.capacity):
            part = tokens[start : start + dec.capacity]
            want = [start + i == len(tokens) - 1 for i in range(len(part))]
            logits = dec.decode(part, start, want)
        pos = len(tokens)
        for _ in range(budget):
            row = logits[-1:].astype(np.float64)
            check_finite(row, what, pos - 1)
            tok = int(row[0].argmax())
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            logits = dec.decode([tok], pos, [True])
            pos += 1
    finally:
        dec.clear()
        dec.close()
    return detokenize(vocab, out), len(out)


def _chat(llm: Any, prompt: str, n_predict: int, what: str = "model") -> tuple[str, int]:
    """One greedy user turn through the model's own chat template (tokenizer.chat_template)."""
    if "tokenizer.chat_template" not in llm.metadata:
        raise SmokeError("model has no chat template (tokenizer.chat_template); run without --chat")
    llm.reset()
    try:
        with llama_log.capture():
            resp = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=n_predict,
                temperature=0.0,
                seed=0,
            )
    except Exception as exc:  # template errors (jinja) and context overflow (ValueError)
        raise SmokeError(f"chat generation failed: {exc}") from None
    finally:
        llm.reset()
    text = resp["choices"][0]["message"].get("content") or ""
    return text, int(resp.get("usage", {}).get("completion_tokens", 0))


# --------------------------------------------------------------------------- entry point


class SmokeThresholdError(SmokeError):
    """A threshold (``min_agreement``) failed; the figures are in ``report`` (``--json`` prints them)."""

    def __init__(self, message: str, report: SmokeReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class _Request:
    """Everything the evaluation child needs (picklable)."""

    model_path: str
    reference: str | None
    text: str
    prompt: str
    chat: bool
    n_predict: int
    n_ctx: int
    max_tokens_scored: int
    n_threads: int | None
    windows: str
    verbose: bool
    ram_budget: int
    chunk_bytes: int


def run_smoke(
    model_path: str | Path,
    *,
    reference: str | Path | None = None,
    text: str | None = None,
    prompt: str | None = None,
    chat: bool = False,
    n_predict: int = 32,
    n_ctx: int = 512,
    max_tokens_scored: int = DEFAULT_MAX_TOKENS_SCORED,
    n_threads: int | None = None,
    min_agreement: float | None = None,
    windows: str = "sliding",
    progress: Callable[[str, int, int], None] | None = None,
) -> SmokeReport:
    """Load, generate, score the text; with ``reference`` also KL and top-1 agreement.

    llama.cpp runs in a child process (:mod:`upscaler.checks.eval_worker`); this process only checks
    the files and collects the figures, so a crash in llama.cpp is an EvalCrashed error here.
    Raises SmokeError with one line for anything that means "this model does not work":
    load failure (llama.cpp's reason quoted), non-finite logits, tokenizer mismatch with
    the reference, or top-1 agreement below ``min_agreement`` (SmokeThresholdError, which
    carries the report). ``progress(label, done, total)`` is called while scoring.
    """
    if n_ctx < _MIN_N_CTX:
        raise SmokeError(f"n_ctx must be at least {_MIN_N_CTX}, got {n_ctx}")
    if max_tokens_scored < 1 or n_predict < 0:
        raise SmokeError("max_tokens_scored must be >= 1 and n_predict >= 0")
    if min_agreement is not None and reference is None:
        raise SmokeError("min_agreement needs a reference model")
    if windows not in WINDOWS:
        raise SmokeError(f"windows must be one of {', '.join(WINDOWS)}, got {windows!r}")
    text = default_text() if text is None else text
    if not text.strip():
        raise SmokeError("perplexity text is empty")
    prompt = DEFAULT_PROMPT if prompt is None else prompt

    model_path = checked_model_path(model_path, "model", text + prompt)
    ref_path = checked_model_path(reference, "reference", text) if reference is not None else None
    req = _Request(str(model_path), str(ref_path) if ref_path else None, text, prompt, chat, n_predict, n_ctx,
                   max_tokens_scored, n_threads, windows, llama_log.is_verbose(), scoring.RAM_BUDGET,
                   scoring.CHUNK_BYTES)
    t_start = time.perf_counter()
    report: SmokeReport = run_isolated("upscaler.checks.smoke:_evaluate", req, on_progress=progress)
    report.elapsed = time.perf_counter() - t_start  # the child's start included
    if min_agreement is not None and report.top1_agreement is not None:
        if report.top1_agreement < min_agreement:
            raise SmokeThresholdError(
                f"top-1 agreement with the reference is {report.top1_agreement:.3f}, below the minimum "
                f"{min_agreement:.3f} (KL {report.kl_divergence:.4f} nats over {report.n_tokens_scored} tokens)",
                report,
            )
    return report


def _evaluate(req: _Request, rep: Reporter) -> SmokeReport:
    """The child's side of :func:`run_smoke`: one model in memory at a time, the model first.

    The model under test is loaded, generates, and scores the text, keeping its logits at
    the scored positions; it is closed before the reference is loaded and scored against them.
    """
    import llama_cpp

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    llama_log.install(req.verbose)
    model_path = Path(req.model_path)
    model_label = f"model {model_path.name}"  # errors from here on name the file they are about
    reference = Path(req.reference) if req.reference else None
    ref_tokens: list[int] | None = None
    if reference is not None:
        ref_label = f"reference {reference.name}"
        rep.stage(f"reading the vocabulary of {ref_label}")
        ref_tokens, ref_n_vocab = vocab_only_tokens(reference, req.text)

    rep.stage(f"loading {model_label}")
    t = time.perf_counter()
    with open_model(model_path, what="model", n_ctx=req.n_ctx, n_threads=req.n_threads) as llm:
        timings["load"] = time.perf_counter() - t
        extra_bufts = bool(llm.model_params.use_extra_bufts)
        vocab = vocab_of(llm)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        n_layer, n_params = model_facts(llm)
        tokens = tokenize(vocab, req.text)
        if ref_tokens is not None:
            check_same_tokens(vocab, ref_tokens, ref_n_vocab, tokens, n_vocab)

        rep.stage(f"generating with {model_label}")
        t = time.perf_counter()
        try:
            generated, n_generated = (_chat if req.chat else _generate)(llm, req.prompt, req.n_predict, model_label)
        except SmokeError as e:
            msg = str(e)
            raise SmokeError(msg if msg.startswith(model_label) else f"{model_label}: {msg}") from None
        timings["generate"] = time.perf_counter() - t

        windows = text_windows(len(tokens), req.n_ctx, req.max_tokens_scored, req.windows)
        n_scored = count_scored(windows)
        kept = KeptLogits.allocate(n_scored, n_vocab, req.ram_budget) if reference is not None else None
        rep.stage(f"scoring {model_label}")
        t = time.perf_counter()
        try:
            scores = score_windows(llm, tokens, windows, what=model_label, keep=kept, chunk_bytes=req.chunk_bytes,
                            progress=lambda d, n: rep.progress("model", d, n))
        except BaseException:
            if kept is not None:
                kept.close()
            raise
        timings["perplexity"] = time.perf_counter() - t

    log_ppl = mean_and_uncertainty(scores.nll)
    ppl = perplexity_of(log_ppl[0], model_label)
    report = SmokeReport(
        model=str(model_path),
        loaded=True,
        text=generated,
        prompt=req.prompt,
        chat=req.chat,
        perplexity=ppl,
        n_tokens_scored=scores.n,
        n_ctx=req.n_ctx,
        n_vocab=n_vocab,
        n_layer=n_layer,
        n_params=n_params,
        n_generated=n_generated,
        n_tokens_text=len(tokens),
        windows=req.windows,
        extra_buffer_types=extra_bufts,
        perplexity_uncertainty=ppl * log_ppl[1],
    )

    if reference is not None and kept is not None:
        try:
            rep.stage(f"loading {ref_label}")
            t = time.perf_counter()
            with open_model(reference, what="reference", n_ctx=req.n_ctx, n_threads=req.n_threads) as ref:
                rep.stage(f"scoring {ref_label}")
                ref_scores = score_windows(ref, tokens, windows, what=ref_label, against=kept,
                                           chunk_bytes=req.chunk_bytes,
                                           progress=lambda d, n: rep.progress("reference", d, n))
                report.reference_n_layer, report.reference_n_params = model_facts(ref)
            timings["reference"] = time.perf_counter() - t
        finally:
            kept.close()
        assert ref_scores.kl is not None and ref_scores.agree is not None
        if not np.isfinite(ref_scores.kl).all():
            raise SmokeError("KL divergence against the reference is not finite")
        perplexity_of(float(ref_scores.nll.mean()), ref_label)  # overflow names the reference
        stats = kl_statistics(scores.nll, ref_scores.nll, ref_scores.kl, ref_scores.agree)
        report.reference = str(reference)
        for key, value in asdict(stats).items():
            setattr(report, key, value)

    report.timings = {k: round(v, 3) for k, v in timings.items()}
    report.elapsed = time.perf_counter() - t_start
    return report
