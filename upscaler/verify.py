"""`gguf-upscale verify`: check an upscaled GGUF against the recipe recorded in it and its sources.

What is checked, and how:

* The file itself: every shard's header parses (llama.cpp's rules), split keys agree across
  shards (`split.no`, `split.count`, `split.tensors.count`, their types), padding between
  tensors is zero and nothing trails the last tensor.
* Metadata against the tensors: `{arch}.block_count` equals the number of distinct `blk.N`
  indices and the length of the recorded layer map, every index 0..n-1 is present, per-layer
  arrays have one entry per layer, the recorded recipe re-evaluated gives the recorded layer map.
* With the sources (`--source`, `--model NAME=PATH`, or the recorded `upscale.source_files`
  found next to the output or in the current folder): the plan is rebuilt from the recorded
  recipe exactly as `upscale`/`run` build it, and
  - every metadata key is compared (value and GGUF type) with what the upscaler writes for
    those sources (`general.name`, `upscale.tool` and the quantizer's own keys excepted);
  - the tensor set is compared (missing, unexpected, shapes);
  - every tensor's bytes are compared with their recomputation: a copy with the source bytes, a
    zero-scaled tensor with zero bytes, a scaled tensor with `tensor_data.scaled_rows`, a
    re-quantized tensor (`run`, `quantize`) with the quantizer's own dequantize -> scale ->
    quantize (ggml's kernels: exact and deterministic). Both sides are hashed per 16 MiB piece
    (sha256), so memory stays bounded by a piece whatever the tensor size, and each distinct
    expected content is computed once however many layers copy it. A mismatch is located to
    the byte by recomputing just that piece.
* Without sources: everything above that needs no source: metadata consistency, zero-scaled
  tensors hold zeros (zero bytes, or the row ggml's quantizer makes of zeros), duplicated
  layers with identical recipes (same source layer, scale and type) are byte-identical to each
  other, and every tensor's values are valid (ggml_validate_row_data: no NaN/inf).

Quantized outputs made with an importance matrix can be recomputed only with that matrix
(`imatrix=`); without it the tensors the matrix changed are checked for type, shape, valid
values and equality with their duplicated copies, and the report says how many.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from gguf.constants import GGML_QUANT_SIZES
from pydantic import ValidationError

from . import archs
from .errors import RecipeError, SourceError, UpscaleError
from .gguf_header import Header, check_key_types, read_header
from .metadata import K_FILES, K_LAYER_INDEX, K_LAYER_MODEL, K_MODELS, K_RECIPE, K_SOURCE_BLOCKS, K_VERSION
from .output import OutTensor, build_output
from .plan import OutputLayer, Plan, build_plan
from .recipe import MergeConfig, Recipe, normalize_config
from .report import human_bytes
from .resolve import parse_model_options
from .source import BLOCK_RE, KV, SPLIT_KEYS, SourceModel, SourceTensor, TensorReader, resolve_model_path, shard_paths

CHUNK = 16 * 1024 * 1024
MAX_PROBLEMS = 50  # problems kept in the report; the rest are counted
IMATRIX_PREFIX = "quantize.imatrix."
QUANTIZER_KEYS = ("general.quantization_version", "general.file_type")
PAD_KEY = "upscale.padding"  # the writer's filler that aligns a shard's data (meaningless bytes)
# ggml's quantizers for these ignore an importance matrix: recomputable without it
IMATRIX_IGNORED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)

Consumer = Callable[[Any], None]
Producer = Callable[[Consumer], None]


# --------------------------------------------------------------------------- the report


@dataclass
class VerifyReport:
    """What `verify` found. `ok` is False when anything disagrees; `problems` has one line each."""

    path: str
    files: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # model name -> path; empty: checked without sources
    quantized: bool | None = None  # None: not known (no sources to compare types with)
    problems: list[str] = field(default_factory=list)
    problems_total: int = 0
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("tensors", "bytes", "exact", "copy", "zero", "scale", "quantize", "duplicates", "values_only",
         "not_verified", "metadata_keys", "layers"), 0))

    @property
    def ok(self) -> bool:
        return self.problems_total == 0

    @property
    def problems_not_shown(self) -> int:
        return self.problems_total - len(self.problems)

    @property
    def mode(self) -> str:
        return "sources" if self.sources else "no-sources"

    def problem(self, msg: str) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(msg)

    @property
    def full(self) -> bool:
        """Enough problems shown: skip the costly byte-locating for further ones."""
        return len(self.problems) >= MAX_PROBLEMS

    def count(self, key: str, n: int = 1) -> None:
        self.checked[key] = self.checked.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "path": self.path, "files": self.files, "mode": self.mode, "sources": self.sources,
                "quantized": self.quantized, "problems": self.problems,
                "problems_not_shown": self.problems_not_shown, "notes": self.notes, "checked": self.checked}


# --------------------------------------------------------------------------- streaming digests


def _view(data: Any) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class _Digests:
    """sha256 of each `chunk`-byte piece of a byte stream fed in arbitrary pieces."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.digests: list[bytes] = []
        self.total = 0
        self._h = hashlib.sha256()
        self._left = chunk

    def __call__(self, data: Any) -> None:
        mv = _view(data)
        self.total += len(mv)
        while len(mv):
            n = min(len(mv), self._left)
            self._h.update(mv[:n])
            mv = mv[n:]
            self._left -= n
            if self._left == 0:
                self.digests.append(self._h.digest())
                self._h, self._left = hashlib.sha256(), self.chunk

    def result(self) -> tuple[int, tuple[bytes, ...]]:
        tail = [self._h.digest()] if self._left != self.chunk else []
        return self.total, tuple(self.digests + tail)


class _Stop(Exception):
    pass


class _Window:
    """Keep bytes [start, end) of a stream; stop the producer once they are in."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.pos = start, end, 0
        self.data = bytearray()

    def __call__(self, data: Any) -> None:
        mv = _view(data)
        a, b = max(self.start, self.pos), min(self.end, self.pos + len(mv))
        if a < b:
            self.data += mv[a - self.pos:b - self.pos]
        self.pos += len(mv)
        if self.pos >= self.end:
            raise _Stop


def _window(produce: Producer, start: int, end: int) -> bytes:
    w = _Window(start, end)
    try:
        produce(w)
    except _Stop:
        pass
    return bytes(w.data)


class _Feed:
    """`tensor_data.emit`'s sink, feeding a consumer instead of a file."""

    def __init__(self, consume: Consumer) -> None:
        self.consume = consume

    def write(self, data: Any) -> None:
        self.consume(data)

    def copy_from(self, src_fd: int, offset: int, size: int) -> None:
        buf = bytearray(min(size, CHUNK))
        view = memoryview(buf)
        done = 0
        while done < size:
            n = os.preadv(src_fd, [view[:min(len(buf), size - done)]], offset + done)
            if n == 0:
                raise SourceError("a source file ended early while reading a tensor (truncated?)")
            self.consume(view[:n])
            done += n


