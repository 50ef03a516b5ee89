"""Run llama.cpp evaluation in a child process, so a crash inside llama.cpp cannot take the tool down.

llama.cpp does not raise: a failed ``GGML_ASSERT`` aborts the process (SIGABRT), a kernel bug
segfaults (SIGSEGV), and the kernel's out-of-memory killer sends SIGKILL. In the CLI's own
process any of these would end the command with the shell's bare "Segmentation fault" and,
in ``run``, without the message that says what became of the output. So evaluation runs in
a child, a fresh ``python -c`` (no inherited threads or llama.cpp state), and the parent
turns the child's death into one line naming the stage and the signal (:class:`EvalCrashed`).

The protocol is a socket pair carrying pickled tuples: the request goes to the child, then:

- ``("stage", text)`` before each step ("loading model x.gguf", "scoring reference y.gguf");
  the last one names where a crash happened;
- ``("progress", label, done, total)`` while scoring (the parent draws a bar on a terminal);
- ``("log", name, level, message)``: the child's log records (llama.cpp's log when verbose),
  re-emitted through the parent's ``logging``;
- ``("result", value)``, or ``("error", class_name, message)`` for a domain error, or
  ``("exception", class_name, message, traceback)`` for a bug.

The child's own fd 1 and 2 go to a temporary file, so nothing llama.cpp prints raw (an
assertion's message, a backtrace) reaches the terminal; the parent quotes the assertion line
from it when the child aborted.

Test hook: ``GGUF_UPSCALE_EVAL_CRASH=STAGE_PREFIX:SIGNAL`` (e.g. ``scoring reference:SIGSEGV``)
makes the child send itself that signal when a stage starting with that text begins, so the
tests crash a real child process exactly where they want.
"""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from .. import errors
from ..errors import UpscaleError

__all__ = ["EvalCrashed", "Reporter", "run_isolated"]

CRASH_HOOK_ENV = "GGUF_UPSCALE_EVAL_CRASH"

_SIGNAL_WHAT = {
    signal.SIGSEGV: "llama.cpp crashed",
    signal.SIGBUS: "llama.cpp crashed",
    signal.SIGILL: "llama.cpp crashed (an instruction this CPU lacks?)",
    signal.SIGFPE: "llama.cpp crashed",
    signal.SIGABRT: "llama.cpp aborted",
    signal.SIGKILL: "the evaluation process was killed (out of memory?)",
}


class EvalCrashed(UpscaleError):
    """The evaluation process died: a signal or an exit without a result."""

    def __init__(self, message: str, *, stage: str, signal_name: str | None) -> None:
        super().__init__(message)
        self.stage = stage
        self.signal_name = signal_name


# --------------------------------------------------------------------------- child side


@dataclass
class Reporter:
    """What the evaluation code in the child uses to talk to the parent."""

    conn: Any

    def stage(self, text: str) -> None:
        self.conn.send(("stage", text))
        _crash_hook(text)

    def progress(self, label: str, done: int, total: int) -> None:
        self.conn.send(("progress", label, done, total))


class _PipeHandler(logging.Handler):
    def __init__(self, conn: Any) -> None:
        super().__init__(logging.DEBUG)
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.conn.send(("log", record.name, record.levelno, record.getMessage()))
        except Exception:  # pragma: no cover - the parent is gone
            pass


def _crash_hook(stage: str) -> None:
    spec = os.environ.get(CRASH_HOOK_ENV)
    if not spec:
        return
    prefix, _, sig = spec.rpartition(":")
    if not stage.startswith(prefix):
        return
    if sig == "SIGABRT":
        os.abort()
    os.kill(os.getpid(), getattr(signal, sig))


