"""The `gguf-upscale` command line. Errors are caught once, here: one line, non-zero exit."""

from __future__ import annotations

import functools
import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer

from . import __version__
from .errors import UpscaleError
from .metadata import recorded_lineage
from .output import build_output
from .plan import build_plan
from .progress import BarProgress
from .report import human_bytes, human_count, layer_map, plan_stats, runs, type_counts
from .resolve import resolve
from .source import SourceModel, TensorReader
from .tensor_data import check_scalable, emit
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
        except KeyboardInterrupt:
            _echo_err("error: interrupted; no output was left behind")
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
    n_head = int(first.arch_get("attention.head_count") or 1)
    n_head_kv = first.arch_get("attention.head_count_kv", n_head)
    n_head_kv = int(max(n_head_kv) if isinstance(n_head_kv, list) else n_head_kv)
    n_embd = int(first.arch_get("embedding_length") or 0)
    head_dim = int(first.arch_get("attention.key_length") or (n_embd // max(n_head, 1)))
    n_params = sum(t.source.n_elements for t in out.tensors)
    stats = plan_stats(p, n_params, out.n_bytes, n_head_kv=n_head_kv, head_dim=head_dim)
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
    typer.echo("approximate size and RAM to run (weights + F16 KV cache at "
               f"{stats.to_dict()['context_for_ram']} tokens):")
    for t, size in stats.sizes.items():
        typer.echo(f"  {t:<8} {human_bytes(size):>10}   RAM ~{human_bytes(stats.ram[t])}")


@command
def upscale(source: Optional[str] = SourceArg, slices: Optional[str] = SlicesOpt, config: Optional[str] = ConfigOpt,
            preset: Optional[str] = PresetOpt, model: Optional[list[str]] = ModelOpt,
            output: Path = typer.Option(..., "-o", "--output", help="Output GGUF path."),
            split_max_size: Optional[str] = typer.Option(None, "--split-max-size",
                                                         help="Split output into shards of at most this size (K/M/G, decimal)."),
            name: Optional[str] = typer.Option(None, "--name", help="general.name of the output."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary.")) -> None:
    """Write the upscaled GGUF with tensor types unchanged (no re-quantization)."""
    res, p, out = _prepare(source, slices, config, preset, model, name)
    split = parse_size(split_max_size) if split_max_size else 0
    writer = GGUFOutput(out, output, split_max_size=split, force=force, inputs=res.input_paths)
    with TensorReader() as reader:
        paths = writer.write(lambda t, sink: emit(t, reader, sink), BarProgress("upscaling"))
    if not quiet:
        ops = type_counts([t.op for t in out.tensors])
        typer.echo(f"wrote {p.block_count} layers, {len(out.tensors)} tensors ({', '.join(f'{v} {k}' for k, v in ops.items())}), "
                   f"{human_bytes(out.n_bytes)}")
        for pth in paths:
            typer.echo(f"  {pth}")


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
        "base_models": _base_models(kv), "license": kv.get("general.license"), "lineage": lineage,
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


def _base_models(kv: dict[str, Any]) -> list[dict[str, Any]]:
    n = int(kv.get("general.base_model.count") or 0)
    out = []
    for i in range(n):
        prefix = f"general.base_model.{i}."
        out.append({k[len(prefix):]: v for k, v in kv.items() if k.startswith(prefix)})
    return out


def _lineage_text(lineage: dict[str, Any]) -> str:
    from .plan import OutputLayer
    layers = [OutputLayer(i, m, j, 0) for i, (m, j) in enumerate(lineage["layers"])]
    return "\n".join(f"  out {oa:>4}-{ob:<4} <- {m} {sa}-{sb}" for oa, ob, m, sa, sb, _ in runs(layers))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point. SIGTERM is turned into KeyboardInterrupt so writers clean up as on Ctrl-C."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    main()