def _chunk_for(typ: Q) -> int:
    """Pieces of whole ggml blocks, so each piece can be validated on its own."""
    size = GGML_QUANT_SIZES[typ][1]
    return CHUNK - CHUNK % size


def _read_tensor(reader: TensorReader, t: SourceTensor, consume: Consumer, chunk: int) -> None:
    for start in range(0, t.n_bytes, chunk):
        consume(reader.read(t, start, min(chunk, t.n_bytes - start)))


_NP_FLOATS = {Q.F32: np.float32, Q.F16: np.float16}


def _valid_values(typ: Q, data: Any) -> bool:
    """No NaN/inf values (floats) or block scales (quantized types), as ggml_validate_row_data checks."""
    if typ in _NP_FLOATS:
        return bool(np.isfinite(np.frombuffer(data, _NP_FLOATS[typ])).all())
    if typ == Q.BF16:
        return not bool(((np.frombuffer(data, np.uint16) & 0x7F80) == 0x7F80).any())
    from . import ggml
    # ggml prints its finding to stderr itself; keep the terminal to our one-line problems
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            try:
                return ggml.validate_rows(int(typ), np.frombuffer(data, np.uint8))
            except UpscaleError:
                return True  # a type ggml cannot validate
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_difference(a: bytes, b: bytes) -> tuple[int, int]:
    """(index of the first differing byte, number of differing bytes) of two equal-length pieces."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n))
    if len(diff) == 0:
        return n, abs(len(a) - len(b))
    return int(diff[0]), int(len(diff)) + abs(len(a) - len(b))


# --------------------------------------------------------------------------- the output file


@dataclass
class _OutFile:
    paths: list[Path]
    headers: list[Header]
    kvs: dict[str, KV]
    tensors: dict[str, SourceTensor]  # file order, shard by shard

    @property
    def arch(self) -> str | None:
        kv = self.kvs.get("general.architecture")
        return str(kv.value) if kv is not None else None

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value


def _open_output(path: str | Path, report: VerifyReport) -> _OutFile | None:
    first = resolve_model_path(path)  # a missing file is a usage error, raised
    report.path = str(first)
    try:
        paths = shard_paths(first)
    except SourceError as e:
        report.problem(str(e))
        return None
    report.files = [str(p) for p in paths]
    headers: list[Header] = []
    for p in paths:
        try:
            headers.append(read_header(p))
        except SourceError as e:
            report.problem(str(e))
            return None
    _check_split(paths, headers, report)
    try:
        check_key_types(paths[0], headers[0].kvs)
    except SourceError as e:
        report.problem(str(e))
    kvs = {kv.key: KV(kv.key, kv.value, kv.vtype, kv.sub_type) for kv in headers[0].kvs if kv.key not in SPLIT_KEYS}
    tensors: dict[str, SourceTensor] = {}
    for p, h in zip(paths, headers):
        for t in h.tensors:
            if t.name in tensors:
                report.problem(f"{p.name}: tensor {t.name} also appears in another shard")
                continue
            tensors[t.name] = SourceTensor(t.name, t.ggml_type, t.shape, t.n_bytes, p, t.offset)
    return _OutFile(paths, headers, kvs, tensors)


def _check_split(paths: list[Path], headers: list[Header], report: VerifyReport) -> None:
    n = len(paths)
    total = sum(len(h.tensors) for h in headers)
    for i, (p, h) in enumerate(zip(paths, headers)):
        kv = {k.key: k for k in h.kvs if k.key in SPLIT_KEYS}
        if n == 1:
            count, no = kv.get("split.count"), kv.get("split.no")
            if count is not None and count.value != 1:
                report.problem(f"{p.name}: split.count is {count.value}, but the file is not one of a shard set")
            if no is not None and no.value != 0:
                report.problem(f"{p.name}: split.no is {no.value}, but the file is not one of a shard set")
            continue
        expect = {"split.no": (i, T.UINT16, f"it is file {i + 1} of the set"),
                  "split.count": (n, T.UINT16, f"the set has {n} files"),
                  "split.tensors.count": (total, T.INT32, f"the shards hold {total} tensors")}
        for key, (value, vtype, why) in expect.items():
            got = kv.get(key)
            if got is None:
                report.problem(f"{p.name}: {key} is missing (expected {value}: {why})")
            elif got.vtype != vtype:
                report.problem(f"{p.name}: {key} is stored as {got.vtype.name}, expected {vtype.name}")
            elif got.value != value:
                report.problem(f"{p.name}: {key} is {got.value}, expected {value} ({why})")


def _check_padding(out: _OutFile, reader: TensorReader, report: VerifyReport) -> None:
    """Bytes between tensors are zero padding; nothing but padding after the last tensor."""
    for p, h in zip(out.paths, out.headers):
        fd = reader.fd(p)
        for k, t in enumerate(h.tensors):
            end = t.offset + t.n_bytes
            padded = -(-end // h.alignment) * h.alignment
            if k + 1 < len(h.tensors):
                gap_end = h.tensors[k + 1].offset
            else:
                gap_end = min(padded, h.file_size)
                if h.file_size > padded:
                    report.problem(f"{p.name}: {h.file_size - padded} unexpected bytes after the last tensor "
                                   f"({t.name})")
            for start in range(end, gap_end, 1 << 20):
                gap = os.pread(fd, min(1 << 20, gap_end - start), start)
                if any(gap):
                    pos = start - end + next(i for i, b in enumerate(gap) if b)
                    report.problem(f"{p.name}: padding after tensor {t.name} is not zero "
                                   f"(byte {pos} after its end)")
                    break


# --------------------------------------------------------------------------- recipe and lineage


@dataclass
class _Lineage:
    names: list[str]
    files: list[str]
    block_counts: list[int]
    layer_model: list[int]
    layer_index: list[int]
    recipe_text: str | None

    def layer(self, i: int) -> tuple[str, int] | None:
        if i >= len(self.layer_model) or i >= len(self.layer_index):
            return None
        m = self.layer_model[i]
        return (self.names[m] if m < len(self.names) else f"#{m}", self.layer_index[i])


def _read_lineage(out: _OutFile, report: VerifyReport) -> _Lineage:
    if K_LAYER_INDEX not in out.kvs and K_RECIPE not in out.kvs:
        raise UpscaleError(f"{out.paths[0]}: no upscale recipe recorded ({K_RECIPE}, {K_LAYER_INDEX}); "
                           "verify checks files written by gguf-upscale upscale/run")

    def items(key: str, kind: type) -> list:
        value = out.get(key)
        ok = isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        if not ok:
            report.problem(f"metadata {key} is " + ("missing" if value is None else "not a list of "
                                                    + ("strings" if kind is str else "whole numbers")))
            return []
        return value

    return _Lineage(names=items(K_MODELS, str), files=items(K_FILES, str), block_counts=items(K_SOURCE_BLOCKS, int),
                    layer_model=items(K_LAYER_MODEL, int), layer_index=items(K_LAYER_INDEX, int),
                    recipe_text=out.get(K_RECIPE))


def _recorded_recipe(lin: _Lineage) -> Recipe:
    """The recorded YAML as a Recipe. A `models:` recipe is recorded with layer_range [0, -1]
    ("the whole model"), which the slices form rejects; it is filled in from the recorded depth."""
    from .recipe import _NoAliasBombLoader
    text = lin.recipe_text
    if not isinstance(text, str):
        raise RecipeError(f"{K_RECIPE} is missing or not a string")
    try:
        doc = yaml.load(text, Loader=_NoAliasBombLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        raise RecipeError(f"{K_RECIPE}: malformed YAML ({str(e).splitlines()[0]})") from None
    counts = dict(zip(lin.names, lin.block_counts))
    if isinstance(doc, dict) and isinstance(doc.get("slices"), list):
        for s in doc["slices"]:
            for src in (s.get("sources") or []) if isinstance(s, dict) else []:
                if isinstance(src, dict) and list(src.get("layer_range") or []) == [0, -1] and src.get("model") in counts:
                    src["layer_range"] = [0, counts[src["model"]]]
    if not isinstance(doc, dict):
        raise RecipeError(f"{K_RECIPE} is not a recipe mapping")
    try:
        cfg = MergeConfig.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(f"{K_RECIPE}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return normalize_config(cfg, K_RECIPE)


@dataclass(frozen=True)
class _RecTensor:
    """A tensor as the output shows it, standing in for its source tensor (no-sources mode)."""

    name: str
    suffix: str
    shape: tuple[int, ...]


class _RecordedModel:
    """What the recipe evaluation needs of a source model, rebuilt from the output alone."""

    def __init__(self, name: str, arch: str, block_count: int, blocks: dict[int, dict[str, _RecTensor]],
                 non_block: list[_RecTensor]) -> None:
        self.name, self.arch, self.block_count = name, arch, block_count
        self.blocks, self.non_block_tensors = blocks, non_block


def _recipe_layers(recipe: Recipe, lin: _Lineage, out: _OutFile) -> tuple[list[OutputLayer], dict[str, float]]:
    """Re-evaluate the recipe without sources: output layers with their scales, and global scales.

    Mirrors plan.build_plan's loop; each source layer's tensor kinds are taken from the first
    output layer recorded as its copy.
    """
    from .plan import _global_scales, _linear_choice, _scales_for
    by_layer: dict[int, dict[str, _RecTensor]] = defaultdict(dict)
    non_block: list[_RecTensor] = []
    for t in out.tensors.values():
        m = BLOCK_RE.match(t.name)
        if m:
            by_layer[int(m.group(1))][m.group(2)] = _RecTensor(t.name, m.group(2), t.shape)
        else:
            non_block.append(_RecTensor(t.name, t.name, t.shape))
    blocks: dict[str, dict[int, dict[str, _RecTensor]]] = {n: {} for n in lin.names}
    for i in sorted(by_layer):
        src = lin.layer(i)
        if src is not None and src[0] in blocks:
            blocks[src[0]].setdefault(src[1], by_layer[i])
    counts = dict(zip(lin.names, lin.block_counts))
    arch = out.arch or ""
    models = {n: _RecordedModel(n, arch, counts.get(n, 0), blocks[n], non_block) for n in lin.names}
    for name in recipe.model_names():
        if name not in models:
            raise RecipeError(f"{K_RECIPE} names model {name!r}, which {K_MODELS} does not list")
    layers: list[OutputLayer] = []
    for si, s in enumerate(recipe.slices):
        src_idx, wf = (0, 1.0) if recipe.method == "passthrough" else _linear_choice(recipe, si, models)
        src = s.sources[src_idx]
        a, b = src.layer_range
        for layer in range(a, b):
            tensors = models[src.model].blocks.get(layer)
            if not tensors:
                raise RecipeError(f"{K_RECIPE} puts layer {layer} of {src.model!r} at output layer {len(layers)}, "
                                  "but no output layer is recorded as its copy")
            t = (layer - a) / (b - a - 1) if b - a > 1 else 1.0
            layers.append(OutputLayer(len(layers), src.model, layer, si,
                                      _scales_for(recipe, si, src_idx, tensors, layer, t, wf, arch)))
    if not layers:
        raise RecipeError(f"{K_RECIPE} produces no layers")
    plan = Plan(recipe=recipe, arch=arch, models={}, layers=layers,
                embed_model=layers[0].model if recipe.method == "linear" else recipe.slices[0].sources[0].model,
                head_model=layers[-1].model if recipe.method == "linear" else recipe.slices[-1].sources[0].model)
    _global_scales(plan, models)  # type: ignore[arg-type]
    return layers, plan.global_scales


# --------------------------------------------------------------------------- sources


def _resolve_sources(out: _OutFile, lin: _Lineage, sources: list[str], models: list[str],
                     report: VerifyReport) -> dict[str, SourceModel] | None:
    """Model name -> opened source; None when nothing was given and nothing was found."""
    names = lin.names
    if not names:
        raise UpscaleError(f"{out.paths[0]}: {K_MODELS} is missing or empty; cannot tell which sources to use")
    files = lin.files if len(lin.files) == len(names) else [""] * len(names)
    named = parse_model_options(models)
    for n in named:
        if n not in names:
            raise RecipeError(f"--model {n}: the output's recipe names no model {n!r} (it names: {', '.join(names)})")
    chosen: dict[str, str] = dict(named)
    rest = [n for n in names if n not in chosen]
    if sources:
        if len(sources) > len(rest):
            raise RecipeError(f"{len(sources)} --source given, but the recipe has {len(rest)} model(s) left to match "
                              f"({', '.join(rest) or 'none'})")
        if len(rest) == 1:
            chosen[rest[0]] = sources[0]
        else:
            by_file: dict[str, str] = {}
            for s in sources:
                base = resolve_model_path(s).name
                hits = [n for n in rest if files[names.index(n)] == base and n not in by_file]
                if hits:
                    by_file[hits[0]] = s
            if len(by_file) == len(sources):
                chosen.update(by_file)
            elif len(sources) == len(rest):
                chosen.update(zip(rest, sources))  # in the recorded order
            else:
                raise RecipeError(f"cannot tell which model each --source is; use --model NAME=PATH "
                                  f"(models: {', '.join(rest)})")
    if chosen:
        missing = [n for n in names if n not in chosen]
        if missing:
            i = names.index(missing[0])
            raise SourceError(f"no source given for model {missing[0]!r}"
                              + (f" (recorded file {files[i]})" if files[i] else "")
                              + f"; give --model {missing[0]}=PATH")
    else:
        found = {}
        for n, f in zip(names, files):
            hit = _find_source(out, n, f)
            if hit is not None:
                found[n] = hit
        if len(found) != len(names):
            missing = [f or n for n, f in zip(names, files) if n not in found]
            report.notes.append(f"source model(s) not found ({', '.join(missing)}; looked next to the output and in "
                                "the current folder): checked only what needs no source; give --source or "
                                "--model NAME=PATH to compare every tensor with its source")
            return None
        chosen = found
    opened: dict[str, SourceModel] = {}
    out_files = {p.resolve() for p in out.paths}
    for n in names:
        ref = chosen[n]
        try:
            m = SourceModel(ref, name=n)
        except SourceError as e:
            raise SourceError(f"source for model {n!r}: {e}") from None
        if any(p.resolve() in out_files for p in m.paths):
            raise SourceError(f"{ref}: is the output itself, not its source")
        opened[n] = m
        report.sources[n] = str(m.path)
    return opened


def _find_source(out: _OutFile, name: str, file: str) -> str | None:
    here = out.paths[0].parent
    cands = [here / file, Path.cwd() / file] if file else []
    cands += [here / name, Path(name)]
    out_files = {p.resolve() for p in out.paths}
    for c in cands:
        try:
            p = resolve_model_path(c)
            if p.resolve() not in out_files:
                return str(p)
        except (SourceError, OSError):
            continue
    return None


def _check_source_fits(m: SourceModel, n_recorded: int | None, arch: str | None) -> None:
    where = f"source for model {m.name!r} ({m.path})"
    if arch is not None and m.arch != arch:
        raise SourceError(f"{where} is a {m.arch} model, the output is {arch} (wrong --source?)")
    if n_recorded is not None and m.block_count != n_recorded:
        raise SourceError(f"{where} has {m.block_count} layers; the output was made from a model with {n_recorded} "
                          f"({K_SOURCE_BLOCKS}): wrong --source?")


# --------------------------------------------------------------------------- metadata checks


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return a == b or (len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def _same_kv(a: KV, e: KV) -> bool:
    """Equal values, floats bit for bit (-0.0 is not 0.0, a NaN payload counts)."""
    floats = {T.FLOAT32: "<f4", T.FLOAT64: "<f8"}
    ftype = floats.get(a.sub_type if a.vtype == T.ARRAY else a.vtype)  # type: ignore[arg-type]
    if ftype is not None:
        try:
            return np.asarray(a.value, ftype).tobytes() == np.asarray(e.value, ftype).tobytes()
        except (TypeError, ValueError):
            return False
    return _same(a.value, e.value)


def _type_desc(kv: KV) -> str:
    return f"ARRAY of {kv.sub_type.name}" if kv.vtype == T.ARRAY and kv.sub_type is not None else kv.vtype.name


def _check_layers(out: _OutFile, lin: _Lineage, report: VerifyReport, done_keys: set[str]) -> int:
    """Block count, layer indices and the recorded layer map agree with each other. Returns n layers."""
    arch = out.arch
    if arch is None:
        report.problem("metadata general.architecture is missing")
        return 0
    bc_key = f"{arch}.block_count"
    bc = out.get(bc_key)
    indices = sorted({int(m.group(1)) for m in map(BLOCK_RE.match, out.tensors) if m})
    n = len(indices)
    report.checked["layers"] = n
    if bc is None:
        report.problem(f"metadata {bc_key} is missing (the file holds {n} layers)")
    elif bc != n:
        report.problem(f"metadata {bc_key} is {bc}, but the file holds {n} layers (distinct blk.N indices)")
    done_keys.add(bc_key)
    if indices and indices != list(range(n)):
        gaps = sorted(set(range(max(indices) + 1)) - set(indices))
        report.problem(f"layer indices are not 0..{n - 1}: " + (f"blk.{gaps[0]} has no tensors" if gaps else "")
                       + (f" (and {len(gaps) - 1} more missing)" if len(gaps) > 1 else ""))
    if len(lin.layer_index) != n:
        report.problem(f"metadata {K_LAYER_INDEX} has {len(lin.layer_index)} entries for {n} layers")
        done_keys.add(K_LAYER_INDEX)
    if len(lin.layer_model) != len(lin.layer_index):
        report.problem(f"metadata {K_LAYER_MODEL} has {len(lin.layer_model)} entries, {K_LAYER_INDEX} has "
                       f"{len(lin.layer_index)}")
        done_keys.add(K_LAYER_MODEL)
    if len(lin.files) != len(lin.names) or len(lin.block_counts) != len(lin.names):
        report.problem(f"metadata {K_MODELS}, {K_FILES} and {K_SOURCE_BLOCKS} differ in length "
                       f"({len(lin.names)}, {len(lin.files)}, {len(lin.block_counts)})")
    for i, (m, j) in enumerate(zip(lin.layer_model, lin.layer_index)):
        if m >= len(lin.names):
            report.problem(f"metadata {K_LAYER_MODEL}[{i}] is {m}, but only {len(lin.names)} model(s) are recorded")
            done_keys.add(K_LAYER_MODEL)
        elif m < len(lin.block_counts) and j >= lin.block_counts[m]:
            report.problem(f"metadata {K_LAYER_INDEX}[{i}] is {j}, but model {lin.names[m]!r} has "
                           f"{lin.block_counts[m]} layers")
            done_keys.add(K_LAYER_INDEX)
    for suffix in archs.PER_LAYER_KEYS:
        key = f"{arch}.{suffix}"
        kv = out.kvs.get(key)
        if kv is not None and kv.vtype == T.ARRAY and len(kv.value) != n:
            report.problem(f"metadata {key} has {len(kv.value)} entries for {n} layers")
            done_keys.add(key)
    return n


def _check_layer_map(got: list[tuple[str, int]], lin: _Lineage, report: VerifyReport, done_keys: set[str],
                     what: str) -> None:
    """The recipe's layer map (evaluated again) against the recorded one."""
    recorded = [lin.layer(i) for i in range(len(lin.layer_index))]
    if got == recorded:
        return
    if len(got) != len(recorded):
        report.problem(f"{what} gives {len(got)} layers, {K_LAYER_INDEX} records {len(recorded)}")
    else:
        bad = [i for i, (a, b) in enumerate(zip(got, recorded)) if a != b]
        i = bad[0]
        rec = recorded[i]
        as_recorded = f"layer {rec[1]} of {rec[0]!r}" if rec is not None else "nothing"
        report.problem(f"output layer {i} is recorded as {as_recorded} ({K_LAYER_MODEL}/{K_LAYER_INDEX}), "
                       f"{what} gives layer {got[i][1]} of {got[i][0]!r}"
                       + (f" ({len(bad) - 1} more layers differ)" if len(bad) > 1 else ""))
    done_keys.update((K_LAYER_INDEX, K_LAYER_MODEL))


