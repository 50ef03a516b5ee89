"""How much each layer (and each span of layers) changes the hidden state, measured in llama.cpp.

The measure is the angular distance between a layer's input and output hidden state, per
token, ``arccos(cos(h_in, h_out)) / pi`` (0: same direction, 1: opposite), averaged over
the tokens of a text: ShortGPT's "block influence" (Men et al. 2024, who use 1 - cos) in
the normalised form Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper
Layers") use over spans of n consecutive layers. A layer that barely turns the hidden
state is one a model can lose, or repeat, at the least cost; it says nothing about what the
layer contributes to quality, and is a first guide for where to put a frankenmerge's seams.

The hidden states are read where llama.cpp computes them, through its graph evaluation
callback (``cb_eval`` in the context parameters): the callback asks for the tensors named
``l_out-N`` (the output of layer N, llama.cpp's name in every transformer graph) and for the
graph's first node of layer 0 (its input norm, or for a post-norm model its first
projection), whose hidden-state input is layer 0's input, and reads each one once computed.
Nothing is kept but a ring of the last 9 states of the current batch (enough for spans of 8)
and running sums, so memory is bounded by ``9 x batch x n_embd`` floats whatever the text's
length or the model's depth. The text is cut into windows of ``n_ctx`` tokens decoded from
an empty context; the first token of each window is left out (its hidden state is the
attention sink's, orders of magnitude larger than the rest).

Like every evaluation, this runs in a child process (:mod:`upscaler.checks.eval_worker`) on
plain CPU buffers (:mod:`upscaler.checks.llama_params`).
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import SmokeError
from ..quant import llama_log
from .eval_worker import Reporter, run_isolated
from .llama_params import model_params, physical_cores
from .llama_session import Decoder, checked_model_path, tokenize

__all__ = ["SPANS", "LayerInfluence", "SpanDistances", "measure_layers", "windows_of"]

SPANS = (1, 2, 4, 8)  # span lengths measured; 1 is the per-layer figure
_RING = max(SPANS) + 1

Progress = Callable[[str, int, int], None]


@dataclass
class SpanDistances:
    """Mean angular distance over spans of `n` layers: entry i is layers i..i+n-1."""

    n: int
    mean: list[float]
    uncertainty: list[float]  # standard error of each mean over the tokens

    def least(self) -> int:
        """The first layer of the span that changes the hidden state least."""
        return int(np.argmin(self.mean))

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "spans": [{"first": i, "last": i + self.n - 1, "distance": m, "uncertainty": u}
                                       for i, (m, u) in enumerate(zip(self.mean, self.uncertainty))],
                "least": {"first": self.least(), "last": self.least() + self.n - 1,
                          "distance": self.mean[self.least()]}}


@dataclass
class LayerInfluence:
    """The per-layer and per-span distances of one model on one text."""

    path: str
    arch: str
    n_layer: int
    n_embd: int
    n_ctx: int
    n_tokens: int  # tokens measured (first token of each window left out)
    n_tokens_text: int
    spans: dict[int, SpanDistances] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def per_layer(self) -> SpanDistances:
        return self.spans[1]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.path, "arch": self.arch, "n_layer": self.n_layer, "n_embd": self.n_embd,
                "n_ctx": self.n_ctx, "n_tokens_measured": self.n_tokens, "n_tokens_text": self.n_tokens_text,
                "measure": "angular distance arccos(cos(input, output)) / pi, mean over tokens",
                "layers": [{"layer": i, "distance": m, "uncertainty": u} for i, (m, u) in
                           enumerate(zip(self.per_layer.mean, self.per_layer.uncertainty))],
                "spans": {str(n): s.to_dict() for n, s in self.spans.items() if n > 1},
                "seconds": round(self.seconds, 3)}


def windows_of(n_tokens: int, n_ctx: int, max_tokens: int) -> list[tuple[int, int]]:
    """Disjoint windows (begin, end) of at most `n_ctx` tokens, until `max_tokens` are measured
    (each window measures all its tokens but the first)."""
    if n_tokens < 2:
        raise SmokeError(f"text is too short to measure: {n_tokens} token(s)")
    out, begin, measured = [], 0, 0
    while begin < n_tokens - 1 and measured < max_tokens:
        end = min(begin + n_ctx, n_tokens, begin + 1 + (max_tokens - measured))
        out.append((begin, end))
        measured += end - begin - 1
        begin = end
    return out


@dataclass
class _Request:
    path: str
    text: str
    n_ctx: int
    max_tokens: int
    n_threads: int | None
    verbose: bool


def measure_layers(path: str | Path, *, text: str, n_ctx: int = 512, max_tokens: int = 1024,
                   n_threads: int | None = None, progress: Progress | None = None,
                   on_stage: Callable[[str], None] | None = None) -> LayerInfluence:
    """Measure `path` on `text` in a child process (see the module doc)."""
    if not text.strip():
        raise SmokeError("the text is empty")
    model = checked_model_path(path, "model", text)
    req = _Request(str(model), text, n_ctx, max_tokens, n_threads, llama_log.is_verbose())
    result: LayerInfluence = run_isolated("upscaler.checks.layer_influence:_measure", req, on_stage=on_stage,
                                          on_progress=progress)
    return result


# --------------------------------------------------------------------------- child side


class _Tensor(ctypes.Structure):
    """``struct ggml_tensor`` up to its name (ggml.h of the pinned llama.cpp); checked at load."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


