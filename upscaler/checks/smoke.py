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

import codecs
import ctypes
import io
import math
import tempfile
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import SmokeError
from ..quant import llama_log
from .eval_worker import Reporter, run_isolated
from .llama_params import model_params, open_llama

__all__ = [
    "DEFAULT_MAX_TOKENS_SCORED",
    "DEFAULT_PROMPT",
    "KLStatistics",
    "SmokeReport",
    "SmokeThresholdError",
    "kl_statistics",
    "default_text",
    "run_smoke",
]

DEFAULT_PROMPT = "Here is a short description of a quiet seaside town:"
DEFAULT_MAX_TOKENS_SCORED = 1024
_MIN_N_CTX = 8
_RAM_BUDGET = 256 * 2**20  # kept logits above this go to a temporary file
_CHUNK_BYTES = 8 * 2**20  # one float64 chunk of rows; at most ~3 live at once


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


# --------------------------------------------------------------------------- llama.cpp plumbing


@contextmanager
def _open(path: str | Path, *, what: str, n_ctx: int, n_threads: int | None) -> Iterator[Any]:
    """Load a model with llama.cpp's log captured; a refusal becomes a one-line SmokeError.

    ``n_batch`` is half a window: that bounds llama.cpp's logits buffer (see module doc).
    """
    path = Path(path)
    if not path.is_file():
        raise SmokeError(f"{what} {path}: no such file")
    verbose = llama_log.is_verbose()
    piece = max(1, n_ctx // 2)
    prints = io.StringIO()  # llama-cpp-python's own print()s when verbose
    with llama_log.capture() as lines, redirect_stdout(prints), redirect_stderr(prints):
        try:
            llm = open_llama(
                path,
                n_ctx=n_ctx,
                n_batch=piece,
                n_ubatch=piece,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                logits_all=False,  # we request logits per position through the batch API
                verbose=verbose,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError with no reason
            why = llama_log.reason(lines) or str(exc) or type(exc).__name__
            raise SmokeError(f"{what} {path} failed to load: {why}") from None
    for line in prints.getvalue().splitlines():
        if line.strip():
            llama_log.logger.debug("%s", line)
    llm.verbose = False  # keep later calls from print()ing to stderr
    try:
        yield llm
    finally:
        llm.close()


def _vocab(llm: Any) -> Any:
    """The llama_vocab pointer of a loaded model (public C API, not llama-cpp-python internals)."""
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(llm.model)


def _tokenize(vocab: Any, text: str) -> list[int]:
    """Tokenize like llama.cpp's tools: the vocab's own BOS/EOS rule, special tokens as text."""
    import llama_cpp

    data = text.encode("utf-8")
    cap = len(data) + 16
    while True:
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, True, False)
        if n >= 0:
            return list(buf[:n])
        cap = -n


def _piece(vocab: Any, token: int) -> bytes:
    """Raw bytes of one token (may be a fragment of a UTF-8 character)."""
    import llama_cpp

    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def _detokenize(vocab: Any, tokens: Sequence[int]) -> str:
    """Join byte pieces first, decode once: byte-level tokens split characters across tokens.

    A character left incomplete at the very end (generation stopped mid-character) is
    dropped; invalid bytes anywhere else show as U+FFFD, since those are the model's doing.
    """
    data = b"".join(_piece(vocab, t) for t in tokens)
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)


def checked_model_path(path: str | Path, what: str, text: str = "") -> Path:
    """The file llama.cpp should load (the first shard of a set), after our strict header reader
    accepted every shard and nothing in it would make llama.cpp abort: a truncated or crafted
    file becomes a one-line error naming it here, instead of a crash in llama.cpp."""
    from ..format.source import SourceModel

    if not Path(path).exists():
        raise SmokeError(f"{what} {path}: no such file")
    model = SourceModel(path)
    model.check_loadable(run=True)
    missing = _missing_byte_token(model, text)
    if missing is not None:
        raise SmokeError(f"{what} {model.path}: its vocabulary has no byte token <0x{missing:02X}>, which llama.cpp's "
                         "tokenizer needs for this text (a missing one makes it abort)")
    return model.path