def _check_same_source_layers(out: _OutFile, lin: _Lineage, n: int, report: VerifyReport,
                              done_keys: set[str]) -> None:
    """Layers copied from the same source layer hold the same tensor kinds and per-layer values."""
    arch = out.arch or ""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i in range(n):
        src = lin.layer(i)
        if src is not None:
            groups[src].append(i)
    kinds: dict[int, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for t in out.tensors.values():
        m = BLOCK_RE.match(t.name)
        if m:
            kinds[int(m.group(1))][m.group(2)] = t.shape
    arrays = {f"{arch}.{s}": out.kvs[f"{arch}.{s}"] for s in archs.PER_LAYER_KEYS
              if f"{arch}.{s}" in out.kvs and out.kvs[f"{arch}.{s}"].vtype == T.ARRAY
              and f"{arch}.{s}" not in done_keys}
    for (model, j), members in groups.items():
        first = members[0]
        for i in members[1:]:
            if kinds[i] != kinds[first]:
                diff = sorted(set(kinds[i].items()) ^ set(kinds[first].items()))
                report.problem(f"blk.{i} and blk.{first} are both layer {j} of {model!r} but hold different tensors "
                               f"(first difference: {diff[0][0]})")
            for key, kv in arrays.items():
                if i < len(kv.value) and first < len(kv.value) and not _same(kv.value[i], kv.value[first]):
                    report.problem(f"metadata {key}[{i}] is {kv.value[i]!r} but {key}[{first}] is "
                                   f"{kv.value[first]!r}; both layers are layer {j} of {model!r}")


def _compare_kvs(expected: list[KV], out: _OutFile, quantized: bool, lin: _Lineage, report: VerifyReport,
                 done_keys: set[str]) -> None:
    """Every key as the upscaler writes it for these sources: value and exact GGUF type."""
    exp = {kv.key: kv for kv in expected}
    per_layer = {f"{out.arch}.{s}" for s in archs.PER_LAYER_KEYS}
    for key, e in exp.items():
        a = out.kvs.get(key)
        report.count("metadata_keys")
        if key in done_keys or (quantized and key in QUANTIZER_KEYS):
            continue
        if a is None:
            report.problem(f"metadata {key} is missing")
            continue
        if (a.vtype, a.sub_type) != (e.vtype, e.sub_type):
            report.problem(f"metadata {key} is stored as {_type_desc(a)}, expected {_type_desc(e)}")
            continue
        # the recipe text is checked by what it means: re-evaluated, it must give the recorded
        # layer map and every tensor's scale (a `models:` recipe is recorded with [0, -1])
        if key == K_VERSION and isinstance(a.value, str) and a.value.startswith("gguf-upscale "):
            continue  # written by another version of the tool
        if key in ("general.name", K_RECIPE) or _same_kv(a, e):
            continue
        if isinstance(a.value, list) and isinstance(e.value, list):
            if len(a.value) != len(e.value):
                report.problem(f"metadata {key} has {len(a.value)} entries, expected {len(e.value)}")
                continue
            bad = [i for i, (x, y) in enumerate(zip(a.value, e.value))
                   if not _same_kv(KV(key, x, a.sub_type or a.vtype), KV(key, y, e.sub_type or e.vtype))]
            i = bad[0] if bad else 0
            where = ""
            if key in per_layer and lin.layer(i) is not None:
                where = f" (output layer {i} is layer {lin.layer(i)[1]} of {lin.layer(i)[0]!r})"
            report.problem(f"metadata {key}[{i}] is {_short(a.value[i])}, expected {_short(e.value[i])}{where}"
                           + (f"; {len(bad) - 1} more entries differ" if len(bad) > 1 else ""))
        else:
            report.problem(f"metadata {key} is {_short(a.value)}, expected {_short(e.value)}")
    for key in out.kvs:
        if key in exp or key in done_keys:
            continue
        if key in QUANTIZER_KEYS or key == PAD_KEY or (quantized and key.startswith(IMATRIX_PREFIX)):
            continue  # `run`/`quantize` set these even when the types stay the source's
        report.problem(f"metadata {key} is not a key the upscaler writes for these sources (unexpected)")


# --------------------------------------------------------------------------- tensor data


@dataclass
class _Expect:
    """What one output tensor must hold: alternative recomputations (the first is the primary)."""

    desc: str
    op: str
    candidates: list[tuple[tuple, Producer]]  # (cache key, producer)
    group: tuple | None = None  # tensors with equal groups must be byte-identical
    exact: bool = True  # False: a mismatch means "cannot tell" (e.g. quantized with an unknown imatrix)


class _DataChecker:
    def __init__(self, out: _OutFile, reader: TensorReader, report: VerifyReport, progress: Any) -> None:
        self.out, self.reader, self.report, self.progress = out, reader, report, progress
        self.cache: dict[tuple, tuple[int, tuple[bytes, ...]] | str] = {}
        self.groups: dict[tuple, list[tuple[SourceTensor, tuple[int, tuple[bytes, ...]], str]]] = defaultdict(list)
        self.validate_values = False
        self.emitter: Any = None  # the QuantEmitter recomputing quantized tensors (closed at the end)
        self.mismatches = 0
        self.unknown_imatrix: str | None = None  # quantized with this imatrix, which was not given

    def digest(self, key: tuple, produce: Producer, chunk: int) -> tuple[int, tuple[bytes, ...]] | str:
        """Digests of a recomputation (cached), or the reason it cannot be made."""
        key = key + (chunk,)
        if key not in self.cache:
            d = _Digests(chunk)
            try:
                produce(d)
                self.cache[key] = d.result()
            except UpscaleError as e:
                if isinstance(e, SourceError):
                    raise
                self.cache[key] = str(e)
        return self.cache[key]

    def actual(self, t: SourceTensor) -> tuple[int, tuple[bytes, ...]]:
        chunk = _chunk_for(t.ggml_type)
        d = _Digests(chunk)
        bad: list[int] = []

        def consume(data: Any) -> None:
            d(data)
            if self.validate_values and not bad and not _valid_values(t.ggml_type, data):
                bad.append(d.total - len(data))

        _read_tensor(self.reader, t, consume, chunk)
        if bad:
            self.report.problem(f"{t.name}: invalid values (NaN/inf or a bad block scale) in the 16 MiB piece at "
                                f"byte {bad[0]}")
        self.report.count("tensors")
        self.report.count("bytes", t.n_bytes)
        if self.progress is not None:
            self.progress.advance(t, t.n_bytes)
        return d.result()

    def check(self, t: SourceTensor, exp: _Expect) -> None:
        got = self.actual(t)
        chunk = _chunk_for(t.ggml_type)
        status = "bad"
        reasons = []
        for key, produce in exp.candidates:
            want = self.digest(key, produce, chunk)
            if isinstance(want, str):
                reasons.append(want)
                continue
            if want == got:
                status = "ok"
                break
        if status == "ok":
            self.report.count("exact")
            self.report.count(exp.op)
        elif not exp.exact or (reasons and len(reasons) == len(exp.candidates)):
            status = "unverified"
            self.report.count("not_verified")
            if reasons and len(reasons) == len(exp.candidates) and len(self.report.notes) < MAX_PROBLEMS:
                self.report.notes.append(f"{t.name}: cannot be recomputed ({reasons[0]})")
        else:
            self.mismatches += 1
            self._mismatch(t, got, exp, chunk)
        if exp.group is not None:
            self.groups[exp.group].append((t, got, status))

    def _mismatch(self, t: SourceTensor, got: tuple[int, tuple[bytes, ...]], exp: _Expect, chunk: int) -> None:
        key, produce = next((k, p) for k, p in exp.candidates if not isinstance(self.cache.get(k + (chunk,)), str))
        want = self.cache[key + (chunk,)]
        assert not isinstance(want, str)
        if self.report.full:
            self.report.problem(f"{t.name}: differs from {exp.desc}")
            return
        if want[0] != got[0]:
            self.report.problem(f"{t.name}: holds {got[0]} bytes, {exp.desc} has {want[0]}")
            return
        k = next(i for i, (a, b) in enumerate(zip(want[1], got[1])) if a != b)
        start, end = k * chunk, min((k + 1) * chunk, t.n_bytes)
        expected = _window(produce, start, end)
        actual = bytes(self.reader.read(t, start, end - start))
        pos, count = _first_difference(expected, actual)
        more = f" (+{count - 1} more in that 16 MiB piece)" if count > 1 else ""
        self.report.problem(f"{t.name}: byte {start + pos} of {t.n_bytes} is 0x{actual[pos]:02x}, expected "
                            f"0x{expected[pos]:02x} ({exp.desc}){more}")

    def check_groups(self) -> None:
        """Copies with identical recipes (same source, scale, type) must be byte-identical."""
        for members in self.groups.values():
            if len(members) < 2:
                continue
            ok = [m for m in members if m[2] == "ok"]
            if ok:
                ref = ok[0]
            else:
                votes = Counter(m[1] for m in members if m[2] == "unverified")
                if not votes:
                    continue
                best, n = votes.most_common(1)[0]
                ref = next(m for m in members if m[1] == best)
            matched = 0
            for m in members:
                if m[2] != "unverified" or m is ref:
                    continue
                if m[1] == ref[1]:
                    matched += 1
                    continue
                self._pair_mismatch(m[0], ref[0], m[1], ref[1])
            if matched:
                self.report.count("duplicates", matched + (ref[2] == "unverified"))

    def _pair_mismatch(self, t: SourceTensor, ref: SourceTensor, got: tuple, want: tuple) -> None:
        what = f"its identical copy {ref.name} (same source layer, scale and type)"
        if self.report.full or got[0] != want[0]:
            self.report.problem(f"{t.name}: differs from {what}")
            return
        chunk = _chunk_for(t.ggml_type)
        k = next(i for i, (a, b) in enumerate(zip(want[1], got[1])) if a != b)
        start, end = k * chunk, min((k + 1) * chunk, t.n_bytes)
        a, b = bytes(self.reader.read(t, start, end - start)), bytes(self.reader.read(ref, start, end - start))
        pos, _ = _first_difference(a, b)
        self.report.problem(f"{t.name}: byte {start + pos} is 0x{a[pos]:02x}, 0x{b[pos]:02x} in {what}")


def _zero_row_candidates(t: SourceTensor, with_imatrix: bool) -> list[tuple[tuple, Producer]]:
    """What a zero-scaled tensor may hold: zero bytes, or the row ggml's quantizer makes of +0.0 / -0.0
    (`run` dequantizes zero bytes of the source type, which is -0.0 for some types, then quantizes)."""
    from . import ggml
    n_per_row = t.shape[0]
    n_rows = t.n_elements // n_per_row
    row_len = t.n_bytes // max(n_rows, 1)
    rows = [bytes(row_len)]
    if int(t.ggml_type) in ggml.QUANTIZABLE:
        for sign in (1.0, -1.0):
            im = np.ones(n_per_row, np.float32) if with_imatrix or ggml.requires_imatrix(int(t.ggml_type)) else None
            try:
                row = bytes(ggml.quantize_tensor(np.full((1, n_per_row), sign * 0.0, np.float32), int(t.ggml_type), im))
            except UpscaleError:
                continue
            if row not in rows:
                rows.append(row)

    def repeat(row: bytes) -> Producer:
        def produce(consume: Consumer) -> None:
            per = max(1, CHUNK // max(len(row), 1))
            block = memoryview(row * min(per, n_rows))
            left = n_rows
            while left:
                k = min(per, left)
                consume(block[:k * len(row)])
                left -= k
        return produce

    return [(("zero-row", int(t.ggml_type), t.shape, row), repeat(row)) for row in rows]


def _describe(e: OutTensor, model: str, typ: Q) -> tuple[str, str]:
    src = f"{e.source.name} of {model}"
    requant = typ != e.source.ggml_type
    if e.factor == 0.0:
        return "zero", "zero (scale 0)" + (f", as {typ.name}" if requant else "")
    if e.factor != 1.0:
        return ("quantize" if requant else "scale"), f"{src} x {e.factor:g}" + (f", quantized to {typ.name}" if requant else "")
    if requant:
        return "quantize", f"{src} quantized to {typ.name}"
    return "copy", f"copy of {src}"


# --------------------------------------------------------------------------- the command


def verify_file(path: str | Path, *, sources: list[str] | None = None, models: list[str] | None = None,
                imatrix: list[str] | None = None, n_threads: int = 0, progress: Any = None) -> VerifyReport:
    """Check an upscaled GGUF (any shard of a set) against its recorded recipe and, when available, its sources.

    `sources`: source GGUF paths (one for a single-model recipe; several are matched to the
    recorded file names, else taken in the recorded model order); `models`: NAME=PATH for
    models named in the recipe; `imatrix`: the source's importance matrix (FILE or NAME=FILE,
    as given to `run`) for outputs quantized with one. Without either, sources are looked up
    by their recorded file names next to the output and in the current folder; if they are not
    all found, only the checks that need no source are made (the report's notes say so).
    `progress`: the writer's Progress protocol (start/advance/finish), fed bytes read.

    Returns a VerifyReport; mismatches are `problems` (one line each, naming the tensor or
    key). Raises UpscaleError (one line) for what keeps verification from starting: a missing
    file, a file without recorded recipe, a missing or mismatched source.
    """
    report = VerifyReport(path=str(path))
    out = _open_output(path, report)
    if out is None:
        return report
    lin = _read_lineage(out, report)
    done_keys: set[str] = set()
    n_layers = _check_layers(out, lin, report, done_keys)
    recipe: Recipe | None = None
    try:
        recipe = _recorded_recipe(lin)
    except RecipeError as e:
        report.problem(str(e))
        done_keys.add(K_RECIPE)
    src_models = _resolve_sources(out, lin, list(sources or []), list(models or []), report)
    if imatrix and src_models is None:
        raise UpscaleError("--imatrix needs the source models (give --source or --model NAME=PATH)")

    with TensorReader() as reader:
        checker = _DataChecker(out, reader, report, progress)
        if progress is not None:
            progress.start(sum(t.n_bytes for t in out.tensors.values()), len(out.tensors))
        try:
            if src_models is not None and recipe is not None:
                expects = _with_sources(out, lin, recipe, src_models, imatrix, n_threads, checker, done_keys)
            else:
                if src_models is not None:
                    report.notes.append("the recorded recipe could not be read, so tensors were not compared with "
                                        "their sources")
                expects = _without_sources(out, lin, recipe, n_layers, report, done_keys)
                checker.validate_values = True
            for t in out.tensors.values():
                exp = expects.get(t.name)
                if exp is None:
                    checker.actual(t)  # still read: progress, values
                    report.count("not_verified" if report.sources else "values_only")
                else:
                    checker.check(t, exp)
            checker.check_groups()
            _check_padding(out, reader, report)
        finally:
            if progress is not None:
                progress.finish()
            if checker.emitter is not None:
                checker.emitter.close()
    _summarize(report, checker)
    return report


def _with_sources(out: _OutFile, lin: _Lineage, recipe: Recipe, src_models: dict[str, SourceModel],
                  imatrix: list[str] | None, n_threads: int, checker: "_DataChecker",
                  done_keys: set[str]) -> dict[str, _Expect]:
    from .quantizer import QuantEmitter
    from .tensor_data import emit
    reader, report = checker.reader, checker.report
    counts = dict(zip(lin.names, lin.block_counts))
    for name, m in src_models.items():
        _check_source_fits(m, counts.get(name), out.arch)
    try:
        plan = build_plan(recipe, src_models)
        expected = build_output(plan, src_models)
    except RecipeError as e:
        raise RecipeError(f"the recorded recipe does not fit the given source(s): {e}") from None
    _check_layer_map(plan.layer_map(), lin, report, done_keys, f"{K_RECIPE} with these sources")

    exp_by_name = {t.name: t for t in expected.tensors}
    # wrong source with other widths: most shapes differ; a single odd shape is a problem of the file
    shared = [n for n in exp_by_name if n in out.tensors]
    misshaped = [n for n in shared if exp_by_name[n].shape != out.tensors[n].shape]
    if misshaped and len(misshaped) * 2 >= len(shared):
        n = misshaped[0]
        e = exp_by_name[n]
        raise SourceError(f"source for model {_model_of(n, e, plan, lin)!r} ({e.source.path.name}) does not match the "
                          f"output: {n} is {list(e.shape)} from it, {list(out.tensors[n].shape)} in the output "
                          "(wrong --source?)")
    for n in misshaped:
        report.problem(f"{n}: shape {list(out.tensors[n].shape)}, expected {list(exp_by_name[n].shape)}")
    for n in exp_by_name:
        if n not in out.tensors:
            report.problem(f"tensor {n} is missing (the recipe and sources give it)")
    for n in out.tensors:
        if n not in exp_by_name:
            report.problem(f"tensor {n} is unexpected (the recipe and sources do not give it)")

    quantized = IMATRIX_PREFIX + "file" in out.kvs or any(
        out.tensors[n].ggml_type != exp_by_name[n].source.ggml_type for n in shared)
    report.quantized = quantized
    _compare_kvs(expected.kvs, out, quantized, lin, report, done_keys)

    has_im = any(k.startswith(IMATRIX_PREFIX) for k in out.kvs)
    entries = None
    if imatrix:
        if not has_im:
            raise UpscaleError("the output records no importance matrix (quantize.imatrix.*): "
                               "it was quantized without one; drop --imatrix")
        from .pipeline import parse_imatrix_options, source_imatrix_lookup
        ims = parse_imatrix_options(imatrix, list(plan.models))
        missing = [n for n in plan.models if n not in ims]
        if missing:
            raise UpscaleError(f"no importance matrix for model {missing[0]!r}; give --imatrix {missing[0]}=FILE")
        entries = source_imatrix_lookup(expected, plan, ims)
    unknown_im = has_im and entries is None
    emitter = checker.emitter = QuantEmitter(reader, imatrix=entries, n_threads=n_threads or os.cpu_count() or 1)

    expects: dict[str, _Expect] = {}
    for name, t in out.tensors.items():
        e = exp_by_name.get(name)
        if e is None or e.shape != t.shape:
            continue
        typed = replace(e, ggml_type=t.ggml_type, n_bytes=t.n_bytes)
        op, desc = _describe(e, _model_of(name, e, plan, lin), t.ggml_type)
        key = typed.content_key
        cands: list[tuple[tuple, Producer]] = []
        if t.ggml_type == e.source.ggml_type:
            # what `upscale` writes (copy, zero bytes, scaled_rows)
            cands.append((("emit",) + key, lambda c, tt=typed: emit(tt, reader, _Feed(c))))
        if t.ggml_type != e.source.ggml_type or e.factor != 1.0:
            # what `run`/`quantize` write: dequantize -> scale -> quantize with ggml's kernels
            def quant(c: Consumer, tt: OutTensor = typed) -> None:
                for piece in emitter._quantized_chunks(tt):
                    c(piece)
            cands.append((("quant", entries is not None) + key, quant))
        exact = True
        if unknown_im and cands[-1][0][0] == "quant" and t.ggml_type not in IMATRIX_IGNORED:
            # quantized with an importance matrix we do not have: a mismatch cannot be told apart
            exact = False
            if e.factor == 0.0:
                cands += _zero_row_candidates(t, True)
        expects[name] = _Expect(desc, op, cands, group=key, exact=exact)
    if unknown_im:
        checker.unknown_imatrix = str(out.get(IMATRIX_PREFIX + "file"))
        checker.validate_values = True  # what can still be said of the tensors it changed
    return expects


def _model_of(name: str, e: OutTensor, plan: Plan, lin: _Lineage) -> str:
    m = BLOCK_RE.match(name)
    if m and int(m.group(1)) < len(plan.layers):
        return plan.layers[int(m.group(1))].model
    from .plan import global_source
    return global_source(name, plan)


def _check_tensor_names(out: _OutFile, report: VerifyReport) -> None:
    """Without sources, at least every tensor name must be one llama.cpp knows for the architecture."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
    arch = {v: k for k, v in MODEL_ARCH_NAMES.items()}.get(out.arch or "")
    if arch is None:
        return
    known = {TENSOR_NAMES[t].replace("blk.{bid}.", "") for t in MODEL_TENSORS[arch]}
    for name in out.tensors:
        m = BLOCK_RE.match(name)
        kind = (m.group(2) if m else name).rsplit(".", 1)[0]
        if kind not in known:
            report.problem(f"tensor {name} is not a tensor llama.cpp knows for {out.arch} models")


def _without_sources(out: _OutFile, lin: _Lineage, recipe: Recipe | None, n_layers: int,
                     report: VerifyReport, done_keys: set[str]) -> dict[str, _Expect]:
    _check_same_source_layers(out, lin, n_layers, report, done_keys)
    _check_tensor_names(out, report)
    layers: list[OutputLayer] | None = None
    global_scales: dict[str, float] = {}
    if recipe is not None:
        try:
            layers, global_scales = _recipe_layers(recipe, lin, out)
        except RecipeError as e:
            report.problem(str(e))
    if layers is not None:
        _check_layer_map([(l.model, l.source_layer) for l in layers], lin, report, done_keys, K_RECIPE)
    expects: dict[str, _Expect] = {}
    for name, t in out.tensors.items():
        m = BLOCK_RE.match(name)
        if m is None:
            factor = global_scales.get(name, 1.0)
            group = None
        else:
            i, suffix = int(m.group(1)), m.group(2)
            src = lin.layer(i)
            factor = layers[i].scale_of(suffix) if layers is not None and i < len(layers) else None
            group = (src, suffix, factor, int(t.ggml_type), t.shape) if src is not None and factor is not None else None
        if factor == 0.0:
            expects[name] = _Expect("zero (scale 0 in the recipe)", "zero", _zero_row_candidates(t, False), group=group)
        elif group is not None:
            expects[name] = _Expect("", "copy", [], group=group, exact=False)
    report.notes.append("checked without sources: metadata, zero-scaled tensors and that duplicated layers are "
                        "identical to each other; the other tensors only for valid values")
    return expects


def _summarize(report: VerifyReport, checker: _DataChecker) -> None:
    c = report.checked
    mismatches = checker.mismatches
    if checker.unknown_imatrix is not None and c["not_verified"]:
        report.notes.append(
            f"the output was quantized with an importance matrix ({checker.unknown_imatrix}), which was not given: "
            f"{c['not_verified']} tensor(s) could not be recomputed without it and were checked only for type, "
            f"shape, valid values and against their duplicated copies ({c['duplicates']} equal to one); pass the "
            "source's imatrix (as given to `run`) with --imatrix to check every byte")
    if not report.sources:
        # no source: a tensor is either recomputed (zero), equal to its copies, or checked for valid values only
        c["values_only"] = c["tensors"] - c["exact"] - c["duplicates"]
        c["not_verified"] = 0
    elif c["exact"] == c["zero"] and mismatches:
        # first, where it is seen: it explains every other line
        report.problems.insert(0, "no tensor matches its source: are these the models this output was made from?")
        report.problems_total += 1


def format_report(report: VerifyReport) -> str:
    """Human-readable report: problems one per line, then what was checked."""
    c = report.checked
    lines = [f"  {p}" for p in report.problems]
    if report.problems_not_shown:
        lines.append(f"  ... and {report.problems_not_shown} more")
    lines += [f"note: {n}" for n in report.notes]
    files = f" ({len(report.files)} shards)" if len(report.files) > 1 else ""
    if report.sources:
        against = "against " + ", ".join(report.sources.values())
        ops = ", ".join(f"{c[k]} {k}" for k in ("copy", "zero", "scale", "quantize") if c[k])
        what = f"{c['exact']} of {c['tensors']} tensors recomputed byte-for-byte ({ops})"
        if c["not_verified"]:
            what += f", {c['not_verified']} not recomputable ({c['duplicates']} of them equal to their copies)"
        what += f"; {c['metadata_keys']} metadata keys"
    else:
        against = "without sources"
        what = (f"{c['tensors']} tensors: {c['exact']} zero-scaled checked, {c['duplicates']} equal to their "
                f"duplicated copies, {c['values_only']} checked for valid values only")
    status = "ok" if report.ok else f"{report.problems_total} problem(s)"
    lines.append(f"{status}: {report.path}{files}, {c['layers']} layers, {human_bytes(c['bytes'])} of tensor data "
                 f"checked {against}: {what}")
    return "\n".join(lines)

