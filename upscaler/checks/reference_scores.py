"""Score a source model once, keep its logits on disk, and score any number of candidates against them.

This is what a sweep needs from llama.cpp: the source (the reference P) is evaluated once; its
raw float32 logits at the scored positions go to ``logits.npy`` in a folder the caller owns,
beside its per-row log-sum-exp, argmax and NLL and the token ids. Each candidate (Q) is then
evaluated in a fresh child process that maps those files (numpy memmap, pages the OS may
evict) and computes, per scored token, KL(P || Q) and top-1 agreement, summarised with
llama-perplexity's statistics (:mod:`upscaler.checks.kl_stats`), on exactly the windows and
token ids the source was scored on. The figures equal what ``smoke CANDIDATE --reference
SOURCE`` reports (same windows, same formulas), which the tests check.

Each evaluation runs in its own child (:mod:`upscaler.checks.eval_worker`): a candidate that
crashes llama.cpp costs that candidate, not the sweep or the kept source scores.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.format import open_memmap

from ..errors import SmokeError
from ..quant import llama_log
from . import scoring
from .eval_worker import Reporter, run_isolated
from .kl_stats import KLStatistics, kl_statistics, mean_and_uncertainty, perplexity_of
from .llama_session import (
    check_same_tokens,
    checked_model_path,
    count_scored,
    model_facts,
    open_model,
    text_windows,
    tokenize,
    vocab_of,
)
from .scoring import KeptLogits, score_windows

__all__ = ["CandidateScores", "StoredReference", "score_candidate", "score_reference"]

Progress = Callable[[str, int, int], None]

_FILES = ("logits", "lse", "argmax", "nll", "tokens")


@dataclass(frozen=True)
class StoredReference:
    """The source's scores, kept in `folder` (picklable: it goes to every candidate's child)."""

    path: str
    folder: str
    text: str
    n_ctx: int
    windows: list[tuple[int, int, int]]
    windows_mode: str
    n_scored: int
    n_vocab: int
    n_tokens_text: int
    perplexity: float
    perplexity_uncertainty: float
    n_layer: int
    n_params: int
    seconds: float

    def file(self, name: str) -> Path:
        return Path(self.folder) / f"{name}.npy"


@dataclass
class CandidateScores:
    """One candidate against the source: llama-perplexity's figures plus what it took."""

    stats: KLStatistics
    n_layer: int
    n_params: int
    seconds: float
    nll: np.ndarray  # per scored token, for paired comparisons between candidates (8 bytes a token)

    def to_dict(self) -> dict:
        return {**asdict(self.stats), "n_layer": self.n_layer, "n_params": self.n_params,
                "seconds": round(self.seconds, 3)}


@dataclass
class _ReferenceRequest:
    path: str
    folder: str
    text: str
    n_ctx: int
    max_tokens_scored: int
    windows: str
    n_threads: int | None
    verbose: bool
    chunk_bytes: int


@dataclass
class _CandidateRequest:
    path: str
    reference: StoredReference
    n_threads: int | None
    verbose: bool
    chunk_bytes: int


def score_reference(path: str | Path, folder: str | Path, *, text: str, n_ctx: int = 512,
                    max_tokens_scored: int = 1024, windows: str = "sliding", n_threads: int | None = None,
                    progress: Progress | None = None,
                    on_stage: Callable[[str], None] | None = None) -> StoredReference:
    """Evaluate the source once (in a child) and keep its scores in `folder`."""
    if not text.strip():
        raise SmokeError("perplexity text is empty")
    model = checked_model_path(path, "source", text)
    req = _ReferenceRequest(str(model), str(folder), text, n_ctx, max_tokens_scored, windows, n_threads,
                            llama_log.is_verbose(), scoring.CHUNK_BYTES)
    stored: StoredReference = run_isolated("upscaler.checks.reference_scores:_score_reference", req,
                                           on_stage=on_stage, on_progress=progress)
    return stored