_BYTE_FALLBACK_VOCABS = ("llama", "t5", "plamo2")  # SPM, UGM, PLaMo-2: byte_to_token uses map::at


def _missing_byte_token(model: Any, text: str) -> int | None:
    """A byte of `text` llama.cpp's byte fallback could not map (it throws through the C API)."""
    kind = model.get("tokenizer.ggml.model")
    if kind not in _BYTE_FALLBACK_VOCABS:
        return None
    tokens = model.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        return None
    known = set(tokens)
    for b in sorted(set(text.encode("utf-8"))):
        plain_ok = kind != "plamo2" and b < 0x80 and chr(b) in known  # SPM/UGM also try the raw byte
        if f"<0x{b:02X}>" not in known and not plain_ok:
            return b
    return None


def _vocab_only_tokens(path: str | Path, text: str) -> tuple[list[int], int]:
    """Tokenize with a model's vocab without loading its weights (cheap early mismatch check)."""
    import llama_cpp

    params = model_params(vocab_only=True)
    with llama_log.capture() as lines:
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
    if not model:
        raise SmokeError(f"reference {path} failed to load: {llama_log.reason(lines) or 'unknown reason'}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return _tokenize(vocab, text), llama_cpp.llama_vocab_n_tokens(vocab)
    finally:
        llama_cpp.llama_model_free(model)


class _Decoder:
    """One reusable llama_batch on one context, with logits requested per position."""

    def __init__(self, llm: Any, what: str) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.ctx = llm.ctx
        self.what = what
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(_vocab(llm))
        self.capacity = llm.n_batch
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)

    def close(self) -> None:
        self._llama_cpp.llama_batch_free(self.batch)

    def clear(self) -> None:
        """Forget the KV cache: every window starts from an empty context."""
        lc = self._llama_cpp
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)

    def decode(self, tokens: Sequence[int], pos0: int, want: Sequence[bool]) -> np.ndarray:
        """Decode ``tokens`` at positions ``pos0..``; return logits rows for ``want`` positions.

        The returned array is a view of llama.cpp's buffer: valid until the next decode.
        """
        n = len(tokens)
        if n > self.capacity:
            raise ValueError(f"batch of {n} tokens exceeds capacity {self.capacity}")
        b = self.batch
        b.n_tokens = n
        n_out = 0
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if want[i] else 0
            n_out += bool(want[i])
        with llama_log.capture() as lines:
            rc = self._llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            why = llama_log.reason(lines) or f"llama_decode returned {rc}"
            raise SmokeError(f"{self.what} failed to evaluate tokens {pos0}..{pos0 + n - 1}: {why}")
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = self._llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))


