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
from .pipeline import prepare
from .progress import BarProgress
from .report import COMPUTE_OVERHEAD, PLAN_TYPES, human_bytes, human_count, layer_map, plan_stats, runs, type_counts
from .source import BLOCK_RE, SourceModel, TensorReader
from .tensor_data import Emitter
from .writer import GGUFOutput, parse_size

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build deeper GGUF models from layer slices of existing ones (mergekit passthrough "
                       "recipes, natively on GGUF), re-quantize them with llama.cpp, and prove they work.")

STATE = {"debug": False}

SourceArg = typer.Argument(None, metavar="[SOURCE]",
                           help="Source GGUF: a file, any shard of a split set, or a folder holding one model.")
SlicesOpt = typer.Option(None, "--slices", help="Half-open layer ranges of SOURCE, e.g. 0:40,20:60,40:80.")
ConfigOpt = typer.Option(None, "--config", help="A mergekit YAML recipe (passthrough, or linear with one non-zero "
                                                "source per slice).")
PresetOpt = typer.Option(None, "--preset", help="overlap-halves | solar[:drop=M] | llama-pro[:every=K]; sized to "
                                                "SOURCE's depth.")
ModelOpt = typer.Option(None, "--model", help="NAME=PATH for a model named in the --config recipe (repeatable).")
CardOpt = typer.Option(True, "--model-card/--no-model-card",
                       help="Write a hub-style model card (lineage, recipe, license, files, smoke figures) beside the "
                            "output.")
CardPathOpt = typer.Option(None, "--model-card-path",
                           help="Where the model card goes (default: OUTPUT's name with .md; a folder means "
                                "FOLDER/README.md).")


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


def _card_destination(enabled: bool, path: Optional[Path], output: Path, force: bool) -> Optional[Path]:
    """The model card's path, checked before any work so a refusal costs nothing."""
    if not enabled:
        return None
    from .model_card import card_path, check_card_writable
    dest = card_path(path if path is not None else output)
    check_card_writable(dest, force=force)
    return dest


def _write_card(dest: Optional[Path], paths: list[Path], res, p, force: bool, quant_type: Optional[str] = None,
                smoke: Optional[dict[str, Any]] = None, quiet: bool = False) -> None:
    if dest is None:
        return
    import shlex

    from .model_card import render_model_card, write_model_card
    try:
        card = render_model_card(paths, sources=res.models, recipe_yaml=p.recipe.to_yaml(), smoke=smoke,
                                 quant_type=quant_type, command_line=shlex.join(["gguf-upscale", *sys.argv[1:]]),
                                 plan=p)
        written = write_model_card(card, dest, force=force)
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
    prep = prepare(source, slices=slices, config=config, preset=preset, models=model, warn=_warn)
    res, p, out = prep.resolved, prep.plan, prep.out
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
               f"size label {getattr(out.kv('general.size_label'), 'value', None)}")
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
                                                         help="Split output into shards of at most this size (K/M/G, "
                                                              "decimal)."),
            name: Optional[str] = typer.Option(None, "--name", help="general.name of the output."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output (and its model card)."),
            model_card: bool = CardOpt, model_card_path: Optional[Path] = CardPathOpt,
            quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary.")) -> None:
    """Write the upscaled GGUF with tensor types unchanged (no re-quantization)."""
    prep = prepare(source, slices=slices, config=config, preset=preset, models=model, name=name, warn=_warn)
    res, p, out = prep.resolved, prep.plan, prep.out
    split = parse_size(split_max_size) if split_max_size else 0
    writer = GGUFOutput(out, output, split_max_size=split, force=force, inputs=res.input_paths)
    writer.check()  # the output's own refusals come first, then the card's
    card = _card_destination(model_card, model_card_path, output, force)
    with TensorReader() as reader, Emitter(reader) as emitter:
        paths = writer.write(emitter, BarProgress("upscaling"))
    if not quiet:
        ops = type_counts([t.op for t in out.tensors])
        typer.echo(f"wrote {p.block_count} layers, {len(out.tensors)} tensors "
                   f"({', '.join(f'{v} {k}' for k, v in ops.items())}), "
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
             imatrix: Optional[str] = typer.Option(None, "--imatrix",
                                                   help="Importance matrix (legacy .dat or GGUF) matching IN's "
                                                        "tensor names."),
             threads: Optional[int] = ThreadsOpt,
             split_max_size: Optional[str] = typer.Option(
                 None, "--split-max-size", help="Split output into shards of at most this size (K/M/G)."),
             force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
             verbose: bool = VerboseOpt) -> None:
    """Re-quantize a GGUF with llama.cpp's kernels: the same types and bytes llama-quantize writes."""
    from .pipeline import check_imatrix_coverage, load_imatrix_option, requantize_warning, whole_model, write_quantized
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
                                                    help="The SOURCE's importance matrix (FILE, or NAME=FILE per "
                                                         "model); mapped to the new layers."),
        threads: Optional[int] = ThreadsOpt,
        split_max_size: Optional[str] = typer.Option(None, "--split-max-size",
                                                     help="Split output into shards of at most this size (K/M/G)."),
        name: Optional[str] = typer.Option(None, "--name", help="general.name of the output."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing output (and its model card)."),
        no_smoke: bool = typer.Option(False, "--no-smoke", help="Skip the smoke test."),
        model_card: bool = CardOpt, model_card_path: Optional[Path] = CardPathOpt,
        verbose: bool = VerboseOpt) -> None:
    """One pass: upscale, quantize each distinct tensor once (copies reuse the bytes), smoke-test."""
    from .pipeline import (
        check_imatrix_coverage,
        parse_imatrix_options,
        requantize_warning,
        source_imatrix_lookup,
        write_quantized,
    )
    from .quant_types import parse_quant_type
    from .quantizer import assign_types
    if mixture not in ("target", "source"):
        raise UpscaleError(f"--mixture must be target or source, got {mixture!r}")
    qtype = parse_quant_type(type_)
    log = _tensor_logger(verbose)
    prep = prepare(source, slices=slices, config=config, preset=preset, models=model, name=name, warn=_warn)
    res, p, out = prep.resolved, prep.plan, prep.out
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
    try:
        rep = run_smoke(paths[0], reference=ref, n_threads=_threads(threads))
    except UpscaleError as e:
        raise UpscaleError(f"the output was written but failed its smoke test (no model card written): {e}") from None
    _print_smoke(rep)
    _write_card(card, paths, res, p, force, quant_type=qtype.name, smoke=rep.to_dict())


