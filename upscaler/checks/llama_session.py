"""llama.cpp plumbing shared by every evaluation (smoke, layers, sweep): load a model with its log
captured, tokenize and detokenize like llama.cpp's tools, decode through the batch API with logits
requested per position, and lay a text out in scored windows.

Everything here runs inside the evaluation child (:mod:`upscaler.checks.eval_worker`), except
:func:`checked_model_path`, which the parent calls first so a file llama.cpp would abort on is
refused with one line before any child starts.
"""

from __future__ import annotations

import codecs
import ctypes
import io
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import SmokeError
from ..quant import llama_log
from .llama_params import model_params, open_llama

__all__ = [
    "WINDOWS",
    "Decoder",
    "check_finite",
    "check_same_tokens",
    "checked_model_path",
    "count_scored",
    "detokenize",
    "logsumexp",
    "model_facts",
    "open_model",
    "text_windows",
    "token_piece",
    "tokenize",
    "vocab_of",
    "vocab_only_tokens",
]


@contextmanager
def open_model(path: str | Path, *, what: str, n_ctx: int, n_threads: int | None) -> Iterator[Any]:
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


def vocab_of(llm: Any) -> Any:
    """The llama_vocab pointer of a loaded model (public C API, not llama-cpp-python internals)."""
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(llm.model)


def tokenize(vocab: Any, text: str) -> list[int]:
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


def token_piece(vocab: Any, token: int) -> bytes:
    """Raw bytes of one token (may be a fragment of a UTF-8 character)."""
    import llama_cpp

    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def detokenize(vocab: Any, tokens: Sequence[int]) -> str:
    """Join byte pieces first, decode once: byte-level tokens split characters across tokens.

    A character left incomplete at the very end (generation stopped mid-character) is
    dropped; invalid bytes anywhere else show as U+FFFD, since those are the model's doing.
    """
    data = b"".join(token_piece(vocab, t) for t in tokens)
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


def vocab_only_tokens(path: str | Path, text: str) -> tuple[list[int], int]:
    """Tokenize with a model's vocab without loading its weights (cheap early mismatch check)."""
    import llama_cpp

    params = model_params(vocab_only=True)
    with llama_log.capture() as lines:
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
    if not model:
        raise SmokeError(f"reference {path} failed to load: {llama_log.reason(lines) or 'unknown reason'}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return tokenize(vocab, text), llama_cpp.llama_vocab_n_tokens(vocab)
    finally:
        llama_cpp.llama_model_free(model)


def check_same_tokens(vocab: Any, ref_tokens: list[int], ref_n_vocab: int, tokens: list[int], n_vocab: int) -> None:
    """KL is only meaningful on identical token ids: same vocab size and same tokenization."""
    if ref_n_vocab != n_vocab:
        raise SmokeError(f"vocabularies differ: reference has {ref_n_vocab} tokens, model has {n_vocab}")
    if ref_tokens != tokens:
        i = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), min(len(ref_tokens), len(tokens)))
        ref_tok = ref_tokens[i] if i < len(ref_tokens) else None
        tok = tokens[i] if i < len(tokens) else None
        piece = token_piece(vocab, tok) if tok is not None else b""
        raise SmokeError(
            f"reference and model tokenize the text differently: first difference at token {i} "
            f"(reference id {ref_tok}, model id {tok} {piece.decode('utf-8', 'replace')!r}; "
            f"{len(ref_tokens)} vs {len(tokens)} tokens)"
        )


class Decoder:
    """One reusable llama_batch on one context, with logits requested per position."""

    def __init__(self, llm: Any, what: str) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.ctx = llm.ctx
        self.what = what
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab_of(llm))
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


def check_finite(x: np.ndarray, what: str, first_pos: int) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise SmokeError(f"{what} produced non-finite logits at token {first_pos + int(np.argmax(bad))}")


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp in float64, stable for any finite logits (one temporary)."""
    m = x.max(axis=1, keepdims=True)
    t = np.subtract(x, m)
    np.exp(t, out=t)
    return m[:, 0] + np.log(t.sum(axis=1))


# --------------------------------------------------------------------------- windows

WINDOWS = ("sliding", "chunks")


def text_windows(n_tokens: int, n_ctx: int, max_scored: int, mode: str = "sliding") -> list[tuple[int, int, int]]:
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


def count_scored(windows: list[tuple[int, int, int]]) -> int:
    return sum(end - score_from for _, end, score_from in windows)


def model_facts(llm: Any) -> tuple[int, int]:
    import llama_cpp

    return llama_cpp.llama_model_n_layer(llm.model), llama_cpp.llama_model_n_params(llm.model)