def _check_finite(x: np.ndarray, what: str, first_pos: int) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise SmokeError(f"{what} produced non-finite logits at token {first_pos + int(np.argmax(bad))}")


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp in float64, stable for any finite logits (one temporary)."""
    m = x.max(axis=1, keepdims=True)
    t = np.subtract(x, m)
    np.exp(t, out=t)
    return m[:, 0] + np.log(t.sum(axis=1))


# --------------------------------------------------------------------------- generation


def _generate(llm: Any, prompt: str, n_predict: int, what: str = "model") -> tuple[str, int]:
    """Greedy continuation of the raw prompt; bytes are joined before decoding (see _detokenize)."""
    import llama_cpp

    vocab = _vocab(llm)
    tokens = _tokenize(vocab, prompt)
    if not tokens:
        raise SmokeError("prompt is empty")
    n_ctx = llm.n_ctx()
    if len(tokens) >= n_ctx:
        raise SmokeError(f"prompt is {len(tokens)} tokens, does not fit the context of {n_ctx}")
    budget = min(n_predict, n_ctx - len(tokens))
    dec = _Decoder(llm, what)
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
            _check_finite(row, what, pos - 1)
            tok = int(row[0].argmax())
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            logits = dec.decode([tok], pos, [True])
            pos += 1
    finally:
        dec.clear()
        dec.close()
    return _detokenize(vocab, out), len(out)


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


# --------------------------------------------------------------------------- perplexity / KL

WINDOWS = ("sliding", "chunks")


def _windows(n_tokens: int, n_ctx: int, max_scored: int, mode: str = "sliding") -> list[tuple[int, int, int]]:
    """(begin, end, score_from) per window; targets tokens[score_from:end] (see module doc).

    ``chunks`` is llama-perplexity's layout: disjoint windows of ``n_ctx`` tokens, each scoring
    the tokens after its first half (``n_ctx - 1 - n_ctx // 2`` per chunk), whole chunks only.
    """
    if mode == "chunks":
        per_chunk = n_ctx - 1 - n_ctx // 2
        n_chunk = min(n_tokens // n_ctx, max(1, max_scored // per_chunk))
        if n_chunk < 1:
            raise SmokeError(f"text is too short for chunks of {n_ctx} tokens: {n_tokens} token(s)")
        return [(i * n_ctx, (i + 1) * n_ctx, i * n_ctx + n_ctx // 2 + 1) for i in range(n_chunk)]
    if mode != "sliding":
        raise SmokeError(f"windows must be one of {', '.join(WINDOWS)}, got {mode!r}")
    n_use = min(n_tokens, max_scored + 1)
    if n_use < 2:
        raise SmokeError(f"text is too short to score: {n_tokens} token(s)")
    keep = n_ctx - max(1, n_ctx // 2)  # context carried into the next window
    out = []
    begin, scored_to = 0, 1
    while scored_to < n_use:
        end = min(begin + n_ctx, n_use)
        out.append((begin, end, scored_to))
        scored_to = end
        begin = end - keep
    return out


def _n_scored(windows: list[tuple[int, int, int]]) -> int:
    return sum(end - score_from for _, end, score_from in windows)


@dataclass
class _Kept:
    """The model's logits at scored positions, kept while the reference is evaluated."""

    logits: np.ndarray  # (n_scored, n_vocab) float32, RAM or memmap
    lse: np.ndarray  # (n_scored,) float64
    argmax: np.ndarray  # (n_scored,) int64
    _file: Any = None

    @classmethod
    def allocate(cls, n_rows: int, n_vocab: int, ram_budget: int = _RAM_BUDGET) -> _Kept:
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
class _Scores:
    """Per scored token: this model's NLL, and against kept logits the KL and top-1 match."""

    nll: np.ndarray
    kl: np.ndarray | None = None
    agree: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.nll)


