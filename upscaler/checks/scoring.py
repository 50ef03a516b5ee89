"""Score a model over text windows: NLL per token, and KL / top-1 agreement against kept logits.

One model's raw float32 logits at the scored positions are kept (plus float64 log-sum-exp and
argmax per row), in RAM when small and in a file (numpy memmap, pages the OS may evict) when
larger than :data:`RAM_BUDGET`; another model is then scored against them row chunk by row
chunk (float64 chunks of about :data:`CHUNK_BYTES`). Keeping raw logits instead of rounded
log-probs makes a model compared with itself give KL exactly 0 (llama.cpp stores the base
model's log-probs as 16-bit values and skips probabilities below e^-16; our KL sums the whole
vocabulary in float64). Smoke keeps the model under test and scores the reference against it;
a sweep keeps the source once, on disk, and scores every candidate against it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .llama_session import Decoder, check_finite, count_scored, logsumexp, vocab_of

__all__ = ["CHUNK_BYTES", "RAM_BUDGET", "KeptLogits", "Scores", "score_windows"]

RAM_BUDGET = 256 * 2**20  # kept logits above this go to a temporary file
CHUNK_BYTES = 8 * 2**20  # one float64 chunk of rows; at most ~3 live at once


@dataclass
class KeptLogits:
    """One model's logits at scored positions, kept while another is evaluated against them."""

    logits: np.ndarray  # (n_scored, n_vocab) float32, RAM or memmap
    lse: np.ndarray  # (n_scored,) float64
    argmax: np.ndarray  # (n_scored,) int64
    _file: Any = None

    @classmethod
    def allocate(cls, n_rows: int, n_vocab: int, ram_budget: int = RAM_BUDGET) -> KeptLogits:
        nbytes = n_rows * n_vocab * 4
        f = None
        logits: np.ndarray
        if nbytes > ram_budget:
            f = tempfile.TemporaryFile(prefix="gguf-upscale-smoke-")
            logits = np.memmap(f, dtype=np.float32, mode="w+", shape=(n_rows, n_vocab))
        else:
            logits = np.empty((n_rows, n_vocab), dtype=np.float32)
        return cls(logits, np.empty(n_rows), np.empty(n_rows, dtype=np.int64), f)

    def close(self) -> None:
        self.logits = np.empty((0, 0), dtype=np.float32)
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Scores:
    """Per scored token: this model's NLL, and against kept logits the KL and top-1 match."""

    nll: np.ndarray
    kl: np.ndarray | None = None
    agree: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.nll)


def score_windows(
    llm: Any,
    tokens: Sequence[int],
    windows: list[tuple[int, int, int]],
    *,
    what: str,
    keep: KeptLogits | None = None,
    against: KeptLogits | None = None,
    against_reference: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """Evaluate the windows; record NLL per token, and either keep logits or compare with kept ones.

    With ``against``, KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)) per position, in nats, where
    P is the reference: this model when ``against_reference`` is False (smoke keeps the model
    under test, then scores the reference against it), the kept logits when it is True (a sweep
    keeps the source once and scores every candidate against it).
    """
    import llama_cpp

    vocab = vocab_of(llm)
    bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else -1
    dec = Decoder(llm, what)
    n_vocab = dec.n_vocab
    chunk_rows = max(1, chunk_bytes // (n_vocab * 8))
    tok_arr = np.asarray(tokens, dtype=np.int64)
    n_rows = count_scored(windows)
    s = Scores(np.empty(n_rows))
    if against is not None:
        s.kl, s.agree = np.empty(n_rows), np.empty(n_rows, dtype=bool)
    row0 = 0  # index into kept arrays
    if progress is not None:
        progress(0, n_rows)
    try:
        for begin, end, score_from in windows:
            window = list(tokens[begin:end])
            if begin > 0 and bos >= 0:
                window[0] = bos  # as llama.cpp's perplexity: each window starts like a document
            dec.clear()
            for p0 in range(0, len(window), dec.capacity):
                part = window[p0 : p0 + dec.capacity]
                # logits at absolute position i predict token i+1: want i in [score_from-1, end-1)
                want = [score_from - 1 <= begin + p0 + i < end - 1 for i in range(len(part))]
                logits = dec.decode(part, p0, want)
                if not len(logits):
                    continue
                first = begin + p0 + want.index(True)  # absolute position of logits row 0
                for r in range(0, len(logits), chunk_rows):
                    rows = logits[r : r + chunk_rows]
                    _accumulate(s, rows, first + r, tok_arr, what, slice(row0, row0 + len(rows)), keep, against,
                                against_reference)
                    row0 += len(rows)
                if progress is not None:
                    progress(row0, n_rows)
    finally:
        dec.clear()
        dec.close()
    return s


def _accumulate(
    s: Scores,
    rows: np.ndarray,
    pos: int,
    tokens: np.ndarray,
    what: str,
    k: slice,
    keep: KeptLogits | None,
    against: KeptLogits | None,
    against_reference: bool = False,
) -> None:
    """Score one chunk of logits rows (row i at text position pos+i predicts tokens[pos+i+1])."""
    x = rows.astype(np.float64)
    check_finite(x, what, pos)
    lse = logsumexp(x)
    targets = tokens[pos + 1 : pos + 1 + len(x)]
    s.nll[k] = lse - x[np.arange(len(x)), targets]
    if keep is not None:
        keep.logits[k] = rows
        keep.lse[k] = lse
        keep.argmax[k] = x.argmax(axis=1)
    if against is not None:
        assert s.kl is not None and s.agree is not None
        top = x.argmax(axis=1)
        mine = np.subtract(x, lse[:, None], out=x)  # this model's log-probs
        kept = against.logits[k].astype(np.float64)
        kept -= against.lse[k, None]  # the kept model's log-probs
        logp, logq = (kept, mine) if against_reference else (mine, kept)
        np.subtract(logp, logq, out=logq)  # log P - log Q
        s.kl[k] = np.einsum("ij,ij->i", np.exp(logp, out=logp), logq)
        s.agree[k] = top == against.argmax[k]
