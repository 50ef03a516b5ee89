"""Run a sweep: score the source once, then build, score and remove each candidate in turn.

Order of work, and why:

1. Every candidate is planned first (headers only, milliseconds), so a bad recipe or a plan the
   source cannot take is refused before the long source scoring.
2. The source is scored once in a child process; its logits stay on disk in the sweep's
   temporary folder (:mod:`upscaler.checks.reference_scores`).
3. Each candidate is written into that folder, which sits beside the output (the results file
   or ``--keep`` folder). On the source's reflink filesystem (XFS, btrfs, ZFS with block
   cloning) a copied tensor whose offsets line up on the filesystem's blocks is shared instead
   of written (large models, whose tensors are whole blocks; not the 135M demo model, whose
   layers are 512 bytes past a 4 KiB multiple); elsewhere it is written, into the page cache,
   and removed before most of it reaches the disk. It is scored in its own
   child against the kept source scores, then removed (or moved into ``--keep``). A candidate
   whose build or evaluation fails is recorded with its error; the sweep goes on.
4. After every candidate the results file is rewritten atomically. Ctrl-C ends the candidate
   in progress, removes the temporary folder and leaves the results so far
   (:class:`SweepInterrupted` carries them).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..checks.kl_stats import mean_and_uncertainty
from ..checks.reference_scores import CandidateScores, StoredReference, score_candidate, score_reference
from ..errors import UpscaleError
from ..format.atomic import atomic_write
from ..format.source import TensorReader
from ..format.tensor_data import Emitter
from ..format.writer import GGUFOutput
from ..pipeline import Prepared, prepare, write_quantized
from ..publish.report import runs
from .candidates import Candidate, dedupe

if TYPE_CHECKING:
    from ..quant.quantizer import MixtureMode

__all__ = ["CandidateResult", "SweepInterrupted", "SweepOptions", "SweepResult", "paired_ratio", "prepare_candidates",
           "run_sweep"]

TMP_PREFIX = ".gguf-upscale-sweep-"


@dataclass
class SweepOptions:
    """How candidates are built and scored (the CLI's options, checked)."""

    text: str
    text_label: str
    n_ctx: int = 512
    max_tokens_scored: int = 1024
    windows: str = "sliding"
    eval_threads: int | None = None
    quant_type: str | None = None  # None: tensor types unchanged, as `upscale`
    mixture: MixtureMode = "target"
    quant_threads: int = 1
    models: list[str] | None = None


@dataclass
class CandidateResult:
    """What one candidate gave: its plan and figures, or the error that stopped it."""

    label: str
    slices: str  # the output's layers as source ranges, e.g. 0:20,10:30 (scaled runs marked *)
    block_count: int
    recipe_yaml: str
    size: int | None = None
    scores: CandidateScores | None = None
    error: str | None = None
    kept: str | None = None
    is_source: bool = False  # every source layer once, in order, unscaled: a control, never "best"
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    cleanup_seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        return self.scores.stats.perplexity if self.scores else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "slices": self.slices, "block_count": self.block_count,
                "size": self.size, **(self.scores.to_dict() if self.scores else {}), "error": self.error,
                "kept": self.kept, "is_source": self.is_source, "build_seconds": round(self.build_seconds, 3),
                "eval_seconds": round(self.eval_seconds, 3), "cleanup_seconds": round(self.cleanup_seconds, 3),
                "recipe_yaml": self.recipe_yaml}


def paired_ratio(a: CandidateResult, b: CandidateResult) -> tuple[float, float]:
    """PPL(a)/PPL(b) and its uncertainty from the per-token NLL differences on the same tokens.

    Pairing removes what the text does to both (hard tokens are hard for every candidate), so
    this uncertainty is far smaller than the two perplexities' own ones combined."""
    assert a.scores is not None and b.scores is not None
    mean, unc = mean_and_uncertainty(a.scores.nll - b.scores.nll)
    ratio = math.exp(mean)
    return ratio, ratio * unc


