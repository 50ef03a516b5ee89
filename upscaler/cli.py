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
from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperCommand

from . import __version__
from .errors import UpscaleError
from .format.source import SourceModel, TensorReader
from .format.tensor_data import Emitter
from .format.writer import GGUFOutput, parse_size
from .pipeline import prepare
from .planning.metadata import base_models, recorded_lineage
from .progress import BarProgress
from .publish.report import PLAN_TYPES, human_bytes, human_count, layer_map, plan_stats, runs, size_table, type_counts

if TYPE_CHECKING:
    from .quant.quantizer import MixtureMode

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Build deeper GGUF models from layer slices of existing ones (mergekit passthrough "
                       "recipes, natively on GGUF), re-quantize them with llama.cpp, and prove they work.")

STATE = {"debug": False}


class _Command(TyperCommand):
    """Usage lines that name arguments as their metavar says (`[SOURCE]`, `IN.gguf`), not
    Typer's `[[SOURCE]]` / `{IN.gguf}`; arguments are described in each command's docstring."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for prm in self.get_params(ctx):
            if getattr(prm, "param_type_name", "") != "argument":
                continue
            name = prm.metavar or (prm.name or "").upper()
            name = name + ("..." if prm.nargs != 1 else "")
            pieces.append(name if prm.required else f"[{name}]")
        return pieces


SourceArg = typer.Argument(None, metavar="SOURCE", show_default=False, hidden=True)  # described in each docstring
SlicesOpt = typer.Option(None, "--slices", metavar="RANGES", help="Half-open layer ranges of SOURCE, e.g. "
                                                                  "0:40,20:60,40:80.")
ConfigOpt = typer.Option(None, "--config", metavar="YAML", help="A mergekit YAML recipe (passthrough, or linear with "
                                                                "one source per slice).")
PresetOpt = typer.Option(None, "--preset", metavar="NAME",
                         help="llama-pro[:every=K], overlap-halves or solar[:drop=M]; sized to the "
                              "source's depth.")
ModelOpt = typer.Option(None, "--model", metavar="NAME=PATH", help="A model named in the --config recipe (repeatable).")
CardOpt = typer.Option(True, "--model-card/--no-model-card",
                       help="Write a hub-style model card beside the output.")
CardPathOpt = typer.Option(None, "--model-card-path", metavar="PATH",
                           help="Where the card goes (default: OUT.md; a folder: FOLDER/README.md).")


def _echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def _warn(notes: list[str]) -> None:
    for n in notes:
        _echo_err(f"warning: {n}")


def _print_version(value: bool) -> None:
    """Eager, so `gguf-upscale --version` works without a command."""
    if value:
        typer.echo(f"gguf-upscale {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    STATE["debug"] = debug


def _card_destination(enabled: bool, path: Optional[Path], output: Path, force: bool) -> Optional[Path]:
    """The model card's path, checked before any work so a refusal costs nothing."""
    if not enabled:
        return None
    from .publish.model_card import card_path, check_card_writable
    dest = card_path(path if path is not None else output)
    check_card_writable(dest, force=force, owner=output)
    return dest


def _write_card(dest: Optional[Path], paths: list[Path], res, p, force: bool, quant_type: Optional[str] = None,
                smoke: Optional[dict[str, Any]] = None, quiet: bool = False) -> None:
    if dest is None:
        return
    import shlex

    from .publish.model_card import render_model_card, write_model_card
    try:
        card = render_model_card(paths, sources=res.models, recipe_yaml=p.recipe.to_yaml(), smoke=smoke,
                                 quant_type=quant_type, command_line=shlex.join(["gguf-upscale", *sys.argv[1:]]),
                                 plan=p)
        written = write_model_card(card, dest, force=force, owner=paths[0])
    except UpscaleError as e:
        raise UpscaleError(f"the output was written, but not its model card: {e}") from None
    from .publish.model_card import card_title
    m = SourceModel(paths[0])
    _, note = card_title({k: v.value for k, v in m.kvs.items()}, m.path)
    if note:
        _echo_err(f"note: {note}")
    if not quiet:
        typer.echo(f"  {written} (model card)")


def command(fn=None, **options: Any):
    """Register a command whose domain errors become one `error: ...` line and a non-zero exit.
    `options` go to Typer (e.g. an epilog): `@command(epilog=...)`."""
    if fn is None:
        return lambda f: command(f, **options)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:  # the reader went away (`| head`): quiet, like git or ls
            _quiet_stdout()
            raise typer.Exit(0) from None
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

    return app.command(cls=_Command, **options)(wrapper)