def score_candidate(path: str | Path, reference: StoredReference, *, n_threads: int | None = None,
                    progress: Progress | None = None,
                    on_stage: Callable[[str], None] | None = None) -> CandidateScores:
    """Evaluate one candidate (in a child) against the kept source scores."""
    model = checked_model_path(path, "candidate", reference.text)
    req = _CandidateRequest(str(model), reference, n_threads, llama_log.is_verbose(), scoring.CHUNK_BYTES)
    result: CandidateScores = run_isolated("upscaler.checks.reference_scores:_score_candidate", req,
                                           on_stage=on_stage, on_progress=progress)
    return result


# --------------------------------------------------------------------------- child side


def _score_reference(req: _ReferenceRequest, rep: Reporter) -> StoredReference:
    t0 = time.perf_counter()
    llama_log.install(req.verbose)
    path = Path(req.path)
    label = f"source {path.name}"
    folder = Path(req.folder)
    rep.stage(f"loading {label}")
    with open_model(path, what="source", n_ctx=req.n_ctx, n_threads=req.n_threads) as llm:
        import llama_cpp

        vocab = vocab_of(llm)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        tokens = tokenize(vocab, req.text)
        windows = text_windows(len(tokens), req.n_ctx, req.max_tokens_scored, req.windows)
        n_rows = count_scored(windows)
        kept = KeptLogits(open_memmap(folder / "logits.npy", mode="w+", dtype=np.float32, shape=(n_rows, n_vocab)),
                          np.empty(n_rows), np.empty(n_rows, dtype=np.int64))
        rep.stage(f"scoring {label}")
        scores = score_windows(llm, tokens, windows, what=label, keep=kept, chunk_bytes=req.chunk_bytes,
                               progress=lambda d, n: rep.progress("source", d, n))
        n_layer, n_params = model_facts(llm)
    assert isinstance(kept.logits, np.memmap)
    kept.logits.flush()
    kept.close()
    np.save(folder / "lse.npy", kept.lse)
    np.save(folder / "argmax.npy", kept.argmax)
    np.save(folder / "nll.npy", scores.nll)
    np.save(folder / "tokens.npy", np.asarray(tokens, dtype=np.int64))
    log_ppl = mean_and_uncertainty(scores.nll)
    ppl = perplexity_of(log_ppl[0], label)
    return StoredReference(str(path), str(folder), req.text, req.n_ctx, windows, req.windows, n_rows, n_vocab,
                           len(tokens), ppl, ppl * log_ppl[1], n_layer, n_params, time.perf_counter() - t0)


def _score_candidate(req: _CandidateRequest, rep: Reporter) -> CandidateScores:
    t0 = time.perf_counter()
    llama_log.install(req.verbose)
    ref = req.reference
    path = Path(req.path)
    label = f"candidate {path.name}"
    ref_tokens = np.load(ref.file("tokens")).tolist()
    kept = KeptLogits(np.load(ref.file("logits"), mmap_mode="r"), np.load(ref.file("lse")),
                      np.load(ref.file("argmax")))
    ref_nll = np.load(ref.file("nll"))
    rep.stage(f"loading {label}")
    with open_model(path, what="candidate", n_ctx=ref.n_ctx, n_threads=req.n_threads) as llm:
        import llama_cpp

        vocab = vocab_of(llm)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        tokens = tokenize(vocab, ref.text)
        check_same_tokens(vocab, ref_tokens, ref.n_vocab, tokens, n_vocab)
        rep.stage(f"scoring {label}")
        scores = score_windows(llm, tokens, ref.windows, what=label, against=kept, against_reference=True,
                               chunk_bytes=req.chunk_bytes, progress=lambda d, n: rep.progress("candidate", d, n))
        n_layer, n_params = model_facts(llm)
    kept.close()
    assert scores.kl is not None and scores.agree is not None
    if not np.isfinite(scores.kl).all():
        raise SmokeError(f"{label}: KL divergence against the source is not finite")
    stats = kl_statistics(scores.nll, ref_nll, scores.kl, scores.agree)
    return CandidateScores(stats, n_layer, n_params, time.perf_counter() - t0, scores.nll)
