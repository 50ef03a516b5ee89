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

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType as Q

from ..errors import RecipeError, SourceError, UpscaleError
from ..format.source import BLOCK_RE, SourceModel, TensorReader
from ..planning.metadata import K_RECIPE
from ..planning.output import OutTensor, build_output
from ..planning.plan import OutputLayer, build_plan
from ..planning.recipe import Recipe
from .verify_lineage import Lineage, read_lineage, recorded_recipe
from .verify_metadata import (
    IMATRIX_PREFIX,
    check_layer_map,
    check_layers,
    check_same_source_layers,
    check_tensor_names,
    compare_kvs,
)
from .verify_output import OutFile, check_padding, open_output
from .verify_replay import recipe_layers
from .verify_report import VerifyReport, format_report
from .verify_sources import check_source_fits, resolve_sources
from .verify_stream import Consumer, Feed, Producer
from .verify_tensors import DataChecker, Expect, describe, zero_row_candidates

__all__ = ["VerifyReport", "format_report", "verify_file"]

# ggml's quantizers for these ignore an importance matrix: recomputable without it
IMATRIX_IGNORED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)


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
    out = open_output(path, report)
    if out is None:
        return report
    lin = read_lineage(out, report)
    done_keys: set[str] = set()
    n_layers = check_layers(out, lin, report, done_keys)
    recipe: Recipe | None = None
    try:
        recipe = recorded_recipe(lin)
    except RecipeError as e:
        report.problem(str(e))
        done_keys.add(K_RECIPE)
    src_models = resolve_sources(out, lin, list(sources or []), list(models or []), report)
    if imatrix and src_models is None:
        raise UpscaleError("--imatrix needs the source models (give --source or --model NAME=PATH)")

    with TensorReader() as reader:
        checker = DataChecker(out, reader, report, progress)
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
            check_padding(out, reader, report)
        finally:
            if progress is not None:
                progress.finish()
            if checker.emitter is not None:
                checker.emitter.close()
    _summarize(report, checker)
    return report