@command(short_help='Dry run: validate a recipe, show the layer map and sizes.')
def plan(source: Optional[str] = SourceArg, slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt,
         preset: Optional[str] = PresetOpt, model: Optional[list[str]] = ModelOpt,
         as_json: bool = typer.Option(False, "--json", help="Machine-readable plan on stdout.")) -> None:
    """Validate a recipe against the source and show the layer map, size and memory needed (dry run).

    SOURCE is the source GGUF: a file, any shard of a split set, or a folder holding one model.
    The recipe is one of --slices, --config or --preset.
    """
    prep = prepare(source, slices=slices, config=config, preset=preset, models=model, warn=_warn)
    res, p, out = prep.resolved, prep.plan, prep.out
    first = res.models[p.embed_model]
    n_head = _widest(first.arch_get("attention.head_count"), 1)
    n_head_kv = _widest(first.arch_get("attention.head_count_kv"), n_head)
    n_embd = int(first.arch_get("embedding_length") or 0)
    head_dim = int(first.arch_get("attention.key_length") or (n_embd // max(n_head, 1)))
    n_params = sum(t.source.n_elements for t in out.tensors)
    from .quant.quantizer import quantized_size
    sizes = {t: quantized_size(out, t) for t in PLAN_TYPES}
    stats = plan_stats(p, n_params, out.n_bytes, sizes, n_head_kv=n_head_kv, head_dim=head_dim)
    if as_json:
        doc = {"plan": p.to_dict(), "stats": stats.to_dict(), "recipe": p.recipe.to_yaml(),
               "warnings": res.recipe.warnings + out.warnings}
        typer.echo(json.dumps(doc, indent=2))
        return
    for name, info in p.models.items():
        typer.echo(f"source {name}: {info.arch}, {info.block_count} layers, {human_count(info.n_params)} params, "
                   f"{human_bytes(info.n_bytes)}")
        typer.echo(f"  {info.path}")
    typer.echo("")
    typer.echo(layer_map(p, columns=_columns()))
    typer.echo("")
    scaled = sum(1 for l in p.layers if l.scales)
    typer.echo(f"output: {p.block_count} layers ({scaled} with scaled tensors), {human_count(n_params)} parameters, "
               f"size label {getattr(out.kv('general.size_label'), 'value', None)}")
    typer.echo(f"size with the source's tensor types: {human_bytes(out.n_bytes)}")
    typer.echo("size as llama.cpp would quantize it, and RAM to run it:")
    typer.echo(size_table(stats))


def _columns() -> int:
    """The terminal's width ($COLUMNS first); 80 when not a terminal."""
    import shutil
    return shutil.get_terminal_size((80, 24)).columns


def _widest(value: Any, default: int) -> int:
    """A head count stored as a scalar or per layer (the widest layer sizes the KV cache)."""
    values = value if isinstance(value, list) else [value]
    nums = [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    return max(nums) if nums else default


@command(short_help='Write the upscaled GGUF, tensor types unchanged.')
def upscale(source: Optional[str] = SourceArg, slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt,
            preset: Optional[str] = PresetOpt, model: Optional[list[str]] = ModelOpt,
            output: Path = typer.Option(..., "-o", "--output", metavar="OUT.gguf", help="Output GGUF path."),
            split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="SIZE",
                         help="Split the output into shards of at most SIZE (K/M/G, decimal)."),
            name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="general.name of the output (the "
                                                                                    "model card's title)."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output (and its model card)."),
            model_card: bool = CardOpt, model_card_path: Optional[Path] = CardPathOpt,
            quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary.")) -> None:
    """Write the upscaled GGUF with tensor types unchanged (no re-quantization).

    SOURCE is the source GGUF: a file, any shard of a split set, or a folder holding one model.
    The recipe is one of --slices, --config or --preset.
    """
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
                   f"{human_bytes(_files_size(paths))}")
        for pth in paths:
            typer.echo(f"  {pth}")
    _write_card(card, paths, res, p, force, quiet=quiet)


QUANT_PANEL = "llama-quantize options"
TypeOpt = typer.Option("Q4_K_M", "--type", metavar="TYPE", rich_help_panel=QUANT_PANEL,
                       help="llama-quantize type (any case); see the list below.")
OutputTypeOpt = typer.Option(None, "--output-tensor-type", metavar="GGML_TYPE", rich_help_panel=QUANT_PANEL,
                             help="Use this ggml type for output.weight.")
EmbeddingTypeOpt = typer.Option(None, "--token-embedding-type", metavar="GGML_TYPE", rich_help_panel=QUANT_PANEL,
                                help="Use this ggml type for the token embeddings.")
LeaveOutputOpt = typer.Option(False, "--leave-output-tensor", rich_help_panel=QUANT_PANEL,
                              help="Leave output.weight un(re)quantized.")
PureOpt = typer.Option(False, "--pure", rich_help_panel=QUANT_PANEL,
                       help="No k-quant mixture: every tensor gets the type's default.")
TensorTypeOpt = typer.Option(None, "--tensor-type", metavar="PATTERN=TYPE", rich_help_panel=QUANT_PANEL,
                             help="Tensors matching regex PATTERN get ggml TYPE, e.g. attn_v=q8_0 "
                                  "(repeatable; first match wins).")
OverrideKvOpt = typer.Option(None, "--override-kv", metavar="KEY=TYPE:VALUE", rich_help_panel=QUANT_PANEL,
                             help="Set metadata KEY in the output; TYPE is int, float, bool or str "
                                  "(repeatable).")
AllowRequantOpt = typer.Option(False, "--allow-requantize", rich_help_panel=QUANT_PANEL,
                               help="Re-quantize already quantized tensors without a warning "
                                    "(llama-quantize refuses them without it).")
ThreadsOpt = typer.Option(None, "--threads", "-t", metavar="N", help="Worker threads (default: all cores).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Per-tensor lines and llama.cpp's log on stderr.")


def _threads(n: Optional[int]) -> int:
    if n is not None and n < 1:
        raise UpscaleError("--threads must be at least 1")
    return n or os.cpu_count() or 1


def _tensor_logger(verbose: bool):
    from .quant import llama_log
    llama_log.install(verbose=verbose)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        return lambda line: _echo_err(line)
    return None


def _files_size(paths: list[Path]) -> int:
    """Bytes on disk of the written files: the size the model card states too."""
    return sum(p.stat().st_size for p in paths)


def _quant_summary(stats, model_in_bytes: int, paths: list[Path], qtype_name: str) -> None:
    typer.echo(f"{qtype_name}: {human_bytes(model_in_bytes)} -> {human_bytes(_files_size(paths))} "
               f"({stats.seconds_quantizing:.1f} s quantizing)")
    typer.echo(f"  {stats.quantized} tensors quantized, {stats.copied} copied unchanged, "
               f"{stats.reused} reused from an identical one")
    for pth in paths:
        typer.echo(f"  {pth}")


def _quant_epilog() -> str:
    """llama-quantize's types with their bits per weight, for --help (three columns fit 80)."""
    from .quant.quant_types import QUANT_TYPES, approx_bits_per_weight
    cells = []
    for q in QUANT_TYPES:
        if q.only_copy:
            continue
        alias = "alias" in q.description
        bpw = "alias" if alias else f"{approx_bits_per_weight(q):.2f}"
        cells.append(f"{q.ftype:>2} {q.name:<9} {bpw:>5}")
    rows = -(-len(cells) // 3)
    cols = [cells[i * rows:(i + 1) * rows] for i in range(3)]
    lines = ["   ".join(c[r] for c in cols if r < len(c)) for r in range(rows)]
    # "\b" keeps Click from re-wrapping the table
    return ("TYPE is one of (number, name, typical bits per weight):\n\n\b\n" + "\n".join(lines)
            + "\n\nGGML_TYPE is one tensor type (ggml's name, any case), e.g. f16, bf16, q8_0, "
              "q6_K, q5_K, q4_K, iq4_xs or q4_0.")


def _mixture(output_tensor_type: Optional[str], token_embedding_type: Optional[str], leave_output_tensor: bool,
             pure: bool, tensor_type: Optional[list[str]]):
    """llama-quantize's mixture options, parsed with its rules (errors name the option)."""
    from .quant.llama_quant import Mixture, parse_ggml_type, parse_tensor_type
    try:
        out_t = parse_ggml_type(output_tensor_type) if output_tensor_type else None
    except UpscaleError as e:
        raise UpscaleError(f"--output-tensor-type: {e}") from None
    try:
        emb_t = parse_ggml_type(token_embedding_type) if token_embedding_type else None
    except UpscaleError as e:
        raise UpscaleError(f"--token-embedding-type: {e}") from None
    return Mixture(pure=pure, leave_output_tensor=leave_output_tensor, output_tensor_type=out_t,
                   token_embedding_type=emb_t, tensor_types=tuple(parse_tensor_type(t) for t in tensor_type or []))


def _kv_overrides(items: Optional[list[str]]) -> dict[str, Any]:
    from .quant.llama_quant import parse_kv_override
    out: dict[str, Any] = {}
    for item in items or []:
        key, value = parse_kv_override(item)
        out.pop(key, None)  # llama.cpp applies them in order: the last one of a key wins, at its place
        out[key] = value
    return out


@command(epilog=_quant_epilog(), short_help='Re-quantize a GGUF as llama-quantize does.')
def quantize(input: str = typer.Argument(..., metavar="IN.gguf", hidden=True),
             output: Path = typer.Option(..., "-o", "--output", metavar="OUT.gguf", help="Output GGUF path."),
             type_: str = TypeOpt,
             imatrix: Optional[str] = typer.Option(None, "--imatrix", metavar="FILE",
                                                   help="Importance matrix (legacy .dat or GGUF) for IN's tensors."),
             output_tensor_type: Optional[str] = OutputTypeOpt, token_embedding_type: Optional[str] = EmbeddingTypeOpt,
             leave_output_tensor: bool = LeaveOutputOpt, pure: bool = PureOpt,
             tensor_type: Optional[list[str]] = TensorTypeOpt, override_kv: Optional[list[str]] = OverrideKvOpt,
             allow_requantize: bool = AllowRequantOpt,
             keep_split: bool = typer.Option(False, "--keep-split", rich_help_panel=QUANT_PANEL,
                                             help="Write the output in the same shards as IN."),
             threads: Optional[int] = ThreadsOpt,
             split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="SIZE",
                         help="Split the output into shards of at most SIZE (K/M/G, decimal)."),
             force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
             verbose: bool = VerboseOpt) -> None:
    """Re-quantize a GGUF with llama.cpp's kernels, to the very types and bytes that llama-quantize writes.

    IN.gguf is a GGUF file or any shard of a set.
    """
    from .pipeline import check_imatrix_coverage, load_imatrix_option, requantize_warning, whole_model, write_quantized
    from .quant.quant_types import parse_quant_type
    from .quant.quantizer import assign_types
    qtype = parse_quant_type(type_)
    mixture = _mixture(output_tensor_type, token_embedding_type, leave_output_tensor, pure, tensor_type)
    overrides = _kv_overrides(override_kv)
    if keep_split and split_max_size:
        raise UpscaleError("--keep-split and --split-max-size exclude each other")
    log = _tensor_logger(verbose)
    model = SourceModel(input)
    model.check_loadable()
    im = load_imatrix_option(imatrix) if imatrix else None
    if qtype.needs_imatrix and im is None:
        raise UpscaleError(f"{qtype.name} needs an importance matrix: pass --imatrix FILE")
    out = assign_types(whole_model(model), qtype, imatrix_kvs=im.kvs() if im else None, has_imatrix=im is not None,
                       mixture=mixture, kv_overrides=overrides, keep_split=keep_split)
    entries = im.entries if im else {}
    check_imatrix_coverage(out, qtype, entries)
    shards = None
    if keep_split and len(model.paths) > 1:
        shards = [[t for t in out.tensors if t.source.path == pth] for pth in model.paths]
    writer = GGUFOutput(out, output, split_max_size=parse_size(split_max_size) if split_max_size else 0,
                        force=force, inputs=list(model.paths), shards=shards)
    writer.check()
    warn = requantize_warning(out, allow_requantize)
    if warn:
        _warn([warn])
    paths, stats = write_quantized(writer, entries=entries, n_threads=_threads(threads),
                                   progress=BarProgress("quantizing"), log=log)
    _quant_summary(stats, _files_size(list(model.paths)), paths, qtype.name)


@command(epilog=_quant_epilog(), short_help='Upscale + quantize (each tensor once) + smoke test.')
def run(source: Optional[str] = SourceArg, slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt,
        preset: Optional[str] = PresetOpt, model: Optional[list[str]] = ModelOpt,
        output: Path = typer.Option(..., "-o", "--output", metavar="OUT.gguf", help="Output GGUF path."),
        type_: str = TypeOpt,
        mixture: str = typer.Option("target", "--mixture", metavar="target|source", rich_help_panel=QUANT_PANEL,
                                    help="target: llama.cpp's types for the upscaled model; source: each "
                                         "layer keeps its source layer's types."),
        imatrix: Optional[list[str]] = typer.Option(None, "--imatrix", metavar="FILE", rich_help_panel=QUANT_PANEL,
                                                    help="The source's importance matrix (or NAME=FILE per model), "
                                                         "mapped to the new layers."),
        output_tensor_type: Optional[str] = OutputTypeOpt, token_embedding_type: Optional[str] = EmbeddingTypeOpt,
        leave_output_tensor: bool = LeaveOutputOpt, pure: bool = PureOpt,
        tensor_type: Optional[list[str]] = TensorTypeOpt, override_kv: Optional[list[str]] = OverrideKvOpt,
        allow_requantize: bool = AllowRequantOpt,
        threads: Optional[int] = ThreadsOpt,
        split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="SIZE",
                         help="Split the output into shards of at most SIZE (K/M/G, decimal)."),
        name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="general.name of the output (the model "
                                                                                "card's title)."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing output (and its model card)."),
        no_smoke: bool = typer.Option(False, "--no-smoke", help="Skip the smoke test."),
        model_card: bool = CardOpt, model_card_path: Optional[Path] = CardPathOpt,
        verbose: bool = VerboseOpt) -> None:
    """One pass: upscale, quantize each distinct tensor once (copies reuse the bytes), smoke-test.

    SOURCE is the source GGUF: a file, any shard of a split set, or a folder holding one model.
    The recipe is one of --slices, --config or --preset.
    """
    from .pipeline import (
        check_imatrix_coverage,
        parse_imatrix_options,
        requantize_warning,
        source_imatrix_lookup,
        write_quantized,
    )
    from .quant.quant_types import parse_quant_type
    from .quant.quantizer import assign_types
    mode = _mixture_mode(mixture)
    qtype = parse_quant_type(type_)
    mix = _mixture(output_tensor_type, token_embedding_type, leave_output_tensor, pure, tensor_type)
    overrides = _kv_overrides(override_kv)
    log = _tensor_logger(verbose)
    prep = prepare(source, slices=slices, config=config, preset=preset, models=model, name=name, warn=_warn)
    res, p, out = prep.resolved, prep.plan, prep.out
    ims = parse_imatrix_options(imatrix, list(p.models))
    if qtype.needs_imatrix and not ims:
        raise UpscaleError(f"{qtype.name} needs an importance matrix: pass --imatrix FILE (computed on the source)")
    first_im = next(iter(ims.values()), None)
    qout = assign_types(out, qtype, imatrix_kvs=first_im.kvs() if first_im else None, has_imatrix=bool(ims),
                        mode=mode, plan=p, models=res.models, mixture=mix,
                        kv_overrides=overrides)
    entries = source_imatrix_lookup(qout, p, ims)
    check_imatrix_coverage(qout, qtype, entries)
    split = parse_size(split_max_size) if split_max_size else 0
    writer = GGUFOutput(qout, output, split_max_size=split, force=force, inputs=res.input_paths)
    writer.check()  # the output's own refusals come first, then the card's
    card = _card_destination(model_card, model_card_path, output, force)
    warn = requantize_warning(qout, allow_requantize)
    if warn:
        _warn([warn])
    paths, stats = write_quantized(writer, entries=entries, n_threads=_threads(threads),
                                   progress=BarProgress("upscale+quantize"), log=log)
    typer.echo(f"wrote {p.block_count} layers ({mixture} mixture)")
    _quant_summary(stats, sum(t.source.n_bytes for t in out.tensors), paths, qtype.name)
    if no_smoke:
        _write_card(card, paths, res, p, force, quant_type=qtype.name)
        return
    from .checks.smoke import run_smoke
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
    from .checks.llama_params import physical_cores
    if n is not None and n < 1:
        raise UpscaleError("--threads must be at least 1")
    return n or physical_cores()


def _scoring_progress():
    """A progress callback drawing tokens scored, elapsed time and ETA on a terminal; None in pipes."""
    if not sys.stderr.isatty():
        return None
    from .checks.smoke_progress import ScoringProgress
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


SmokeThreadsOpt = typer.Option(None, "--threads", "-t", metavar="N",
                               help="llama.cpp threads (default: physical cores).")


@command(short_help="Prove a model loads, generates and scores text.")
def smoke(model_file: str = typer.Argument(..., metavar="MODEL.gguf", hidden=True),
          reference: Optional[str] = typer.Option(
              None, "--reference", metavar="SRC.gguf",
              help="Compare next-token distributions with this model (e.g. the source)."),
          text: Optional[Path] = typer.Option(
              None, "--text-file", "--text", metavar="FILE",
              help="Any UTF-8 text file to score (default: a built-in English/Japanese text)."),
          prompt: Optional[str] = typer.Option(None, "--prompt", metavar="TEXT", help="Prompt for greedy generation."),
          chat: bool = typer.Option(False, "--chat", help="Send the prompt through the model's own chat template."),
          n_predict: int = typer.Option(32, "--n-predict", metavar="N", help="Tokens to generate."),
          ctx: int = typer.Option(512, "--ctx", metavar="N", help="Context window for scoring."),
          max_tokens: int = typer.Option(1024, "--max-tokens", metavar="N",
                                         help="Score at most this many tokens of the text."),
          windows: str = typer.Option("sliding", "--windows", metavar="sliding|chunks",
                                      help="sliding: every token once, half a window of context; chunks: "
                                           "llama-perplexity's disjoint --ctx chunks, second half of each scored."),
          min_agreement: Optional[float] = typer.Option(
              None, "--min-agreement", metavar="X",
              help="Fail when top-1 agreement with --reference is lower (0..1)."),
          threads: Optional[int] = SmokeThreadsOpt,
          as_json: bool = typer.Option(False, "--json",
                                       help="Machine-readable report on stdout (also when a threshold fails)."),
          write_card: bool = typer.Option(False, "--write-card",
                                          help="Then write MODEL's model card with these figures (finishes a `run` "
                                               "whose smoke test did not)."),
          model: Optional[list[str]] = typer.Option(
              None, "--model", metavar="NAME=PATH",
              help="A source model named in MODEL's recipe, for --write-card (repeatable)."),
          model_card_path: Optional[Path] = CardPathOpt,
          force: bool = typer.Option(False, "--force", help="Overwrite an existing model card (--write-card)."),
          verbose: bool = VerboseOpt) -> None:
    """Prove a model works: it loads, generates, and scores text; optionally against a reference.

    MODEL.gguf is a GGUF file or the first shard of a set. llama.cpp runs in a child process on plain
    CPU buffers, so a crash inside it is one error line.
    """
    from .checks.smoke import SmokeThresholdError, run_smoke
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
        from .publish.model_card import render_model_card, write_model_card
        first = Path(rep.model)
        doc = render_model_card([first], sources=sources, recipe_yaml=None, smoke=rep.to_dict())
        written = write_model_card(doc, card, force=force, owner=first)
        _echo_err(f"wrote {written} (model card)") if as_json else typer.echo(f"  {written} (model card)")


def _card_for_smoke(model_file: Path, reference: Optional[str], model_opts: Optional[list[str]],
                    card_path_opt: Optional[Path], force: bool):
    """Where `smoke --write-card` writes, and the source models the card names (from MODEL's lineage)."""
    from .publish.model_card import card_path, check_card_writable
    if not model_file.exists():
        raise UpscaleError(f"{model_file}: no such file")
    out = SourceModel(model_file)
    lineage = recorded_lineage({k: v.value for k, v in out.kvs.items()})
    if lineage is None:
        raise UpscaleError(f"{out.path}: not an upscaled GGUF (no upscale.* lineage keys); --write-card needs one")
    from .planning.resolve import parse_model_options
    given = parse_model_options(model_opts)
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


@command(short_help='Carry an imatrix over to the upscaled layers.')
def imatrix(imatrix_file: list[str] = typer.Argument(..., metavar="IMATRIX", hidden=True),
            source: Optional[str] = typer.Option(None, "--source", metavar="SRC.gguf",
                                                 help="The source GGUF the imatrix was computed on (needed for "
                                                      "--preset; with --slices the imatrix tells the depth)."),
            slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt, preset: Optional[str] = PresetOpt,
            model: Optional[list[str]] = ModelOpt,
            output: Path = typer.Option(..., "-o", "--output", metavar="OUT", help="Output imatrix (same format as the "
                                                                                   "input)."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output.")) -> None:
    """Carry an importance matrix over to the upscaled layer numbering (copies for duplicated layers).

    IMATRIX is the imatrix computed on the source (legacy .dat or GGUF), or NAME=FILE per model of
    the recipe. The recipe is one of --slices, --config or --preset; --preset needs --source.
    """
    from .pipeline import parse_imatrix_options
    from .quant.imatrix import remap_imatrix, save_imatrix
    if source is None and not model:
        layer_map_, models, embed, head_m = _imatrix_recipe_layers(slices, config, preset)
        ims = parse_imatrix_options(imatrix_file, models)
        _check_imatrix_depth(layer_map_, ims)
    else:
        p = prepare(source, slices=slices, config=config, preset=preset, models=model, output=False,
                    warn=_warn).plan
        layer_map_, models, embed, head_m = p.layer_map(), list(p.models), p.embed_model, p.head_model
        ims = parse_imatrix_options(imatrix_file, models)
    missing = [n for n in models if n not in ims]
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
    head = {"output": head_m, "output_norm": head_m, "token_embd": embed}
    data = remap_imatrix({k: v.data for k, v in ims.items()}, layer_map_, non_block_model=head)
    save_imatrix(data, output)
    typer.echo(f"wrote {output}: {len(data.entries)} entries for {len(layer_map_)} layers "
               f"(from {sum(len(v.data.entries) for v in ims.values())} source entries)")


def _imatrix_recipe_layers(slices: Optional[str], config: Optional[str], preset: Optional[str]):
    """The layer map of a recipe that fixes every layer range, without opening the source.

    Returns (output layer -> (model, source layer), model names, embedding model, head model)."""
    from .planning.recipe import load_yaml, parse_slices
    from .planning.resolve import choose_recipe
    kind = choose_recipe(slices, config, preset)
    if kind == "--preset":
        raise UpscaleError("--preset sizes the recipe to the source's depth: give the source model with "
                           "--source SRC.gguf (or fixed ranges with --slices)")
    recipe = parse_slices(slices) if kind == "--slices" else load_yaml(config)  # type: ignore[arg-type]
    _warn(recipe.warnings)
    if recipe.method != "passthrough" or any(tuple(src.layer_range) == (0, -1)
                                              for sl in recipe.slices for src in sl.sources):
        raise UpscaleError("this recipe needs the source model to lay out its layers "
                           "(a linear merge or a whole-model `models:` entry): give it with --source SRC.gguf")
    layers = [(sl.sources[0].model, j) for sl in recipe.slices
              for j in range(sl.sources[0].layer_range[0], sl.sources[0].layer_range[1])]
    return layers, recipe.model_names(), layers[0][0], layers[-1][0]


def _check_imatrix_depth(layers: list[tuple[str, int]], ims: dict[str, Any]) -> None:
    """Without --source, the imatrix tells the source's depth: its highest blk.N entry."""
    import re
    for name, im in ims.items():
        blocks = [int(m.group(1)) for e in im.data.entries if (m := re.match(r"blk\.(\d+)\.", e))]
        depth = max(blocks) + 1 if blocks else 0
        used = [j for m, j in layers if m == name]
        if used and max(used) >= depth:
            raise UpscaleError(f"{im.path}: the recipe uses layer {max(used)} of {name}, but the imatrix covers "
                               f"{depth} layers (blk.0-{depth - 1}); was it computed on another model?")


def _mixture_mode(mixture: str) -> MixtureMode:
    """--mixture checked: whose llama.cpp type decisions a quantized output follows."""
    if mixture not in ("target", "source"):
        raise UpscaleError(f"--mixture must be target or source, got {mixture!r}")
    return "source" if mixture == "source" else "target"


def _check_new_file(path: Optional[Path], option: str, force: bool) -> None:
    """Refuse, before any work, an existing file the command would replace without --force."""
    if path is None:
        return
    if path.is_dir():
        raise UpscaleError(f"{option} {path}: is a folder")
    if path.exists() and not force:
        raise UpscaleError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise UpscaleError(f"{option} {path}: no such folder {path.parent}")


def _check_plot(plot: Optional[Path], force: bool) -> None:
    """--plot refused before the long evaluation: an existing file, or no matplotlib."""
    _check_new_file(plot, "--plot", force)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401 - only checking that it is installed
        except ImportError:
            raise UpscaleError("--plot needs matplotlib: pip install 'gguf-upscale[plot]'") from None


def _read_text_option(text: Optional[Path]) -> tuple[str, str]:
    """The --text-file's contents and how to name it; the built-in text without one."""
    from .checks.smoke import default_text
    if text is None:
        return default_text(), "the built-in text"
    try:
        body = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UpscaleError(f"{text}: cannot read as UTF-8 text ({e})") from None
    if not body.strip():
        raise UpscaleError(f"{text}: the text is empty")
    return body, text.name


@command(short_help="How much each layer changes the hidden state (block influence).")
def layers(model_file: str = typer.Argument(..., metavar="MODEL.gguf", hidden=True),
           text: Optional[Path] = typer.Option(None, "--text-file", metavar="FILE",
                                               help="UTF-8 text to measure on (default: a built-in "
                                                    "English/Japanese text)."),
           ctx: int = typer.Option(512, "--ctx", metavar="N", help="Window of tokens decoded together."),
           max_tokens: int = typer.Option(1024, "--max-tokens", metavar="N",
                                          help="Measure at most this many tokens of the text."),
           threads: Optional[int] = SmokeThreadsOpt,
           plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png",
                                               help="Also draw per-layer and span distances as a PNG (needs "
                                                    "matplotlib)."),
           force: bool = typer.Option(False, "--force", help="Overwrite an existing --plot file."),
           as_json: bool = typer.Option(False, "--json", help="Every layer's and span's figures as JSON."),
           verbose: bool = VerboseOpt) -> None:
    """Measure how much each layer, and each span of 2, 4 and 8 layers, changes the hidden state.

    The figure is the mean angular distance arccos(cos(input, output))/pi over the tokens of a text
    (ShortGPT's block influence; Gromov et al.'s span distance), read inside llama.cpp as it decodes.
    Layers that change the state little are the cheapest to repeat or drop; that is a guide for where
    to put a plan's seams, not a measure of quality: compare plans with `sweep`.
    """
    from .checks.layer_influence import measure_layers
    from .publish.layers_view import layer_lines, save_layers_plot
    _tensor_logger(verbose)
    if max_tokens < 1 or ctx < 8:
        raise UpscaleError("--max-tokens must be at least 1 and --ctx at least 8")
    body, label = _read_text_option(text)
    _check_plot(plot, force)
    prog = _scoring_progress()
    try:
        r = measure_layers(model_file, text=body, n_ctx=ctx, max_tokens=max_tokens,
                           n_threads=_smoke_threads(threads), progress=prog)
    finally:
        if prog is not None:
            prog.close()
    if as_json:
        typer.echo(json.dumps({**r.to_dict(), "text": label}, indent=2, ensure_ascii=False))
    else:
        for line in layer_lines(r, label, _columns(), sys.stdout.encoding):
            typer.echo(line)
    if plot is not None:
        save_layers_plot(r, plot, title=f"{Path(r.path).name}: change of the hidden state on {label}", force=True)


@command(short_help='Build and score candidate plans; rank them by perplexity.')
def sweep(source: str = typer.Argument(..., metavar="SOURCE", hidden=True),
          slices: Optional[list[str]] = typer.Option(None, "--slices", metavar="RANGES",
                                                     help="A candidate as layer ranges, e.g. 0:20,10:30 "
                                                          "(repeatable)."),
          config: Optional[list[str]] = typer.Option(None, "--config", metavar="YAML",
                                                     help="A candidate as a mergekit YAML (repeatable)."),
          preset: Optional[list[str]] = typer.Option(None, "--preset", metavar="NAME",
                                                     help="A candidate as a preset, e.g. solar:drop=8 "
                                                          "(repeatable)."),
          overlap: Optional[str] = typer.Option(None, "--overlap", metavar="A..B",
                                                help="The seed's family: three slices, consecutive ones sharing "
                                                     "K layers, for K in A..B (or A..B:STEP)."),
          solar_drop: Optional[str] = typer.Option(None, "--solar-drop", metavar="A..B",
                                                   help="SOLAR's family [0,n-m]+[m,n] for m in A..B."),
          model: Optional[list[str]] = ModelOpt,
          text: Optional[Path] = typer.Option(None, "--text-file", metavar="FILE",
                                              help="UTF-8 text to score on: your own kind of text (default: a "
                                                   "built-in English/Japanese text)."),
          ctx: int = typer.Option(512, "--ctx", metavar="N", help="Context window for scoring."),
          max_tokens: int = typer.Option(1024, "--max-tokens", metavar="N",
                                         help="Score at most this many tokens of the text."),
          windows: str = typer.Option("sliding", "--windows", metavar="sliding|chunks",
                                      help="Text windows, as smoke's --windows."),
          type_: Optional[str] = typer.Option(None, "--type", metavar="TYPE",
                                              help="Quantize each candidate as run does (default: tensor types "
                                                   "unchanged, as upscale)."),
          mixture: str = typer.Option("target", "--mixture", metavar="target|source",
                                      help="With --type: as run's --mixture; source re-uses a quantized "
                                           "source's bytes."),
          output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="RESULTS.json",
                                                help="Write the results here, updated after each candidate."),
          keep: Optional[Path] = typer.Option(None, "--keep", metavar="DIR",
                                              help="Keep each candidate's GGUF in DIR (default: removed)."),
          work_dir: Optional[Path] = typer.Option(None, "--work-dir", metavar="DIR",
                                                  help="Where candidates are built (default: the --keep DIR, else "
                                                       "beside RESULTS, else here); best on the source's filesystem."),
          save_best: Optional[Path] = typer.Option(None, "--save-best", metavar="FILE.yaml",
                                                   help="Write the best plan as mergekit YAML (for run --config)."),
          plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png",
                                              help="Also draw the chart as a PNG (needs matplotlib)."),
          threads: Optional[int] = SmokeThreadsOpt,
          force: bool = typer.Option(False, "--force", help="Overwrite existing RESULTS, kept models, plot "
                                                           "and best-plan files."),
          as_json: bool = typer.Option(False, "--json", help="The results as JSON on stdout."),
          verbose: bool = VerboseOpt) -> None:
    """Choose a recipe by measurement: build each candidate plan, score it against SOURCE on a text,
    rank the candidates by perplexity.

    SOURCE is the source GGUF (any shard of a set); it is scored once and every candidate is compared
    with it (KL divergence, top-1 agreement). Candidates are built one at a time in a temporary folder
    and removed after scoring; on a reflink filesystem holding SOURCE, tensors that line up on its
    blocks are shared with SOURCE instead of written. Closeness to the source is not quality:
    perplexity on your own kind of text (--text-file) is the proxy.
    """
    from .sweep import candidates as cands
    from .sweep.runner import SweepInterrupted, SweepOptions, prepare_candidates, run_sweep
    from .sweep.table import best_lines, chart_lines, result_line, save_plot, table_lines
    _tensor_logger(verbose)
    mode = _mixture_mode(mixture)
    if max_tokens < 1 or ctx < 8:
        raise UpscaleError("--max-tokens must be at least 1 and --ctx at least 8")
    from .checks.llama_session import WINDOWS
    if windows not in WINDOWS:
        raise UpscaleError(f"--windows must be one of {', '.join(WINDOWS)}, got {windows!r}")
    if type_ is not None:
        from .quant.quant_types import parse_quant_type
        parse_quant_type(type_)
    body, label = _read_text_option(text)
    _check_new_file(output, "-o", force)
    _check_new_file(save_best, "--save-best", force)
    _check_plot(plot, force)
    if keep is not None and keep.exists() and not keep.is_dir():
        raise UpscaleError(f"--keep {keep}: not a folder")
    if work_dir is not None and not work_dir.is_dir():
        raise UpscaleError(f"--work-dir {work_dir}: no such folder")
    given = cands.given(slices, config, preset)
    if overlap or solar_drop:
        depth = SourceModel(source).block_count
        given += cands.overlap_family(depth, overlap) if overlap else []
        given += cands.solar_family(depth, solar_drop) if solar_drop else []
    opts = SweepOptions(text=body, text_label=label, n_ctx=ctx, max_tokens_scored=max_tokens, windows=windows,
                        eval_threads=_smoke_threads(threads), quant_type=type_, mixture=mode,
                        quant_threads=_threads(threads), models=model)
    planned, notes = prepare_candidates(source, given, opts)
    if keep is not None:  # created only once every candidate is known to be good
        try:
            keep.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UpscaleError(f"--keep {keep}: cannot create it: {e.strerror or e}") from None
    work = work_dir or keep or (output.parent if output is not None else Path.cwd())
    quiet = as_json
    for n in notes:
        _echo_err(f"note: {n}")

    def on_event(kind: str, value: Any) -> None:
        if quiet:
            return
        if kind == "stage":
            _echo_err(f"sweep: {value}")
        elif kind == "source":
            _echo_err(f"sweep: source PPL {value.perplexity:.2f} ± {value.perplexity_uncertainty:.2f} "
                      f"({value.n_scored} tokens, {value.seconds:.1f} s)")
        elif kind == "candidate":
            _echo_err(f"sweep:   {result_line(value)}")

    prog = _scoring_progress()
    interrupted = None
    try:
        result = run_sweep(source, planned, opts, work_dir=work, results_path=output, keep_dir=keep, force=force,
                           notes=notes, on_event=on_event, progress=prog)
    except SweepInterrupted as e:
        result, interrupted = e.result, e
    finally:
        if prog is not None:
            prog.close()
    if result.same_filesystem is False and not quiet:
        _echo_err(f"note: {work} is not on the source's filesystem, so each candidate was written in full "
                  "(with --work-dir on the source's reflink filesystem, block-aligned tensors are shared)")
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        width = _columns()
        for line in [*table_lines(result, width), "", *chart_lines(result, width, sys.stdout.encoding),
                     "", *best_lines(result, width)]:
            typer.echo(line)
        if result.best is not None:
            typer.echo("\nthe best plan, as mergekit YAML (gguf-upscale run SOURCE --config FILE):\n")
            typer.echo(result.best.recipe_yaml.rstrip())
    if save_best is not None and result.best is not None:
        from .format.atomic import atomic_write
        atomic_write(save_best, result.best.recipe_yaml.encode("utf-8"))
    if plot is not None:
        save_plot(result, plot, force=True)  # refused up front when it existed without --force
    if interrupted is not None:
        where = f"; the results so far are in {output}" if output is not None else ""
        raise KeyboardInterrupt(f"the sweep was stopped after {len(result.candidates)} of "
                                f"{len(result.candidates) + len(result.pending)} candidates{where}")
    if result.best is None:
        raise UpscaleError("no candidate could be scored")


