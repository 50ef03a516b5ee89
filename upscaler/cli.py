"""The `gguf-upscale` command line. Errors are caught once, here: one line, non-zero exit."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer

from . import __version__
from .errors import UpscaleError
from .metadata import base_models, recorded_lineage
from .output import build_output
from .plan import build_plan
from .progress import BarProgress
from .report import (COMPUTE_OVERHEAD, PLAN_TYPES, human_bytes, human_count, layer_map, plan_stats, runs,
                     type_counts)
from .resolve import resolve
from .source import SourceModel, TensorReader
from .tensor_data import Emitter, check_scalable
from .writer import GGUFOutput, parse_size

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build deeper GGUF models from layer slices of existing ones (mergekit passthrough "
                       "recipes, natively on GGUF), re-quantize them with llama.cpp, and prove they work.")

STATE = {"debug": False}

SourceArg = typer.Argument(None, metavar="[SOURCE]",
                           help="Source GGUF: a file, any shard of a split set, or a folder holding one model.")
SlicesOpt = typer.Option(None, "--slices", help="Half-open layer ranges of SOURCE, e.g. 0:40,20:60,40:80.")
ConfigOpt = typer.Option(None, "--config", help="A mergekit YAML recipe (passthrough, or linear with one non-zero source per slice).")
PresetOpt = typer.Option(None, "--preset", help="overlap-halves | solar[:drop=M] | llama-pro[:every=K]; sized to SOURCE's depth.")
ModelOpt = typer.Option(None, "--model", help="NAME=PATH for a model named in the --config recipe (repeatable).")
CardOpt = typer.Option(True, "--model-card/--no-model-card",
                       help="Write a hub-style model card (lineage, recipe, license, files, smoke figures) beside the output.")
CardPathOpt = typer.Option(None, "--model-card-path",
                           help="Where the model card goes (default: OUTPUT's name with .md; a folder means FOLDER/README.md).")


def _echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def _warn(notes: list[str]) -> None:
    for n in notes:
        _echo_err(f"warning: {n}")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
          version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    STATE["debug"] = debug
    if version:
        typer.echo(f"gguf-upscale {__version__}")
        raise typer.Exit()


def _prepare(source: Optional[str], slices: Optional[str], config: Optional[str], preset: Optional[str],
             model: Optional[list[str]], name: Optional[str] = None):
    res = resolve(source, slices=slices, config=config, preset=preset, model_opts=model)
    _warn(res.recipe.warnings)
    plan = build_plan(res.recipe, res.models)
    out = build_output(plan, res.models, name=name)
    _warn(out.warnings)
    for t in out.tensors:
        check_scalable(t)
    return res, plan, out


def _card_destination(enabled: bool, path: Optional[Path], output: Path, force: bool) -> Optional[Path]:
    """The model card's path, checked before any work so a refusal costs nothing."""
    if not enabled:
        return None
    from .model_card import card_path, check_card_writable
    dest = card_path(path if path is not None else output)
    check_card_writable(dest, force=force, owner=output)
    return dest


def _write_card(dest: Optional[Path], paths: list[Path], res, p, force: bool, quant_type: Optional[str] = None,
                smoke: Optional[dict[str, Any]] = None, quiet: bool = False) -> None:
    if dest is None:
        return
    import shlex
    from .model_card import render_model_card, write_model_card
    try:
        card = render_model_card(paths, sources=res.models, recipe_yaml=p.recipe.to_yaml(), smoke=smoke,
                                 quant_type=quant_type, command_line=shlex.join(["gguf-upscale", *sys.argv[1:]]))
        written = write_model_card(card, dest, force=force, owner=paths[0])
    except UpscaleError as e:
        raise UpscaleError(f"the output was written, but not its model card: {e}") from None
    if not quiet:
        typer.echo(f"  {written} (model card)")