def _child_entry(fd: int) -> None:
    """Entry point of the child (``python -c``): no SIGINT (the parent decides), run the request.

    The first message on the socket is ``(sys_path, target, request, log_level)``; the child's
    fd 1 and 2 already point at the parent's temporary file.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent ends us
    faulthandler.disable()  # a crash is reported by the parent, not as a Python dump
    os.environ["GGML_NO_BACKTRACE"] = "1"  # ggml_abort would attach gdb to print one
    conn = Connection(fd)
    sys_path, target, request, log_level = conn.recv()
    sys.path[:] = sys_path
    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(conn)]
    root.setLevel(log_level)
    try:
        module, _, name = target.partition(":")
        fn = getattr(importlib.import_module(module), name)
        value = fn(request, Reporter(conn))
    except UpscaleError as e:
        conn.send(("error", type(e).__name__, str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("exception", type(e).__name__, str(e), traceback.format_exc()))
    else:
        conn.send(("result", value))
    finally:
        conn.close()


# --------------------------------------------------------------------------- parent side


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def _assert_line(path: str) -> str | None:
    """The line llama.cpp printed when it aborted (GGML_ASSERT / an uncaught exception), if any."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in tail:
        if "GGML_ASSERT" in line or "terminate called" in line or "GGML_ABORT" in line:
            return " ".join(line.split())[:200]
    return None


_CHILD_CODE = "import sys; from upscaler.checks.eval_worker import _child_entry; _child_entry(int(sys.argv[1]))"


def run_isolated(target: str, request: Any, *, on_stage: Callable[[str], None] | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> Any:
    """Run ``target`` (``"module:function"``, called as ``fn(request, reporter)``) in a child process.

    Returns its result; re-raises its domain errors as the same class; raises
    :class:`EvalCrashed` when it dies. The child is ended on any way out of here
    (Ctrl-C, SIGTERM turned into KeyboardInterrupt by the CLI).

    The child is a fresh ``python -c`` (not multiprocessing's spawn, which re-runs the caller's
    main script in the child and so breaks any script that calls this at top level), with this
    process's ``sys.path``, talking over a socket pair.
    """
    log_level = logging.getLogger().getEffectiveLevel()
    for name in ("upscaler", "upscaler.llama"):
        level = logging.getLogger(name).level
        if level and level < log_level:
            log_level = level
    ours, theirs = socket.socketpair()
    conn = Connection(ours.detach())
    import upscaler  # the package's own root, wherever this module sits in it

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(upscaler.__file__)))  # `upscaler` importable there
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.NamedTemporaryFile(prefix="gguf-upscale-eval-", suffix=".log") as stderr_file:
        try:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(theirs.fileno())],
                                    stdin=subprocess.DEVNULL, stdout=stderr_file, stderr=stderr_file,
                                    pass_fds=(theirs.fileno(),), env=env, close_fds=True)
        finally:
            theirs.close()
        stage = "starting"
        try:
            conn.send((list(sys.path), target, request, log_level))
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, ConnectionResetError):
                    break
                kind = msg[0]
                if kind == "stage":
                    stage = msg[1]
                    if on_stage is not None:
                        on_stage(stage)
                elif kind == "progress":
                    if on_progress is not None:
                        on_progress(msg[1], msg[2], msg[3])
                elif kind == "log":
                    logging.getLogger(msg[1]).log(msg[2], "%s", msg[3])
                elif kind == "result":
                    return msg[1]
                elif kind == "error":
                    cls = getattr(errors, msg[1], None)
                    if not (isinstance(cls, type) and issubclass(cls, UpscaleError)):
                        cls = UpscaleError
                    raise cls(msg[2])
                elif kind == "exception":
                    logging.getLogger("upscaler").debug("evaluation process traceback:\n%s", msg[3])
                    if msg[1] == "MemoryError":
                        raise UpscaleError(f"out of memory while {stage}")
                    raise RuntimeError(f"{msg[1]} while {stage}: {msg[2]}")
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            sig = _signal_name(proc.returncode)
            if sig is None:
                raise EvalCrashed(f"the evaluation process exited with status {proc.returncode} while {stage}",
                                  stage=stage, signal_name=None)
            what = _SIGNAL_WHAT.get(signal.Signals[sig] if sig.startswith("SIG") else None,  # type: ignore[arg-type]
                                    "llama.cpp's process died")
            detail = _assert_line(stderr_file.name) if sig == "SIGABRT" else None
            raise EvalCrashed(f"{what} while {stage} ({sig}{': ' + detail if detail else ''})",
                              stage=stage, signal_name=sig)
        finally:
            conn.close()
            if proc.poll() is None:  # interrupted, or an error we raised: the child holds nothing worth saving
                proc.kill()
            proc.wait()
