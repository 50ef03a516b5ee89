"""Re-quantization as a streaming step of the writer: llama.cpp's decisions, llama.cpp's kernels.

`assign_types` turns an output model into a quantized one: every tensor gets the type that
llama.cpp's quantizer would give it (asked of llama.cpp itself, `llama_quant.target_types`), the
tensors are put in the quantizer's own order and the metadata gets the keys it sets, so the file
is the one `llama-quantize` would write. `QuantEmitter` then produces each tensor's bytes in
bounded row chunks with ggml's kernels, and computes each distinct (source tensor, scale, type)
once: a duplicated layer is copied from the first copy already in the output file.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Callable, Literal, Mapping

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from gguf import Keys

from ..errors import QuantizeError
from ..format.gguf_header import tensor_nbytes
from ..format.source import KV, SourceModel, TensorReader, row_bytes
from ..format.tensor_data import FirstCopies, scaled_rows
from ..planning.output import OutputModel, OutTensor
from ..planning.plan import Plan
from . import ggml
from .llama_quant import KvValue, Mixture, llama_tensor_order, override_kvs, target_types
from .quant_types import QuantType

GGML_QNT_VERSION = 2
F32_CHUNK_BYTES = 64 * 1024 * 1024  # rows read and converted per slab (as float32); bounds memory
BLOCK_F32_BYTES = 1024 * 1024  # rows per worker job: their floats stay in the core's cache

MixtureMode = Literal["target", "source"]


def _info(t: OutTensor) -> SimpleNamespace:
    return SimpleNamespace(name=t.name, shape=t.shape, ggml_type=int(t.source.ggml_type))


def _source_mixture_types(out: OutputModel, plan: Plan, models: dict[str, SourceModel], qtype: QuantType,
                          imatrix: bool, mixture: Mixture | None,
                          kv_overrides: Mapping[str, KvValue] | None = None) -> dict[str, int]:
    """Each output tensor gets the type its source tensor gets when its own model is quantized."""
    per_model = {name: target_types(list(m.tensors.values()), m.kvs.values(), qtype, imatrix=imatrix, mixture=mixture,
                                    kv_overrides=kv_overrides)
                 for name, m in models.items() if name in plan.models}
    return {t.name: per_model[plan.model_of(t.name)][t.source.name] for t in out.tensors}


def assign_types(out: OutputModel, qtype: QuantType, *, imatrix_kvs: list[KV] | None = None, has_imatrix: bool = False,
                 mode: MixtureMode = "target", plan: Plan | None = None, models: dict[str, SourceModel] | None = None,
                 mixture: Mixture | None = None, kv_overrides: Mapping[str, KvValue] | None = None,
                 keep_split: bool = False) -> OutputModel:
    """The quantized output model: types, llama.cpp's tensor order and the metadata it writes.

    `kv_overrides` (--override-kv) go to llama.cpp's dry run and into the metadata as
    llama_model_quantize writes them (after file_type, before the imatrix keys, which
    llama-quantize passes as overrides too). `keep_split` keeps `out`'s tensor order (the
    input's file order, shard by shard), as llama.cpp does for --keep-split."""
    if qtype.only_copy:
        raise QuantizeError("--type COPY does not quantize; use `upscale` to copy tensors unchanged")
    if mode == "target":
        types = target_types([_info(t) for t in out.tensors], out.kvs, qtype, imatrix=has_imatrix, mixture=mixture,
                             kv_overrides=kv_overrides, keep_split=keep_split)
    else:
        if plan is None or models is None:
            raise QuantizeError("--mixture source needs an upscale plan")
        types = _source_mixture_types(out, plan, models, qtype, has_imatrix, mixture, kv_overrides)
    by_name = {t.name: t for t in out.tensors}
    tensors = []
    for name in ([t.name for t in out.tensors] if keep_split else llama_tensor_order(by_name)):
        t = by_name[name]
        typ = Q(types[name])
        tensors.append(replace(t, ggml_type=typ, n_bytes=tensor_nbytes(int(typ), t.shape)))
    # llama.cpp copies the metadata, then *re-sets* these keys, which moves them to the end
    kvs = [kv for kv in out.kvs if kv.key not in (Keys.General.QUANTIZATION_VERSION, Keys.General.FILE_TYPE)]
    kvs += [KV(Keys.General.QUANTIZATION_VERSION, GGML_QNT_VERSION, T.UINT32),
            KV(Keys.General.FILE_TYPE, qtype.ftype, T.UINT32)]
    for kv in override_kvs(kv_overrides or {}) + list(imatrix_kvs or []):
        kvs = [k for k in kvs if k.key != kv.key] + [kv]
    return replace(out, tensors=tensors, kvs=kvs)


def quantized_size(out: OutputModel, type_name: str) -> int:
    """Exact tensor bytes of `out` quantized to `type_name` (llama.cpp's own per-tensor choices)."""
    from .quant_types import parse_quant_type
    qtype = parse_quant_type(type_name)
    types = target_types([_info(t) for t in out.tensors], out.kvs, qtype)
    return sum(tensor_nbytes(types[t.name], t.shape) for t in out.tensors)


