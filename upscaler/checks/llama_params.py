"""The one place that decides how llama.cpp loads a model for evaluation, and how many threads it gets.

Weights go on plain CPU buffers (``use_extra_bufts = False``). By default llama.cpp repacks
weights into "extra buffer types" (AMX tiles on Sapphire Rapids Xeons, CPU_REPACK
interleaving for Q4_0/IQ4_NL/Q8_0 on AVX2/NEON), and which path a model takes depends on the
CPU it lands on. That path has crashed (SIGSEGV) decoding Q4_0/Q4_1 models with 2 threads on
AMX Xeons, and a smoke test's figures must not depend on which repack kernels a CPU happens to
have: plain buffers run the same reference kernels everywhere. Smoke tests decode a few
hundred tokens, so repacking's speed gain does not matter here.

Every evaluation goes through :func:`model_params` (the C struct) or :func:`open_llama` (the
llama-cpp-python ``Llama`` object, whose constructor does not expose the field).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["USE_EXTRA_BUFTS", "model_params", "open_llama", "physical_cores"]

USE_EXTRA_BUFTS = False  # see the module doc: plain CPU buffers, the same kernels on every CPU

_lock = threading.Lock()


def model_params(**fields: Any) -> Any:
    """``llama_model_params``: llama.cpp's defaults, weights on plain CPU buffers, then ``fields``."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = USE_EXTRA_BUFTS
    for name, value in fields.items():
        setattr(params, name, value)
    return params


def open_llama(path: str | Path, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path=path, **kwargs)`` loaded with :func:`model_params`.

    ``Llama.__init__`` builds its ``llama_model_params`` from ``llama_model_default_params()``
    and offers no argument for ``use_extra_bufts``; during the constructor (and only then) that
    function is swapped for ours, so the struct it builds starts from :func:`model_params`.
    The result is checked on the object, so a llama-cpp-python that builds its params another
    way fails loudly here instead of silently repacking.
    """
    import llama_cpp
    import llama_cpp.llama as llama_module

    lib = llama_module.llama_cpp  # the module whose attribute Llama.__init__ looks up
    with _lock:
        original = lib.llama_model_default_params

        def _defaults() -> Any:
            params = original()
            params.use_extra_bufts = USE_EXTRA_BUFTS
            return params

        lib.llama_model_default_params = _defaults
        try:
            llm = llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            lib.llama_model_default_params = original
    if bool(llm.model_params.use_extra_bufts) != USE_EXTRA_BUFTS:  # pragma: no cover - library changed
        llm.close()
        raise RuntimeError("llama-cpp-python ignored use_extra_bufts; refusing to evaluate on repacked weights")
    return llm


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once).

    llama.cpp's decode is memory-bound and spins its threads; two threads on the two
    hyper-threads of one core, or more threads than cores on a busy machine, make it slower,
    not faster. Reads the CPU topology from /sys for the CPUs in our affinity mask; falls back
    to the affinity mask's size.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, min(len(cpus), len(cores)))