def _print_smoke(rep) -> None:
    d = rep.to_dict()
    typer.echo(f"smoke: loaded, perplexity {d['perplexity']:.2f}"
               + (f" (reference {d['reference_perplexity']:.2f}), KL {d['kl_divergence']:.4f} nats, "
                  f"top-1 agreement {d['top1_agreement']:.1%}" if d.get("reference_perplexity") is not None else ""))
    typer.echo(f"smoke: generated {d['text']!r}")


@command
def smoke(model_file: str = typer.Argument(..., metavar="MODEL.gguf", help="A GGUF file or the first shard of a set."),
          reference: Optional[str] = typer.Option(
              None, "--reference", help="Compare next-token distributions with this model (e.g. the source)."),
          text: Optional[Path] = typer.Option(
              None, "--text", help="UTF-8 text file for perplexity (default: a built-in English/Japanese text)."),
          prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt for greedy generation."),
          chat: bool = typer.Option(False, "--chat", help="Send the prompt through the model's own chat template."),
          n_predict: int = typer.Option(32, "--n-predict", help="Tokens to generate."),
          ctx: int = typer.Option(512, "--ctx", help="Context window for scoring."),
          min_agreement: Optional[float] = typer.Option(
              None, "--min-agreement", help="Fail when top-1 agreement with --reference is lower (0..1)."),
          threads: Optional[int] = ThreadsOpt,
          as_json: bool = typer.Option(False, "--json", help="Machine-readable report on stdout."),
          verbose: bool = VerboseOpt) -> None:
    """Prove a model works: it loads, generates, and scores text; optionally against a reference."""
    from .smoke import run_smoke
    _tensor_logger(verbose)
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise UpscaleError("--min-agreement must be between 0 and 1")
    if min_agreement is not None and reference is None:
        raise UpscaleError("--min-agreement needs --reference")
    body = None
    if text is not None:
        try:
            body = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UpscaleError(f"{text}: cannot read as UTF-8 text ({e})") from None
    rep = run_smoke(model_file, reference=reference, text=body, prompt=prompt, chat=chat, n_predict=n_predict,
                    n_ctx=ctx, n_threads=_threads(threads), min_agreement=min_agreement)
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_smoke(rep)


@command
def imatrix(imatrix_file: list[str] = typer.Argument(
                ..., metavar="IMATRIX", help="The source's imatrix (FILE, or NAME=FILE per model of the recipe)."),
            source: Optional[str] = typer.Option(None, "--source", help="The source GGUF the imatrix was computed on."),
            slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt, preset: Optional[str] = PresetOpt,
            model: Optional[list[str]] = ModelOpt,
            output: Path = typer.Option(..., "-o", "--output", help="Output imatrix (same format as the input)."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output.")) -> None:
    """Carry an importance matrix over to the upscaled layer numbering (copies for duplicated layers)."""
    from .imatrix import remap_imatrix, save_imatrix
    from .pipeline import parse_imatrix_options
    p = prepare(source, slices=slices, config=config, preset=preset, models=model, output=False, warn=_warn).plan
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
    non_block = {n: p.model_of(n) for im in ims.values() for n in im.data.entries if not BLOCK_RE.match(n)}
    data = remap_imatrix({k: v.data for k, v in ims.items()}, p.layer_map(), non_block_model=non_block)
    save_imatrix(data, output)
    typer.echo(f"wrote {output}: {len(data.entries)} entries for {p.block_count} layers "
               f"(from {sum(len(v.data.entries) for v in ims.values())} source entries)")


@command
def verify(file: str = typer.Argument(..., metavar="OUT.gguf", help="An upscaled GGUF (any shard of a set)."),
           source: Optional[list[str]] = typer.Option(
               None, "--source", help="Source GGUF it was made from (repeatable; default: the recorded file names "
                                      "next to OUT or in the current folder)."),
           model: Optional[list[str]] = typer.Option(
               None, "--model", help="NAME=PATH for a model named in the recorded recipe (repeatable)."),
           imatrix: Optional[list[str]] = typer.Option(
               None, "--imatrix", help="The importance matrix the output was quantized with (FILE or NAME=FILE, "
                                       "as given to run)."),
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
