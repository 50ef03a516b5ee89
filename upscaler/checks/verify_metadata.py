"""Metadata checks of `verify`: block count and layer indices, per-layer arrays, the recorded
layer map, and every key compared (value and exact GGUF type) with what the upscaler writes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from gguf import GGUFValueType as T
from gguf import Keys

from ..format.source import BLOCK_RE, KV
from ..format.writer import PAD_KEY  # the writer's filler that aligns a shard's data
from ..planning import archs
from ..planning.metadata import K_FILES, K_LAYER_INDEX, K_LAYER_MODEL, K_MODELS, K_RECIPE, K_SOURCE_BLOCKS, K_VERSION
from .verify_lineage import Lineage
from .verify_output import OutFile
from .verify_report import VerifyReport

IMATRIX_PREFIX = "quantize.imatrix."
QUANTIZER_KEYS = (Keys.General.QUANTIZATION_VERSION, Keys.General.FILE_TYPE)


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


def check_layers(out: OutFile, lin: Lineage, report: VerifyReport, done_keys: set[str]) -> int:
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


def check_layer_map(got: list[tuple[str, int]], lin: Lineage, report: VerifyReport, done_keys: set[str],
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


def check_same_source_layers(out: OutFile, lin: Lineage, n: int, report: VerifyReport,
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


def compare_kvs(expected: list[KV], out: OutFile, quantized: bool, lin: Lineage, report: VerifyReport,
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
            src = lin.layer(i) if key in per_layer else None
            if src is not None:
                where = f" (output layer {i} is layer {src[1]} of {src[0]!r})"
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


def check_tensor_names(out: OutFile, report: VerifyReport) -> None:
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