def _score(
    llm: Any,
    tokens: Sequence[int],
    windows: list[tuple[int, int, int]],
    *,
    what: str,
    keep: _Kept | None = None,
    against: _Kept | None = None,
    chunk_bytes: int = _CHUNK_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> _Scores:
    """Evaluate the windows; record NLL per token, and either keep logits or compare with kept ones.

    With ``against``, this model is the reference P and the kept logits are Q:
    KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)), per position, in nats.
    """
    import llama_cpp

    vocab = _vocab(llm)
    bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else -1
    dec = _Decoder(llm, what)
    n_vocab = dec.n_vocab
    chunk_rows = max(1, chunk_bytes // (n_vocab * 8))
    tok_arr = np.asarray(tokens, dtype=np.int64)
    n_rows = _n_scored(windows)
    s = _Scores(np.empty(n_rows))
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
                    _accumulate(s, rows, first + r, tok_arr, what, slice(row0, row0 + len(rows)), keep, against)
                    row0 += len(rows)
                if progress is not None:
                    progress(row0, n_rows)
    finally:
        dec.clear()
        dec.close()
    return s


def _accumulate(
    s: _Scores,
    rows: np.ndarray,
    pos: int,
    tokens: np.ndarray,
    what: str,
    k: slice,
    keep: _Kept | None,
    against: _Kept | None,
) -> None:
    """Score one chunk of logits rows (row i at text position pos+i predicts tokens[pos+i+1])."""
    x = rows.astype(np.float64)
    _check_finite(x, what, pos)
    lse = _logsumexp(x)
    targets = tokens[pos + 1 : pos + 1 + len(x)]
    s.nll[k] = lse - x[np.arange(len(x)), targets]
    if keep is not None:
        keep.logits[k] = rows
        keep.lse[k] = lse
        keep.argmax[k] = x.argmax(axis=1)
    if against is not None:
        assert s.kl is not None and s.agree is not None
        top = x.argmax(axis=1)
        logp = np.subtract(x, lse[:, None], out=x)
        diff = against.logits[k].astype(np.float64)
        diff -= against.lse[k, None]  # log Q
        np.subtract(logp, diff, out=diff)  # log P - log Q
        s.kl[k] = np.einsum("ij,ij->i", np.exp(logp, out=logp), diff)
        s.agree[k] = top == against.argmax[k]


def _perplexity(mean_nll: float, what: str) -> float:
    try:
        return math.exp(mean_nll)
    except OverflowError:
        raise SmokeError(f"{what} perplexity overflows (mean negative log-likelihood {mean_nll:.1f} nats)") from None


# --------------------------------------------------------------------------- llama-perplexity's statistics
# Transcribed from llama.cpp tools/perplexity/perplexity.cpp (kl_divergence()), so the figures
# read exactly as `llama-perplexity --kl-divergence` prints them for the same per-token values.


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error; 0 uncertainty for 10 values or fewer (llama.cpp's rule)."""
    count = len(values)
    if count < 1:
        return 0.0, 0.0
    v = np.asarray(values, dtype=np.float64)
    f = float(v.sum()) / count
    df = float((v * v).sum()) / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """Covariance of the two means (not of the values): 0 below 10 values, as llama.cpp."""
    count = len(a)
    if count < 10:
        return 0.0
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (float((a64 * b64).sum()) / count - float(a64.sum()) / count * (float(b64.sum()) / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's interpolated percentile of float values sorted ascending (float32 arithmetic)."""
    v = np.asarray(sorted_values, dtype=np.float32)
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(len(v) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    return float((np.float32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    v = np.asarray(sorted_values, dtype=np.float32)
    n = len(v)
    return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


@dataclass
class KLStatistics:
    """What `llama-perplexity --kl-divergence` reports, from per-token values (Q = model, base = reference)."""

    perplexity: float
    perplexity_uncertainty: float
    reference_perplexity: float
    reference_perplexity_uncertainty: float
    perplexity_ratio: float
    perplexity_ratio_uncertainty: float
    kl_divergence: float
    kl_divergence_uncertainty: float
    kl_divergence_median: float
    kl_divergence_p99: float
    kl_divergence_max: float
    top1_agreement: float
    top1_agreement_uncertainty: float


def kl_statistics(nll_q: np.ndarray, nll_base: np.ndarray, kl: np.ndarray, same_top: np.ndarray) -> KLStatistics:
    """llama.cpp's formulas: PPL = exp(mean NLL) ± PPL·σ(mean NLL); the ratio's uncertainty
    accounts for the covariance of the two NLLs; "same top p" ± sqrt(p(1-p)/(n-1))."""
    n = len(kl)
    log_ppl = mean_and_uncertainty(nll_q)
    log_ppl_base = mean_and_uncertainty(nll_base)
    cov = covariance(nll_q, nll_base)
    ratio_log = log_ppl[0] - log_ppl_base[0]
    ratio_log_unc = math.sqrt(max(0.0, log_ppl[1] ** 2 + log_ppl_base[1] ** 2 - 2.0 * cov))
    ppl = _perplexity(log_ppl[0], "model")
    ppl_base = _perplexity(log_ppl_base[0], "reference")
    ratio = math.exp(ratio_log)
    kld = mean_and_uncertainty(kl)
    ordered = np.sort(np.asarray(kl, dtype=np.float32))
    same = float(np.count_nonzero(same_top)) / n
    same_unc = math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0
    return KLStatistics(
        perplexity=ppl, perplexity_uncertainty=ppl * log_ppl[1],
        reference_perplexity=ppl_base, reference_perplexity_uncertainty=ppl_base * log_ppl_base[1],
        perplexity_ratio=ratio, perplexity_ratio_uncertainty=ratio * ratio_log_unc,
        kl_divergence=kld[0], kl_divergence_uncertainty=kld[1],
        kl_divergence_median=median(ordered), kl_divergence_p99=percentile(ordered, 0.99),
        kl_divergence_max=float(ordered[-1]),
        top1_agreement=same, top1_agreement_uncertainty=same_unc,
    )


def _model_facts(llm: Any) -> tuple[int, int]:
    import llama_cpp

    return llama_cpp.llama_model_n_layer(llm.model), llama_cpp.llama_model_n_params(llm.model)


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
                   max_tokens_scored, n_threads, windows, llama_log.is_verbose(), _RAM_BUDGET, _CHUNK_BYTES)
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
        ref_tokens, ref_n_vocab = _vocab_only_tokens(reference, req.text)

    rep.stage(f"loading {model_label}")
    t = time.perf_counter()
    with _open(model_path, what="model", n_ctx=req.n_ctx, n_threads=req.n_threads) as llm:
        timings["load"] = time.perf_counter() - t
        extra_bufts = bool(llm.model_params.use_extra_bufts)
        vocab = _vocab(llm)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        n_layer, n_params = _model_facts(llm)
        tokens = _tokenize(vocab, req.text)
        if ref_tokens is not None:
            _check_same_tokens(vocab, ref_tokens, ref_n_vocab, tokens, n_vocab)

        rep.stage(f"generating with {model_label}")
        t = time.perf_counter()
        try:
            generated, n_generated = (_chat if req.chat else _generate)(llm, req.prompt, req.n_predict, model_label)
        except SmokeError as e:
            msg = str(e)
            raise SmokeError(msg if msg.startswith(model_label) else f"{model_label}: {msg}") from None
        timings["generate"] = time.perf_counter() - t

        windows = _windows(len(tokens), req.n_ctx, req.max_tokens_scored, req.windows)
        n_scored = _n_scored(windows)
        kept = _Kept.allocate(n_scored, n_vocab, req.ram_budget) if reference is not None else None
        rep.stage(f"scoring {model_label}")
        t = time.perf_counter()
        try:
            scores = _score(llm, tokens, windows, what=model_label, keep=kept, chunk_bytes=req.chunk_bytes,
                            progress=lambda d, n: rep.progress("model", d, n))
        except BaseException:
            if kept is not None:
                kept.close()
            raise
        timings["perplexity"] = time.perf_counter() - t

    log_ppl = mean_and_uncertainty(scores.nll)
    ppl = _perplexity(log_ppl[0], model_label)
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
            with _open(reference, what="reference", n_ctx=req.n_ctx, n_threads=req.n_threads) as ref:
                rep.stage(f"scoring {ref_label}")
                ref_scores = _score(ref, tokens, windows, what=ref_label, against=kept, chunk_bytes=req.chunk_bytes,
                                    progress=lambda d, n: rep.progress("reference", d, n))
                report.reference_n_layer, report.reference_n_params = _model_facts(ref)
            timings["reference"] = time.perf_counter() - t
        finally:
            kept.close()
        assert ref_scores.kl is not None and ref_scores.agree is not None
        if not np.isfinite(ref_scores.kl).all():
            raise SmokeError("KL divergence against the reference is not finite")
        _perplexity(float(ref_scores.nll.mean()), ref_label)  # overflow names the reference
        stats = kl_statistics(scores.nll, ref_scores.nll, ref_scores.kl, ref_scores.agree)
        report.reference = str(reference)
        for key, value in asdict(stats).items():
            setattr(report, key, value)

    report.timings = {k: round(v, 3) for k, v in timings.items()}
    report.elapsed = time.perf_counter() - t_start
    return report


def _check_same_tokens(vocab: Any, ref_tokens: list[int], ref_n_vocab: int, tokens: list[int], n_vocab: int) -> None:
    """KL is only meaningful on identical token ids: same vocab size and same tokenization."""
    if ref_n_vocab != n_vocab:
        raise SmokeError(f"vocabularies differ: reference has {ref_n_vocab} tokens, model has {n_vocab}")
    if ref_tokens != tokens:
        i = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), min(len(ref_tokens), len(tokens)))
        ref_tok = ref_tokens[i] if i < len(ref_tokens) else None
        tok = tokens[i] if i < len(tokens) else None
        piece = _piece(vocab, tok) if tok is not None else b""
        raise SmokeError(
            f"reference and model tokenize the text differently: first difference at token {i} "
            f"(reference id {ref_tok}, model id {tok} {piece.decode('utf-8', 'replace')!r}; "
            f"{len(ref_tokens)} vs {len(tokens)} tokens)"
        )