@command(short_help='Check an upscaled GGUF against its sources.')
def verify(file: str = typer.Argument(..., metavar="OUT.gguf", hidden=True),
           source: Optional[list[str]] = typer.Option(None, "--source", metavar="SRC.gguf",
                                                         help="Source GGUF it was made from (repeatable; default: "
                                                              "the recorded file names next to OUT or in the "
                                                              "current folder)."),
           model: Optional[list[str]] = typer.Option(
               None, "--model", metavar="NAME=PATH", help="A model named in the recorded recipe (repeatable)."),
           imatrix: Optional[list[str]] = typer.Option(
               None, "--imatrix", metavar="FILE",
               help="The importance matrix the output was quantized with (FILE or NAME=FILE, as given to run)."),
           threads: Optional[int] = ThreadsOpt,
           as_json: bool = typer.Option(False, "--json", help="Machine-readable report on stdout.")) -> None:
    """Check every tensor of an upscaled GGUF against its sources and the recipe recorded in it.

    OUT.gguf is an upscaled GGUF (any shard of a set).
    """
    from .checks.verify import format_report, verify_file
    rep = verify_file(file, sources=source, models=model, imatrix=imatrix, n_threads=_threads(threads),
                      progress=BarProgress("verifying"))
    typer.echo(json.dumps(rep.to_dict(), indent=2) if as_json else format_report(rep))
    if not rep.ok:
        raise UpscaleError(f"{rep.path}: {rep.problems_total} problem(s) found")


@command(short_help="Show a GGUF's metadata, tensor types and lineage.")
def inspect(file: str = typer.Argument(..., metavar="FILE.gguf", hidden=True),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable summary on stdout.")) -> None:
    """Show a GGUF's metadata summary, tensor types and recorded layer lineage.

    FILE.gguf is a GGUF file or any shard of a set.
    """
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
    from .planning.plan import OutputLayer
    layers = [OutputLayer(i, m, j, 0) for i, (m, j) in enumerate(lineage["layers"])]
    return "\n".join(f"  out {oa:>4}-{ob:<4} <- {m} {sa}-{sb}" for oa, ob, m, sa, sb, _ in runs(layers))


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe
    (the recipe of Python's signal documentation, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point. SIGTERM is turned into KeyboardInterrupt so writers clean up as on Ctrl-C; a file
    size limit (ulimit -f) makes writes fail with EFBIG, reported as errors, instead of killing us."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        app()
    except BrokenPipeError:  # e.g. `--help | head -1`, outside any command's own handling
        _quiet_stdout()
        sys.exit(0)


if __name__ == "__main__":
    main()
