"""Route llama.cpp's native log through Python instead of raw writes to stderr.

llama.cpp (and ggml, which shares the callback) prints model-load chatter and its
error reasons straight to stderr unless a callback is installed. We install one
callback for the whole process that:

- keeps the last lines in memory, so a failure can quote llama.cpp's own reason
  (:func:`recent`, :func:`capture`, :func:`reason`);
- forwards every line to the ``upscaler.llama`` logger only when verbose, so the
  terminal stays clean by default and ``--verbose`` shows everything.

Anything that calls into llama.cpp (smoke test, quantizer) just does::

    with llama_log.capture() as lines:
        ...call llama.cpp...
    if failed:
        raise SomeError(f"...: {llama_log.reason(lines) or 'unknown reason'}")

:func:`capture` installs the callback itself, so callers never need to remember to.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Sequence

__all__ = ["install", "is_verbose", "recent", "capture", "reason", "logger"]

logger = logging.getLogger("upscaler.llama")

# ggml.h: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (continue previous line).
# (llama-cpp-python's own _logger.py has these numbers wrong; this table follows ggml.h.)
_GGML_TO_LOGGING = {
    0: logging.INFO,
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
_GGML_CONT = 5

_MAX_LINES = 500

_lock = threading.RLock()
_recent: deque[tuple[int, str]] = deque(maxlen=_MAX_LINES)
_captures: list[list[str]] = []
_partial = ""  # text of the current line until its newline arrives
_partial_level = logging.INFO
_verbose = False
_callback: object | None = None  # the ctypes function object; must outlive every C call that may log


def _emit(level: int, line: str) -> None:
    """Record one complete line (lock held)."""
    _recent.append((level, line))
    for lines in _captures:
        lines.append(line)
    if _verbose and line.strip():
        logger.log(level, "%s", line)


def _on_log(level: int, text: bytes | None, _user_data: object) -> None:
    """The C callback. Never raises: an exception here would be printed by ctypes, not propagated."""
    global _partial, _partial_level
    try:
        chunk = (text or b"").decode("utf-8", errors="replace")
        with _lock:
            if level != _GGML_CONT and not _partial:
                _partial_level = _GGML_TO_LOGGING.get(level, logging.INFO)
            _partial += chunk
            *complete, _partial = _partial.split("\n")
            for line in complete:
                _emit(_partial_level, line)
    except Exception:  # pragma: no cover - defensive, see docstring
        pass


def install(verbose: bool = False) -> None:
    """Install the callback (idempotent) and set whether lines are forwarded to ``logging``.

    Safe to call any number of times. It re-registers every time because importing
    llama_cpp installs llama-cpp-python's own callback, which prints to stderr.
    """
    global _verbose, _callback
    import llama_cpp

    with _lock:
        _verbose = verbose
        if _callback is None:
            _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def is_verbose() -> bool:
    """Whether llama.cpp lines are currently forwarded to the ``upscaler.llama`` logger."""
    return _verbose


def recent(n: int = 20) -> list[str]:
    """The last ``n`` lines llama.cpp logged (an unfinished line included), oldest first."""
    if n <= 0:
        return []
    with _lock:
        lines = [line for _, line in _recent]
        if _partial:
            lines.append(_partial)
    return lines[-n:]


@contextmanager
def capture() -> Iterator[list[str]]:
    """Collect every line llama.cpp logs inside the block into the yielded list.

    Installs the callback if needed (keeping the current verbosity). Captures nest;
    an unfinished line pending at exit is appended so a last word without a newline
    is not lost.
    """
    if _callback is None:
        install(_verbose)
    lines: list[str] = []
    with _lock:
        _captures.append(lines)
    try:
        yield lines
    finally:
        with _lock:
            _captures.remove(lines)
            if _partial:
                lines.append(_partial)


# Lines that carry the actual reason, best first. llama.cpp reports a failed load on
# several lines ("gguf_init_from_file_impl: invalid magic ...", then "llama_model_load:
# error loading model: ...", then "... failed to load model"); the earliest specific one wins.
_GENERIC = re.compile(r"failed to load model\s*$|failed to initialize the context|^\s*$", re.IGNORECASE)
_ERRORISH = re.compile(r"error|failed|invalid|cannot|unable|unknown|not supported|missing|wrong|out of memory",
                       re.IGNORECASE)
# llama.cpp's informational dump of the file: key/values, type counts, model facts
_DUMP = re.compile(r"^\s*(?:llama_model_loader: - |print_info: |llama_model_loader: Dumping)")
_PREFIX = re.compile(r"^(?:[\w:.~<>]+: )+")  # "llama_model_load: error loading model: " style prefixes


def reason(lines: Sequence[str]) -> str | None:
    """The most informative one-line failure reason in ``lines`` (None if none looks like one).

    Prefers the first error-looking line that is not a generic "failed to load model"
    trailer, and strips llama.cpp's ``function_name:`` prefixes so it reads as a sentence.
    """
    lines = [ln for ln in lines if not _DUMP.search(ln)]  # metadata values may hold any word
    candidates = [ln.strip() for ln in lines if _ERRORISH.search(ln) and not _GENERIC.search(ln)]
    if not candidates:
        generic = [ln.strip() for ln in lines if _ERRORISH.search(ln)]
        if not generic:
            return None
        candidates = generic
    best = candidates[0]
    stripped = _PREFIX.sub("", best).removeprefix("error loading model: ").strip()
    return stripped or best