@dataclass
class QuantStats:
    quantized: int = 0
    copied: int = 0
    reused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds_quantizing: float = 0.0
    lines: list[str] = field(default_factory=list)


class QuantEmitter:
    """Produces output tensor bytes for the writer: copy, or dequantize -> scale -> quantize, once per content."""

    def __init__(self, reader: TensorReader, *, imatrix: dict[str, np.ndarray] | None, n_threads: int,
                 imatrix_names: Callable[[OutTensor], str] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.reader = reader
        self.imatrix = imatrix or {}
        self.n_threads = max(1, n_threads)
        self.imatrix_name = imatrix_names or (lambda t: t.name)
        self.log = log
        self.stats = QuantStats()
        self._copies = FirstCopies()
        self._index = 0
        self.total = 0
        self._pool = ThreadPoolExecutor(self.n_threads) if self.n_threads > 1 else None

    def __call__(self, t: OutTensor, sink) -> None:
        self._index += 1
        src = t.source
        first_name = self._copies.copy_if_seen(t, sink)
        how: str
        if first_name is not None:
            self.stats.reused += 1
            how = f"same as {first_name}"
        else:
            start = sink.position()
            if t.type == src.ggml_type and t.factor == 1.0:
                sink.copy_from(self.reader.fd(src.path), src.offset, src.n_bytes)
                self.stats.copied += 1
                how = "copied"
            else:
                t0 = time.perf_counter()
                for chunk in self.quantized_chunks(t):
                    sink.write(chunk)
                self.stats.seconds_quantizing += time.perf_counter() - t0
                self.stats.quantized += 1
                how = f"quantized to {t.type.name}"
            self._copies.record(t, sink.path, start)
        self.stats.bytes_in += src.n_bytes
        self.stats.bytes_out += t.size
        if self.log is not None:
            self.log(f"[{self._index:4d}/{self.total:4d}] {t.name:<36} {src.ggml_type.name:>6} -> {t.type.name:<6} "
                     f"{src.n_bytes / 2**20:9.2f} MiB -> {t.size / 2**20:9.2f} MiB  {how}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._copies.close()

    def quantized_chunks(self, t: OutTensor):
        """Rows of `t` in its target type, a bounded slab at a time (quantization is per row, so
        slabs give the same bytes as a whole-tensor pass)."""
        src = t.source
        n_per_row = t.shape[0]
        rows_per_mat = t.shape[1] if len(t.shape) > 1 else 1
        n_rows = src.n_elements // n_per_row
        if not ggml.can_dequantize(int(src.ggml_type)):
            raise QuantizeError(f"{t.name}: cannot convert {src.ggml_type.name} tensors")
        im = self.imatrix.get(self.imatrix_name(t))
        if im is not None:
            n_mat = n_rows // rows_per_mat
            if im.size != n_per_row * n_mat:
                raise QuantizeError(f"{t.name}: importance matrix has {im.size} values, the tensor needs "
                                    f"{n_per_row * n_mat}")
            im = im.reshape(n_mat, n_per_row)
        step = max(1, F32_CHUNK_BYTES // (n_per_row * 4))
        step = min(step, rows_per_mat)  # never cross an expert matrix (its imatrix row differs)
        r = 0
        while r < n_rows:
            mat = r // rows_per_mat
            n = min(step, (mat + 1) * rows_per_mat - r)
            yield self._convert(t, r, n, im[mat] if im is not None else None)
            r += n

    def _convert(self, t: OutTensor, first_row: int, n_rows: int, im: np.ndarray | None) -> np.ndarray:
        """Rows [first_row, first_row + n_rows) of `t` in its target type.

        Each worker job reads its own block of rows, dequantizes and quantizes it, so reading,
        converting and quantizing all run in parallel and a block's floats stay in the core's
        cache (llama.cpp reads a slab, then dequantizes it, then quantizes it, in turn)."""
        src = t.source
        src_type, dst_type, n_per_row = src.ggml_type, int(t.type), t.shape[0]
        src_row, dst_row = row_bytes(src_type, n_per_row), ggml.row_size(dst_type, n_per_row)
        out = np.empty(n_rows * dst_row, np.uint8)
        block = max(1, BLOCK_F32_BYTES // (n_per_row * 4))
        self.reader.fd(src.path)  # open it here, not racing in the workers

        def job(r0: int) -> None:
            n = min(block, n_rows - r0)
            # the two-step path stores a scaled tensor in its own type first (zero as zero bytes)
            if t.factor == 0.0:
                raw = bytearray(n * src_row)
            else:
                raw = self.reader.read(src, (first_row + r0) * src_row, n * src_row)
                if t.factor != 1.0:
                    raw = bytearray(scaled_rows(raw, src_type, n_per_row, t.factor, t.dtype, t.out_dtype))
            f32 = ggml.dequantize_rows(int(src_type), np.frombuffer(raw, np.uint8), n_per_row)
            ggml.quantize_rows(dst_type, f32, im, out=out[r0 * dst_row:(r0 + n) * dst_row])

        starts = range(0, n_rows, block)
        if self._pool is None or len(starts) == 1:
            for r0 in starts:
                job(r0)
        else:
            for _ in self._pool.map(job, starts):
                pass
        return out