def command(fn):
    """Register a command whose domain errors become one `error: ...` line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UpscaleError as e:
            if STATE["debug"]:
                traceback.print_exc()
            _echo_err(f"error: {e}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:  # the writer says what became of the output
            _echo_err("error: interrupted" + (f"; {e}" if str(e) else ""))
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - last resort: one line unless --debug
            if STATE["debug"]:
                traceback.print_exc()
            _echo_err(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)")
            raise typer.Exit(2) from None

    return app.command()(wrapper)


@command
def plan(source: Optional[str] = SourceArg, slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt,
         preset: Optional[str] = PresetOpt, model: Optional[list[str]] = ModelOpt,
         as_json: bool = typer.Option(False, "--json", help="Machine-readable plan on stdout.")) -> None:
    """Validate a recipe against the source and show the layer map, size and memory needed (dry run)."""
    res, p, out = _prepare(source, slices, config, preset, model)
    first = res.models[p.embed_model]
    n_head = _widest(first.arch_get("attention.head_count"), 1)
    n_head_kv = _widest(first.arch_get("attention.head_count_kv"), n_head)
    n_embd = int(first.arch_get("embedding_length") or 0)
    head_dim = int(first.arch_get("attention.key_length") or (n_embd // max(n_head, 1)))
    n_params = sum(t.source.n_elements for t in out.tensors)
    from .quantizer import quantized_size
    sizes = {t: quantized_size(out, t) for t in PLAN_TYPES}
    stats = plan_stats(p, n_params, out.n_bytes, sizes, n_head_kv=n_head_kv, head_dim=head_dim)
    if as_json:
        doc = {"plan": p.to_dict(), "stats": stats.to_dict(), "recipe": p.recipe.to_yaml(),
               "warnings": res.recipe.warnings + out.warnings}
        typer.echo(json.dumps(doc, indent=2))
        return
    for name, info in p.models.items():
        typer.echo(f"source {name}: {info.arch}, {info.block_count} layers, {human_count(info.n_params)} params, "
                   f"{human_bytes(info.n_bytes)} ({info.path})")
    typer.echo("")
    typer.echo(layer_map(p))
    typer.echo("")
    scaled = sum(1 for l in p.layers if l.scales)
    typer.echo(f"output: {p.block_count} layers ({scaled} with scaled tensors), {human_count(n_params)} parameters, "
               f"size label {out.kv('general.size_label').value}")
    typer.echo(f"size with the source's tensor types: {human_bytes(out.n_bytes)}")
    typer.echo("size as llama.cpp would quantize it, and RAM to run it (weights + F16 KV cache at "
               f"{stats.to_dict()['context_for_ram']} tokens + ~{human_bytes(COMPUTE_OVERHEAD)} compute buffers):")
    for t, size in stats.sizes.items():
        typer.echo(f"  {t:<8} {human_bytes(size):>10}   RAM ~{human_bytes(stats.ram[t])}")


def _widest(value: Any, default: int) -> int:
    """A head count stored as a scalar or per layer (the widest layer sizes the KV cache)."""
    values = value if isinstance(value, list) else [value]
    nums = [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    return max(nums) if nums else default


@command
def upscale(source: Optional[str] = SourceArg, slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt,
            preset: Optional[str] = PresetOpt, model: Optional[list[str]] = ModelOpt,
            output: Path = typer.Option(..., "-o", "--output", help="Output GGUF path."),
            split_max_size: Optional[str] = typer.Option(None, "--split-max-size",
                                                         help="Split output into shards of at most this size (K/M/G, decimal)."),
            name: Optional[str] = typer.Option(None, "--name", help="general.name of the output."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output (and its model card)."),
            model_card: bool = CardOpt, model_card_path: Optional[Path] = CardPathOpt,
            quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary.")) -> None:
    """Write the upscaled GGUF with tensor types unchanged (no re-quantization)."""
    res, p, out = _prepare(source, slices, config, preset, model, name)
    split = parse_size(split_max_size) if split_max_size else 0
    writer = GGUFOutput(out, output, split_max_size=split, force=force, inputs=res.input_paths)
    writer.check()  # the output's own refusals come first, then the card's
    card = _card_destination(model_card, model_card_path, output, force)
    with TensorReader() as reader, Emitter(reader) as emitter:
        paths = writer.write(emitter, BarProgress("upscaling"))
    if not quiet:
        ops = type_counts([t.op for t in out.tensors])
        typer.echo(f"wrote {p.block_count} layers, {len(out.tensors)} tensors ({', '.join(f'{v} {k}' for k, v in ops.items())}), "
                   f"{human_bytes(out.n_bytes)}")
        for pth in paths:
            typer.echo(f"  {pth}")
    _write_card(card, paths, res, p, force, quiet=quiet)


ThreadsOpt = typer.Option(None, "--threads", "-t", help="Worker threads (default: all cores).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Per-tensor lines and llama.cpp's own log on stderr.")


def _threads(n: Optional[int]) -> int:
    if n is not None and n < 1:
        raise UpscaleError("--threads must be at least 1")
    return n or os.cpu_count() or 1


def _tensor_logger(verbose: bool):
    from . import llama_log
    llama_log.install(verbose=verbose)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        return lambda line: _echo_err(line)
    return None


def _quant_summary(stats, model_in_bytes: int, paths: list[Path], qtype_name: str) -> None:
    typer.echo(f"{qtype_name}: {human_bytes(model_in_bytes)} -> {human_bytes(stats.bytes_out)}; "
               f"{stats.quantized} tensors quantized, {stats.copied} copied unchanged, "
               f"{stats.reused} reused from an identical earlier tensor ({stats.seconds_quantizing:.1f} s quantizing)")
    for pth in paths:
        typer.echo(f"  {pth}")


@command
def quantize(input: str = typer.Argument(..., metavar="IN.gguf", help="A GGUF file or any shard of a set."),
             output: Path = typer.Option(..., "-o", "--output", help="Output GGUF path."),
             type_: str = typer.Option("Q4_K_M", "--type", help="llama-quantize type name (case-insensitive)."),
             imatrix: Optional[str] = typer.Option(None, "--imatrix", help="Importance matrix (legacy .dat or GGUF) matching IN's tensor names."),
             threads: Optional[int] = ThreadsOpt,
             split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Split output into shards of at most this size (K/M/G)."),
             force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
             verbose: bool = VerboseOpt) -> None:
    """Re-quantize a GGUF with llama.cpp's kernels: the same types and bytes llama-quantize writes."""
    from .pipeline import (check_imatrix_coverage, load_imatrix_option, requantize_warning, whole_model,
                           write_quantized)
    from .quant_types import parse_quant_type
    from .quantizer import assign_types
    qtype = parse_quant_type(type_)
    log = _tensor_logger(verbose)
    model = SourceModel(input)
    model.check_loadable()
    warn = requantize_warning([model])
    if warn:
        _warn([warn])
    im = load_imatrix_option(imatrix) if imatrix else None
    if qtype.needs_imatrix and im is None:
        raise UpscaleError(f"{qtype.name} needs an importance matrix: pass --imatrix FILE")
    out = assign_types(whole_model(model), qtype, imatrix_kvs=im.kvs() if im else None, has_imatrix=im is not None)
    entries = im.entries if im else {}
    check_imatrix_coverage(out, qtype, entries)
    writer = GGUFOutput(out, output, split_max_size=parse_size(split_max_size) if split_max_size else 0,
                        force=force, inputs=list(model.paths))
    paths, stats = write_quantized(writer, entries=entries, n_threads=_threads(threads),
                                   progress=BarProgress("quantizing"), log=log)
    _quant_summary(stats, model.n_bytes, paths, qtype.name)