def _with_sources(out: OutFile, lin: Lineage, recipe: Recipe, src_models: dict[str, SourceModel],
                  imatrix: list[str] | None, n_threads: int, checker: DataChecker,
                  done_keys: set[str]) -> dict[str, Expect]:
    from ..format.tensor_data import emit
    from ..quant.quantizer import QuantEmitter
    reader, report = checker.reader, checker.report
    counts = dict(zip(lin.names, lin.block_counts))
    for name, m in src_models.items():
        check_source_fits(m, counts.get(name), out.arch)
    try:
        plan = build_plan(recipe, src_models)
        expected = build_output(plan, src_models)
    except RecipeError as e:
        raise RecipeError(f"the recorded recipe does not fit the given source(s): {e}") from None
    check_layer_map(plan.layer_map(), lin, report, done_keys, f"{K_RECIPE} with these sources")

    exp_by_name = {t.name: t for t in expected.tensors}
    # wrong source with other widths: most shapes differ; a single odd shape is a problem of the file
    shared = [n for n in exp_by_name if n in out.tensors]
    misshaped = [n for n in shared if exp_by_name[n].shape != out.tensors[n].shape]
    if misshaped and len(misshaped) * 2 >= len(shared):
        n = misshaped[0]
        wrong = exp_by_name[n]
        raise SourceError(f"source for model {plan.model_of(n)!r} ({wrong.source.path.name}) does not match the "
                          f"output: {n} is {list(wrong.shape)} from it, {list(out.tensors[n].shape)} in the output "
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
    compare_kvs(expected.kvs, out, quantized, lin, report, done_keys)

    has_im = any(k.startswith(IMATRIX_PREFIX) for k in out.kvs)
    entries = None
    if imatrix:
        if not has_im:
            raise UpscaleError("the output records no importance matrix (quantize.imatrix.*): "
                               "it was quantized without one; drop --imatrix")
        from ..pipeline import parse_imatrix_options, source_imatrix_lookup
        ims = parse_imatrix_options(imatrix, list(plan.models))
        missing = [n for n in plan.models if n not in ims]
        if missing:
            raise UpscaleError(f"no importance matrix for model {missing[0]!r}; give --imatrix {missing[0]}=FILE")
        entries = source_imatrix_lookup(expected, plan, ims)
    unknown_im = has_im and entries is None
    emitter = checker.emitter = QuantEmitter(reader, imatrix=entries, n_threads=n_threads or os.cpu_count() or 1)

    expects: dict[str, Expect] = {}
    for name, t in out.tensors.items():
        exp_t = exp_by_name.get(name)
        if exp_t is None or exp_t.shape != t.shape:
            continue
        typed = replace(exp_t, ggml_type=t.ggml_type, n_bytes=t.n_bytes)
        op, desc = describe(exp_t, plan.model_of(name), t.ggml_type)
        key = typed.content_key
        cands: list[tuple[tuple, Producer]] = []
        if t.ggml_type == exp_t.source.ggml_type:
            # what `upscale` writes (copy, zero bytes, scaled_rows)
            def copy(c: Consumer, tt: OutTensor = typed) -> None:
                emit(tt, reader, Feed(c))
            cands.append((("emit",) + key, copy))
        if t.ggml_type != exp_t.source.ggml_type or exp_t.factor != 1.0:
            # what `run`/`quantize` write: dequantize -> scale -> quantize with ggml's kernels
            def quant(c: Consumer, tt: OutTensor = typed) -> None:
                for piece in emitter.quantized_chunks(tt):
                    c(piece)
            cands.append((("quant", entries is not None) + key, quant))
        exact = True
        if unknown_im and cands[-1][0][0] == "quant" and t.ggml_type not in IMATRIX_IGNORED:
            # quantized with an importance matrix we do not have: a mismatch cannot be told apart
            exact = False
            if exp_t.factor == 0.0:
                cands += zero_row_candidates(t, True)
        expects[name] = Expect(desc, op, cands, group=key, exact=exact)
    if unknown_im:
        checker.unknown_imatrix = str(out.get(IMATRIX_PREFIX + "file"))
        checker.validate_values = True  # what can still be said of the tensors it changed
    return expects


def _without_sources(out: OutFile, lin: Lineage, recipe: Recipe | None, n_layers: int,
                     report: VerifyReport, done_keys: set[str]) -> dict[str, Expect]:
    check_same_source_layers(out, lin, n_layers, report, done_keys)
    check_tensor_names(out, report)
    layers: list[OutputLayer] | None = None
    global_scales: dict[str, float] = {}
    if recipe is not None:
        try:
            layers, global_scales = recipe_layers(recipe, lin, out)
        except RecipeError as e:
            report.problem(str(e))
    if layers is not None:
        check_layer_map([(l.model, l.source_layer) for l in layers], lin, report, done_keys, K_RECIPE)
    expects: dict[str, Expect] = {}
    for name, t in out.tensors.items():
        m = BLOCK_RE.match(name)
        factor: float | None
        if m is None:
            factor = global_scales.get(name, 1.0)
            group = None
        else:
            i, suffix = int(m.group(1)), m.group(2)
            src = lin.layer(i)
            factor = layers[i].scale_of(suffix) if layers is not None and i < len(layers) else None
            group = (src, suffix, factor, int(t.ggml_type), t.shape) if src is not None and factor is not None else None
        if factor == 0.0:
            expects[name] = Expect("zero (scale 0 in the recipe)", "zero", zero_row_candidates(t, False), group=group)
        elif group is not None:
            expects[name] = Expect("", "copy", [], group=group, exact=False)
    report.notes.append("checked without sources: metadata, zero-scaled tensors and that duplicated layers are "
                        "identical to each other; the other tensors only for valid values")
    return expects


def _summarize(report: VerifyReport, checker: DataChecker) -> None:
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