class _Ggml:
    """The few ggml tensor accessors the callback needs, from the library llama.cpp uses."""

    def __init__(self) -> None:
        from ..quant.ggml import lib_dir

        lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
        for name, argtypes, restype in (
                ("ggml_get_name", [ctypes.c_void_p], ctypes.c_void_p),
                ("ggml_nrows", [ctypes.c_void_p], ctypes.c_int64),
                ("ggml_is_contiguous", [ctypes.c_void_p], ctypes.c_bool),
                ("ggml_backend_tensor_get", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
                 None)):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        self.lib = lib
        self.checked = False

    def tensor(self, t: int) -> _Tensor:
        """The struct at `t`, after checking once that our layout puts `name` where ggml does."""
        if not self.checked:
            if self.lib.ggml_get_name(t) != t + _Tensor.name.offset:
                raise SmokeError("this ggml build lays out its tensors differently from llama-cpp-python "
                                 "0.3.36's: `layers` cannot read hidden states")
            self.checked = True
        return _Tensor.from_address(t)

    def name(self, t: int) -> bytes:
        return self.tensor(t).name

    def rows(self, t: int, n_cols: int) -> np.ndarray:
        """A computed tensor as (rows, n_cols) float32; anything else is refused."""
        st = self.tensor(t)
        if st.type != 0 or st.ne[0] != n_cols or not self.lib.ggml_is_contiguous(t):
            raise SmokeError(f"hidden state {st.name.decode()} is not a contiguous F32 tensor of rows of "
                             f"{n_cols}: this architecture is not supported by `layers`")
        out = np.empty((self.lib.ggml_nrows(t), n_cols), dtype=np.float32)
        self.lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
        return out

    def hidden_input(self, t: int, n_cols: int, n_rows: int) -> int:
        """The input of node `t` that is a hidden state (n_cols x n_rows, F32, not a weight), or 0.

        A pre-norm layer starts with the norm of its input (src[0]); a post-norm one (OLMo 2)
        with a projection, whose src[0] is the weight and src[1] the input."""
        for src in self.tensor(t).src:
            if not src:
                break
            st = self.tensor(src)
            if (st.type == 0 and st.ne[0] == n_cols and st.ne[1] == n_rows and st.ne[2] == st.ne[3] == 1
                    and not st.name.endswith(b".weight") and self.lib.ggml_is_contiguous(src)):
                return int(src)
        return 0


class _Accumulator:
    """Running sums of per-token distances for every span; the ring of recent unit states."""

    def __init__(self, n_layer: int) -> None:
        self.n_layer = n_layer
        self.spans = [n for n in SPANS if n <= n_layer]
        self.sums = {n: np.zeros(n_layer - n + 1) for n in self.spans}
        self.sq = {n: np.zeros(n_layer - n + 1) for n in self.spans}
        self.count = 0
        self.ring: dict[int, np.ndarray] = {}
        self.skip_first = False
        self.n_rows = 0
        self.seen: set[int] = set()

    def start_batch(self, n_rows: int, skip_first: bool) -> None:
        self.ring.clear()
        self.seen.clear()
        self.n_rows = n_rows
        self.skip_first = skip_first

    def add_state(self, k: int, h: np.ndarray) -> None:
        """State k: the input of layer k (k = 0 the embeddings, k >= 1 the output of layer k - 1)."""
        if self.skip_first:
            h = h[1:]
        norm = np.linalg.norm(h, axis=1, keepdims=True)
        unit = h / np.maximum(norm, np.finfo(np.float32).tiny)
        self.seen.add(k)
        for n in self.spans:
            prev = self.ring.get((k - n) % _RING) if k - n >= 0 and (k - n) in self.seen else None
            if prev is None:
                continue
            if prev.shape != unit.shape:
                raise SmokeError(f"hidden states of layers {k - n} and {k - 1} have different shapes "
                                 f"{prev.shape} and {unit.shape}")
            cos = np.clip(np.einsum("ij,ij->i", prev, unit, dtype=np.float64), -1.0, 1.0)
            dist = np.arccos(cos) / math.pi
            self.sums[n][k - n] += dist.sum()
            self.sq[n][k - n] += np.square(dist).sum()
        self.ring[k % _RING] = unit

    def end_batch(self, n_rows: int) -> None:
        missing = sorted(set(range(self.n_layer + 1)) - self.seen)
        if missing:
            names = ["layer 0's input" if k == 0 else f"l_out-{k - 1}" for k in missing[:3]]
            raise SmokeError(f"llama.cpp's graph for this model names no hidden state {', '.join(names)}"
                             f"{' …' if len(missing) > 3 else ''}: its architecture is not supported by `layers`")
        self.count += n_rows - (1 if self.skip_first else 0)

    def result(self) -> dict[int, SpanDistances]:
        out = {}
        c = max(1, self.count)
        for n in self.spans:
            mean = self.sums[n] / c
            var = np.maximum(self.sq[n] / c - np.square(mean), 0.0)
            unc = np.sqrt(var / max(1, c - 1))
            out[n] = SpanDistances(n, [float(x) for x in mean], [float(x) for x in unc])
        return out