@dataclass
class SweepResult:
    source: str
    text: str
    reference: StoredReference | None = None
    candidates: list[CandidateResult] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # labels not reached (interrupted)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    same_filesystem: bool | None = None
    total_seconds: float = 0.0
    source_seconds: float = 0.0  # scoring the source, timed here (child start, load, decode)

    def ranked(self) -> list[CandidateResult]:
        """Scored candidates by perplexity (lowest first), then the failed ones in their order."""
        ok = sorted((c for c in self.candidates if c.scores), key=lambda c: c.perplexity)
        return ok + [c for c in self.candidates if not c.scores]

    @property
    def best(self) -> CandidateResult | None:
        """The lowest perplexity among the scored plans that are not the source itself."""
        return next((c for c in self.ranked() if c.scores and not c.is_source), None)

    def overhead_seconds(self) -> float:
        """Time beyond evaluation: the total minus the source's and the candidates' scoring."""
        ev = self.source_seconds + sum(c.eval_seconds for c in self.candidates)
        return max(0.0, self.total_seconds - ev)

    def _vs_best(self, c: CandidateResult) -> dict[str, Any]:
        best = self.best
        if best is None or c.scores is None or best.scores is None:
            return {}
        ratio, unc = paired_ratio(c, best)
        return {"perplexity_ratio_to_best": ratio, "perplexity_ratio_to_best_uncertainty": unc}

    def to_dict(self) -> dict[str, Any]:
        ref = self.reference
        best = self.best
        return {
            "source": self.source,
            "text": self.text,
            "n_ctx": ref.n_ctx if ref else None,
            "windows": ref.windows_mode if ref else None,
            "n_tokens_scored": ref.n_scored if ref else None,
            "n_tokens_text": ref.n_tokens_text if ref else None,
            "source_perplexity": ref.perplexity if ref else None,
            "source_perplexity_uncertainty": ref.perplexity_uncertainty if ref else None,
            "source_n_layer": ref.n_layer if ref else None,
            "source_seconds": round(self.source_seconds, 3) if ref else None,
            "candidates": [{**c.to_dict(), **self._vs_best(c)} for c in self.ranked()],
            "best": best.label if best else None,
            "best_recipe_yaml": best.recipe_yaml if best else None,
            "pending": self.pending,
            "notes": self.notes,
            "interrupted": self.interrupted,
            "same_filesystem": self.same_filesystem,
            "total_seconds": round(self.total_seconds, 3),
            "overhead_seconds": round(self.overhead_seconds(), 3),
        }


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; `result` holds the candidates finished before it."""

    def __init__(self, result: SweepResult) -> None:
        super().__init__("the sweep was stopped")
        self.result = result


def _slices_text(prep: Prepared) -> str:
    parts = []
    for _oa, _ob, model, sa, sb, scaled in runs(prep.plan.layers):
        name = "" if len(prep.plan.models) == 1 else f"{model}:"
        parts.append(f"{name}{sa}:{sb + 1}{'*' if scaled else ''}")
    return ",".join(parts)


def _plan_key(prep: Prepared) -> str:
    """The plan as YAML with each model named by the file it resolved to, so a published YAML that
    names the source by its Hub name and --slices on the same file count as the same plan."""
    paths = {name: str(Path(m.path).resolve()) for name, m in prep.models.items()}
    r = prep.plan.recipe
    slices = [s.model_copy(update={"sources": [src.model_copy(update={"model": paths.get(src.model, src.model)})
                                               for src in s.sources]}) for s in r.slices]
    tok = paths.get(r.tokenizer_source, r.tokenizer_source) if r.tokenizer_source else None
    return r.model_copy(update={"slices": slices, "tokenizer_source": tok}).to_yaml()


def _is_source(prep: Prepared, slices: str) -> bool:
    """The plan (`slices`, its _slices_text) rebuilds its only source model layer for layer (e.g.
    --overlap 0): the control."""
    return len(prep.plan.models) == 1 and slices == f"0:{next(iter(prep.models.values())).block_count}"


def prepare_candidates(source: str, cands: list[Candidate], opts: SweepOptions) -> tuple[
        list[tuple[Candidate, Prepared]], list[str]]:
    """Plan every candidate (no tensor read), refusing the first bad one; drop duplicate plans."""
    if not cands:
        raise UpscaleError("no candidates: give --slices, --config, --preset (each repeatable), --overlap A..B "
                           "or --solar-drop A..B")
    preps = []
    for c in cands:
        try:
            preps.append(prepare(source, slices=c.slices, config=c.config, preset=c.preset, models=opts.models))
        except UpscaleError as e:
            raise type(e)(f"candidate {c.label}: {e}") from None
    keys = [_plan_key(p) for p in preps]
    kept, notes = dedupe(cands, keys)
    kept_ids = {id(c) for c in kept}  # by position, not label: two candidates may share a label
    return [(c, p) for c, p in zip(cands, preps) if id(c) in kept_ids], notes


def _build(prep: Prepared, dest: Path, opts: SweepOptions) -> Path:
    """Write the candidate as `upscale` does, or with --type as `run` does (no imatrix)."""
    out = prep.out
    if opts.quant_type is not None:
        from ..quant.quant_types import parse_quant_type
        from ..quant.quantizer import assign_types
        out = assign_types(out, parse_quant_type(opts.quant_type), mode=opts.mixture, plan=prep.plan,
                           models=prep.models)
    writer = GGUFOutput(out, dest, inputs=prep.input_paths)
    writer.check()
    if opts.quant_type is not None:
        return write_quantized(writer, entries={}, n_threads=opts.quant_threads, progress=None, log=None)[0][0]
    with TensorReader() as reader, Emitter(reader) as emitter:
        return writer.write(emitter)[0]


def _keep_name(label: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label).strip("-.") or "candidate"
    return f"{safe}.gguf"


Event = Callable[[str, Any], None]


def run_sweep(source: str, planned: list[tuple[Candidate, Prepared]], opts: SweepOptions, *,
              work_dir: Path, results_path: Path | None = None, keep_dir: Path | None = None,
              force: bool = False, notes: list[str] | None = None, on_event: Event | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> SweepResult:
    """Score the source once, then each planned candidate; see the module doc for the order of work.

    `on_event(kind, value)` reports "stage" (text), "source" (StoredReference) and "candidate"
    (CandidateResult) as they happen. Raises SweepInterrupted on Ctrl-C with the results so far.
    """
    t0 = time.perf_counter()
    emit = on_event or (lambda kind, value: None)
    src_path = planned[0][1].models[planned[0][1].plan.embed_model].path if planned else Path(source)
    result = SweepResult(str(src_path), opts.text_label, notes=list(notes or []))
    try:
        result.same_filesystem = os.stat(work_dir).st_dev == os.stat(src_path).st_dev
    except OSError:
        result.same_filesystem = None
    if keep_dir is not None:
        for c, _ in planned:
            dest = keep_dir / _keep_name(c.label)
            if dest.exists() and not force:
                raise UpscaleError(f"{dest} exists; pass --force to overwrite it")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=work_dir))
    except OSError as e:
        raise UpscaleError(f"cannot create a work folder in {work_dir}: {e.strerror or e}") from None
    save = (lambda: _save(result, results_path)) if results_path is not None else (lambda: None)
    result.pending = [c.label for c, _ in planned]
    try:
        ref_dir = tmp / "source"
        ref_dir.mkdir()
        emit("stage", f"scoring the source {src_path.name}")
        t_ref = time.perf_counter()
        result.reference = score_reference(src_path, ref_dir, text=opts.text, n_ctx=opts.n_ctx,
                                           max_tokens_scored=opts.max_tokens_scored, windows=opts.windows,
                                           n_threads=opts.eval_threads, progress=progress)
        result.source_seconds = time.perf_counter() - t_ref  # with the child's start, as candidates' are
        emit("source", result.reference)
        save()
        for i, (cand, prep) in enumerate(planned, 1):
            slices = _slices_text(prep)
            res = CandidateResult(cand.label, slices, prep.plan.block_count, prep.plan.recipe.to_yaml(),
                                  is_source=_is_source(prep, slices))
            emit("stage", f"[{i}/{len(planned)}] building {cand.label} ({prep.plan.block_count} layers)")
            dest = tmp / f"candidate-{i:03d}.gguf"
            try:
                _one(prep, dest, res, result.reference, opts, emit, progress, keep_dir, force, i, len(planned))
            finally:
                t = time.perf_counter()
                dest.unlink(missing_ok=True)
                res.cleanup_seconds += time.perf_counter() - t
            result.candidates.append(res)
            result.pending.pop(0)
            emit("candidate", res)
            save()
    except KeyboardInterrupt:
        result.interrupted = True
        result.total_seconds = time.perf_counter() - t0
        save()
        raise SweepInterrupted(result) from None
    except BaseException as e:  # an error that ends the sweep: the results file says where it stopped
        result.notes.append(f"the sweep stopped: {e}")
        result.total_seconds = time.perf_counter() - t0
        try:
            save()
        except UpscaleError:
            pass
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.total_seconds = time.perf_counter() - t0
    save()
    return result


def _one(prep: Prepared, dest: Path, res: CandidateResult, ref: StoredReference, opts: SweepOptions, emit: Event,
         progress: Callable[[str, int, int], None] | None, keep_dir: Path | None, force: bool, i: int,
         n: int) -> None:
    t = time.perf_counter()
    try:
        path = _build(prep, dest, opts)
    except UpscaleError as e:
        res.error = f"build failed: {e}"
        res.build_seconds = time.perf_counter() - t
        return
    res.build_seconds = time.perf_counter() - t
    res.size = path.stat().st_size
    emit("stage", f"[{i}/{n}] scoring {res.label}")
    t = time.perf_counter()
    try:
        res.scores = score_candidate(path, ref, n_threads=opts.eval_threads, progress=progress)
    except UpscaleError as e:  # EvalCrashed included: a crash costs this candidate only
        # the messages name the temporary file, which means nothing to the user: name the candidate
        res.error = str(e).replace(str(path), path.name).replace(path.name, repr(res.label))
    res.eval_seconds = time.perf_counter() - t
    if keep_dir is not None:
        t = time.perf_counter()
        kept = keep_dir / _keep_name(res.label)
        try:
            if kept.exists() and not force:
                raise UpscaleError(f"{kept} exists")
            shutil.move(str(path), kept)
        except (OSError, UpscaleError) as e:
            res.error = (res.error + "; " if res.error else "") + f"not kept: {e}"
        else:
            res.kept = str(kept)
        res.cleanup_seconds += time.perf_counter() - t


def _save(result: SweepResult, path: Path) -> None:
    import json

    try:
        atomic_write(path, (json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    except OSError as e:
        raise UpscaleError(f"cannot write {path}: {e.strerror or e}") from None