@command
def run(source: Optional[str] = SourceArg, slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt,
        preset: Optional[str] = PresetOpt, model: Optional[list[str]] = ModelOpt,
        output: Path = typer.Option(..., "-o", "--output", help="Output GGUF path."),
        type_: str = typer.Option("Q4_K_M", "--type", help="llama-quantize type name (case-insensitive)."),
        mixture: str = typer.Option("target", "--mixture",
                                    help="target: exactly llama.cpp's types for the upscaled model; "
                                         "source: each layer keeps its source layer's types (copies identical)."),
        imatrix: Optional[list[str]] = typer.Option(None, "--imatrix",
                                                    help="The SOURCE's importance matrix (FILE, or NAME=FILE per model); mapped to the new layers."),
        threads: Optional[int] = ThreadsOpt,
        split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Split output into shards of at most this size (K/M/G)."),
        name: Optional[str] = typer.Option(None, "--name", help="general.name of the output."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing output (and its model card)."),
        no_smoke: bool = typer.Option(False, "--no-smoke", help="Skip the smoke test."),
        model_card: bool = CardOpt, model_card_path: Optional[Path] = CardPathOpt,
        verbose: bool = VerboseOpt) -> None:
    """One pass: upscale, quantize each distinct tensor once (copies reuse the bytes), smoke-test."""
    from .pipeline import (check_imatrix_coverage, parse_imatrix_options, requantize_warning,
                           source_imatrix_lookup, write_quantized)
    from .quant_types import parse_quant_type
    from .quantizer import assign_types
    if mixture not in ("target", "source"):
        raise UpscaleError(f"--mixture must be target or source, got {mixture!r}")
    qtype = parse_quant_type(type_)
    log = _tensor_logger(verbose)
    res, p, out = _prepare(source, slices, config, preset, model, name)
    warn = requantize_warning(list(res.models.values()))
    if warn:
        _warn([warn])
    ims = parse_imatrix_options(imatrix, list(p.models))
    if qtype.needs_imatrix and not ims:
        raise UpscaleError(f"{qtype.name} needs an importance matrix: pass --imatrix FILE (computed on the source)")
    first_im = next(iter(ims.values()), None)
    qout = assign_types(out, qtype, imatrix_kvs=first_im.kvs() if first_im else None, has_imatrix=bool(ims),
                        mode=mixture, plan=p, models=res.models)  # type: ignore[arg-type]
    entries = source_imatrix_lookup(qout, p, ims)
    check_imatrix_coverage(qout, qtype, entries)
    split = parse_size(split_max_size) if split_max_size else 0
    writer = GGUFOutput(qout, output, split_max_size=split, force=force, inputs=res.input_paths)
    writer.check()  # the output's own refusals come first, then the card's
    card = _card_destination(model_card, model_card_path, output, force)
    paths, stats = write_quantized(writer, entries=entries, n_threads=_threads(threads),
                                   progress=BarProgress("upscale+quantize"), log=log)
    typer.echo(f"wrote {p.block_count} layers ({mixture} mixture)")
    _quant_summary(stats, sum(t.source.n_bytes for t in out.tensors), paths, qtype.name)
    if no_smoke:
        _write_card(card, paths, res, p, force, quant_type=qtype.name)
        return
    from .smoke import run_smoke
    ref = res.models[p.embed_model].path
    finish = _finish_command(paths[0], ref, res, card, model_card_path, threads)
    kept = f"{paths[0]} is complete and kept"
    prog = _scoring_progress()
    try:
        rep = run_smoke(paths[0], reference=ref, n_threads=_smoke_threads(threads), progress=prog)
    except UpscaleError as e:
        raise UpscaleError(f"{kept}, but its smoke test failed: {e}. To finish: {finish}") from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{kept}, its smoke test was stopped. To finish: {finish}") from None
    except Exception as e:  # noqa: BLE001 - a bug in the smoke step must not hide what became of the output
        if STATE["debug"]:
            traceback.print_exc()
        raise UpscaleError(f"{kept}, but its smoke test failed with an internal error "
                           f"({type(e).__name__}: {e}). To finish: {finish}") from None
    finally:
        if prog is not None:
            prog.close()
    _print_smoke(rep)
    _write_card(card, paths, res, p, force, quant_type=qtype.name, smoke=rep.to_dict())


def _finish_command(first: Path, ref: Path, res, card: Optional[Path], card_path_opt: Optional[Path],
                    threads: Optional[int]) -> str:
    """The one command that re-runs the smoke test on a written output and writes its model card."""
    import shlex
    args = ["gguf-upscale", "smoke", str(first), "--reference", str(ref)]
    if card is not None:
        args.append("--write-card")
        if card_path_opt is not None:
            args += ["--model-card-path", str(card)]
        if len(res.models) > 1:
            for name, m in res.models.items():
                args += ["--model", f"{name}={m.path}"]
    if threads is not None:
        args += ["--threads", str(threads)]
    return shlex.join(args)


def _smoke_threads(n: Optional[int]) -> int:
    """llama.cpp's decode threads: physical cores by default (hyper-threads and busy cores slow it)."""
    from .llama_params import physical_cores
    if n is not None and n < 1:
        raise UpscaleError("--threads must be at least 1")
    return n or physical_cores()


def _scoring_progress():
    """A progress callback drawing tokens scored, elapsed time and ETA on a terminal; None in pipes."""
    if not sys.stderr.isatty():
        return None
    from .smoke_progress import ScoringProgress
    return ScoringProgress()


def _print_smoke(rep) -> None:
    """The figures as a compact table (80 columns); llama-perplexity's names in brackets."""
    d = rep.to_dict()
    facts = lambda n_layer, n_params: (f" ({n_layer} layers, {human_count(n_params)} params)"  # noqa: E731
                                       if n_layer and n_params else "")
    typer.echo(f"smoke: loaded {Path(d['model']).name}{facts(d.get('n_layer'), d.get('n_params'))}")
    typer.echo(f"smoke: generated {d['text']!r}")
    of = f" of {d['n_tokens_text']}" if d.get("n_tokens_text") else ""
    typer.echo(f"smoke: {d['n_tokens_scored']} tokens scored{of}, context {d['n_ctx']}, {d['windows']} windows")
    ref = d.get("reference_perplexity") is not None
    if ref:
        typer.echo(f"smoke: reference {Path(d['reference']).name}"
                   f"{facts(d.get('reference_n_layer'), d.get('reference_n_params'))}, same windows")

    def row(label: str, value: str, unc: str = "") -> None:
        typer.echo(f"  {label:<36}{value:>12}" + (f"  ± {unc}" if unc else ""))

    def num(x: Optional[float], spec: str = ".4f") -> str:
        return "" if x is None else format(x, spec)

    row("perplexity" + (", model  [PPL(Q)]" if ref else ""), num(d["perplexity"]),
        num(d.get("perplexity_uncertainty")))
    if not ref:
        return
    row("perplexity, reference  [PPL(base)]", num(d["reference_perplexity"]),
        num(d.get("reference_perplexity_uncertainty")))
    row("ratio  [PPL(Q)/PPL(base)]", num(d["perplexity_ratio"]), num(d.get("perplexity_ratio_uncertainty")))
    row("KL divergence, mean (nats)  [KLD]", num(d["kl_divergence"], ".6f"),
        num(d.get("kl_divergence_uncertainty"), ".6f"))
    row("KL divergence, median", num(d.get("kl_divergence_median"), ".6f"))
    row("KL divergence, 99th percentile", num(d.get("kl_divergence_p99"), ".6f"))
    row("KL divergence, maximum", num(d.get("kl_divergence_max"), ".6f"))
    unc = d.get("top1_agreement_uncertainty")
    row("top-1 agreement  [same top p]", f"{d['top1_agreement'] * 100:.3f} %",
        f"{unc * 100:.3f} %" if unc is not None else "")


SmokeThreadsOpt = typer.Option(None, "--threads", "-t", help="llama.cpp threads (default: physical cores).")


@command
def smoke(model_file: str = typer.Argument(..., metavar="MODEL.gguf", help="A GGUF file or the first shard of a set."),
          reference: Optional[str] = typer.Option(None, "--reference", help="Compare next-token distributions with this model (e.g. the source)."),
          text: Optional[Path] = typer.Option(None, "--text-file", "--text", help="Any UTF-8 text file to score (default: a built-in English/Japanese text)."),
          prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt for greedy generation."),
          chat: bool = typer.Option(False, "--chat", help="Send the prompt through the model's own chat template."),
          n_predict: int = typer.Option(32, "--n-predict", help="Tokens to generate."),
          ctx: int = typer.Option(512, "--ctx", help="Context window for scoring."),
          max_tokens: int = typer.Option(1024, "--max-tokens", help="Score at most this many tokens of the text."),
          windows: str = typer.Option("sliding", "--windows",
                                      help="sliding: every token once, half a window of context; chunks: "
                                           "llama-perplexity's disjoint --ctx chunks, second half of each scored."),
          min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Fail when top-1 agreement with --reference is lower (0..1)."),
          threads: Optional[int] = SmokeThreadsOpt,
          as_json: bool = typer.Option(False, "--json", help="Machine-readable report on stdout (also when a threshold fails)."),
          write_card: bool = typer.Option(False, "--write-card",
                                          help="Then write MODEL's model card with these figures (finishes a `run` "
                                               "whose smoke test did not)."),
          model: Optional[list[str]] = typer.Option(None, "--model", help="NAME=PATH of a source model named in MODEL's recipe (--write-card, several sources)."),
          model_card_path: Optional[Path] = CardPathOpt,
          force: bool = typer.Option(False, "--force", help="Overwrite an existing model card (--write-card)."),
          verbose: bool = VerboseOpt) -> None:
    """Prove a model works: it loads, generates, and scores text; optionally against a reference."""
    from .smoke import SmokeThresholdError, run_smoke
    _tensor_logger(verbose)
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise UpscaleError("--min-agreement must be between 0 and 1")
    if min_agreement is not None and reference is None:
        raise UpscaleError("--min-agreement needs --reference")
    if max_tokens < 1:
        raise UpscaleError("--max-tokens must be at least 1")
    body = None
    if text is not None:
        try:
            body = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UpscaleError(f"{text}: cannot read as UTF-8 text ({e})") from None
    card = None
    if write_card:  # every refusal before the evaluation, so a refusal costs nothing
        card, sources = _card_for_smoke(Path(model_file), reference, model, model_card_path, force)
    prog = _scoring_progress()
    try:
        rep = run_smoke(model_file, reference=reference, text=body, prompt=prompt, chat=chat, n_predict=n_predict,
                        n_ctx=ctx, max_tokens_scored=max_tokens, n_threads=_smoke_threads(threads),
                        min_agreement=min_agreement, windows=windows, progress=prog)
    except SmokeThresholdError as e:
        if as_json:
            typer.echo(json.dumps(e.report.to_dict(), indent=2, ensure_ascii=False))
        raise
    finally:
        if prog is not None:
            prog.close()
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_smoke(rep)
    if card is not None:
        from .model_card import render_model_card, write_model_card
        first = Path(rep.model)
        doc = render_model_card([first], sources=sources, recipe_yaml=None, smoke=rep.to_dict())
        written = write_model_card(doc, card, force=force, owner=first)
        _echo_err(f"wrote {written} (model card)") if as_json else typer.echo(f"  {written} (model card)")


def _card_for_smoke(model_file: Path, reference: Optional[str], model_opts: Optional[list[str]],
                    card_path_opt: Optional[Path], force: bool):
    """Where `smoke --write-card` writes, and the source models the card names (from MODEL's lineage)."""
    from .model_card import card_path, check_card_writable
    if not model_file.exists():
        raise UpscaleError(f"{model_file}: no such file")
    out = SourceModel(model_file)
    lineage = recorded_lineage({k: v.value for k, v in out.kvs.items()})
    if lineage is None:
        raise UpscaleError(f"{out.path}: not an upscaled GGUF (no upscale.* lineage keys); --write-card needs one")
    given: dict[str, str] = {}
    for item in model_opts or []:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UpscaleError(f"--model {item}: expected NAME=PATH")
        given[name] = path
    names = list(lineage["source_models"])
    if len(names) == 1 and names[0] not in given and reference is not None:
        given[names[0]] = reference
    missing = [n for n in names if n not in given]
    if missing:
        raise UpscaleError(f"--write-card: {out.path.name} was made from {', '.join(names)}; give "
                           + ("--reference SOURCE" if len(names) == 1 else "--model NAME=PATH for each") +
                           f" (missing: {', '.join(missing)})")
    sources = {n: SourceModel(given[n]) for n in names}
    dest = card_path(card_path_opt if card_path_opt is not None else out.path)
    check_card_writable(dest, force=force, owner=out.path)
    return dest, sources


@command
def imatrix(imatrix_file: list[str] = typer.Argument(..., metavar="IMATRIX", help="The source's imatrix (FILE, or NAME=FILE per model of the recipe)."),
            source: Optional[str] = typer.Option(None, "--source", help="The source GGUF the imatrix was computed on."),
            slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt, preset: Optional[str] = PresetOpt,
            model: Optional[list[str]] = ModelOpt,
            output: Path = typer.Option(..., "-o", "--output", help="Output imatrix (same format as the input)."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output.")) -> None:
    """Carry an importance matrix over to the upscaled layer numbering (copies for duplicated layers)."""
    from .imatrix import remap_imatrix, save_imatrix
    from .pipeline import parse_imatrix_options
    res = resolve(source, slices=slices, config=config, preset=preset, model_opts=model)
    _warn(res.recipe.warnings)
    p = build_plan(res.recipe, res.models)
    ims = parse_imatrix_options(imatrix_file, list(p.models))
    missing = [n for n in p.models if n not in ims]
    if missing:
        raise UpscaleError(f"no importance matrix for model {missing[0]!r}; give {missing[0]}=FILE")
    if output.exists() and not force:
        raise UpscaleError(f"{output}: already exists (use --force to overwrite)")
    for im in ims.values():
        if Path(im.path).resolve() == output.resolve():
            raise UpscaleError(f"{output}: output would overwrite one of its inputs")
    fmt = next(iter(ims.values())).data.format
    if (fmt == "gguf") != (output.suffix == ".gguf"):
        raise UpscaleError(f"{output}: the input imatrix is in {'GGUF' if fmt == 'gguf' else 'legacy .dat'} format "
                           "and the output keeps it; name the output accordingly")
    head = {"output": p.head_model, "output_norm": p.head_model, "token_embd": p.embed_model}
    data = remap_imatrix({k: v.data for k, v in ims.items()}, p.layer_map(), non_block_model=head)
    save_imatrix(data, output)
    typer.echo(f"wrote {output}: {len(data.entries)} entries for {p.block_count} layers "
               f"(from {sum(len(v.data.entries) for v in ims.values())} source entries)")


@command
def verify(file: str = typer.Argument(..., metavar="OUT.gguf", help="An upscaled GGUF (any shard of a set)."),
           source: Optional[list[str]] = typer.Option(None, "--source", help="Source GGUF it was made from (repeatable; default: the recorded file names next to OUT or in the current folder)."),
           model: Optional[list[str]] = typer.Option(None, "--model", help="NAME=PATH for a model named in the recorded recipe (repeatable)."),
           imatrix: Optional[list[str]] = typer.Option(None, "--imatrix", help="The importance matrix the output was quantized with (FILE or NAME=FILE, as given to run)."),
           threads: Optional[int] = ThreadsOpt,
           as_json: bool = typer.Option(False, "--json", help="Machine-readable report on stdout.")) -> None:
    """Check every tensor of an upscaled GGUF against its sources and the recipe recorded in it."""
    from .verify import format_report, verify_file
    rep = verify_file(file, sources=source, models=model, imatrix=imatrix, n_threads=_threads(threads),
                      progress=BarProgress("verifying"))
    typer.echo(json.dumps(rep.to_dict(), indent=2) if as_json else format_report(rep))
    if not rep.ok:
        raise UpscaleError(f"{rep.path}: {rep.problems_total} problem(s) found")


@command
def inspect(file: str = typer.Argument(..., metavar="FILE.gguf", help="A GGUF file or any shard of a set."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable summary on stdout.")) -> None:
    """Show a GGUF's metadata summary, tensor types and recorded layer lineage."""
    m = SourceModel(file)
    kv = {k: v.value for k, v in m.kvs.items()}
    lineage = recorded_lineage(kv)
    types = type_counts([t.ggml_type.name for t in m.tensors.values()])
    summary: dict[str, Any] = {
        "path": str(m.path), "files": [str(p) for p in m.paths], "architecture": m.arch,
        "name": kv.get("general.name"), "size_label": kv.get("general.size_label"),
        "block_count": m.arch_get("block_count"), "file_type": kv.get("general.file_type"),
        "parameters": m.n_params, "tensor_bytes": m.n_bytes, "tensor_count": len(m.tensors),
        "tensor_types": types, "tied_embeddings": "output.weight" not in m.tensors,
        "base_models": base_models(kv), "license": kv.get("general.license"), "lineage": lineage,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    typer.echo(f"{summary['name'] or m.path.name}  ({m.arch}, {summary['block_count']} layers, "
               f"{human_count(m.n_params)} params, {human_bytes(m.n_bytes)}"
               + (f", {len(m.paths)} shards" if len(m.paths) > 1 else "") + ")")
    typer.echo("tensor types: " + ", ".join(f"{k} x{v}" for k, v in types.items()))
    if summary["base_models"]:
        typer.echo("base models: " + "; ".join(b.get("name", "?") for b in summary["base_models"]))
    if lineage:
        typer.echo(f"upscaled by {lineage['tool']} from {', '.join(lineage['source_models'])}; layer map:")
        typer.echo(_lineage_text(lineage))
    else:
        typer.echo("no upscale lineage recorded")


def _lineage_text(lineage: dict[str, Any]) -> str:
    from .plan import OutputLayer
    layers = [OutputLayer(i, m, j, 0) for i, (m, j) in enumerate(lineage["layers"])]
    return "\n".join(f"  out {oa:>4}-{ob:<4} <- {m} {sa}-{sb}" for oa, ob, m, sa, sb, _ in runs(layers))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point. SIGTERM is turned into KeyboardInterrupt so writers clean up as on Ctrl-C; a file
    size limit (ulimit -f) makes writes fail with EFBIG, reported as errors, instead of killing us."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()


if __name__ == "__main__":
    main()