@dataclass
class _Session:
    """What :class:`~upscaler.checks.llama_session.Decoder` needs: a model, a context, a batch size."""

    model: Any
    ctx: Any
    n_batch: int


def _measure(req: _Request, rep: Reporter) -> LayerInfluence:
    import llama_cpp

    t0 = time.perf_counter()
    llama_log.install(req.verbose)
    path = Path(req.path)
    rep.stage(f"loading {path.name}")
    with llama_log.capture() as lines:
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), model_params())
    if not model:
        raise SmokeError(f"model {path} failed to load: {llama_log.reason(lines) or 'unknown reason'}")
    ggml = _Ggml()
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    acc = _Accumulator(n_layer)
    wanted = {f"l_out-{i}".encode(): i + 1 for i in range(n_layer)}
    failure: list[BaseException] = []
    first_of_layer0: list[int] = []  # the graph's first node of layer 0: its input is layer 0's input

    def callback(t: int, ask: bool, _user: Any) -> bool:
        try:
            name = ggml.name(t)
            k = wanted.get(name)
            if ask:
                if k is None and not first_of_layer0 and name.endswith(b"-0"):
                    first_of_layer0.append(t)
                    return True
                return k is not None
            if failure:
                return True
            if first_of_layer0 and t == first_of_layer0[0] and 0 not in acc.seen:
                src = ggml.hidden_input(t, n_embd, acc.n_rows)
                if not src:
                    raise SmokeError(f"llama.cpp's first node of layer 0 ({name.decode()}) has no hidden-state "
                                     "input: this architecture is not supported by `layers`")
                acc.add_state(0, ggml.rows(src, n_embd))
            if k is not None:
                acc.add_state(k, ggml.rows(t, n_embd))
        except BaseException as e:  # an exception cannot cross into C: keep it, raise after the decode
            failure.append(e)
        return True  # False would stop llama.cpp's computation of the graph

    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)
    piece = max(8, min(req.n_ctx, 256))  # one ubatch per decode; bounds llama.cpp's logits buffer
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = req.n_ctx
    cparams.n_batch = cparams.n_ubatch = piece
    threads = req.n_threads or physical_cores()
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.cb_eval = cb
    cparams.cb_eval_user_data = None
    try:
        with llama_log.capture() as lines:
            ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise SmokeError(f"model {path}: llama.cpp could not create a context: "
                             f"{llama_log.reason(lines) or 'unknown reason'}")
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            tokens = tokenize(vocab, req.text)
            windows = windows_of(len(tokens), req.n_ctx, req.max_tokens)
            total = sum(e - b - 1 for b, e in windows)
            decoder = Decoder(_Session(model, ctx, piece), f"model {path.name}")
            rep.stage(f"measuring {path.name}")
            done = 0
            try:
                for begin, end in windows:
                    decoder.clear()
                    for p0 in range(begin, end, piece):
                        chunk = tokens[p0:min(end, p0 + piece)]
                        acc.start_batch(len(chunk), skip_first=p0 == begin)
                        first_of_layer0.clear()
                        decoder.decode(chunk, p0 - begin, [True] * len(chunk))
                        if failure:
                            raise failure[0]
                        acc.end_batch(len(chunk))
                        done += len(chunk) - (1 if p0 == begin else 0)
                        rep.progress("layers", done, total)
            finally:
                decoder.close()
            arch = _arch_of(model)
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    return LayerInfluence(str(path), arch, n_layer, n_embd, req.n_ctx, acc.count, len(tokens), acc.result(),
                          time.perf_counter() - t0)


def _arch_of(model: Any) -> str:
    import llama_cpp

    buf = ctypes.create_string_buffer(128)
    n = llama_cpp.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else "?"
