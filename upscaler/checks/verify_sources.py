"""Which source GGUF is which recipe model: --source / --model, or the recorded file names found
next to the output or in the current folder.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError, SourceError, UpscaleError
from ..format.source import SourceModel, resolve_model_path
from ..planning.metadata import K_MODELS, K_SOURCE_BLOCKS
from ..planning.resolve import parse_model_options
from .verify_lineage import Lineage
from .verify_output import OutFile
from .verify_report import VerifyReport

# --------------------------------------------------------------------------- sources


def resolve_sources(out: OutFile, lin: Lineage, sources: list[str], models: list[str],
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


def _find_source(out: OutFile, name: str, file: str) -> str | None:
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


def check_source_fits(m: SourceModel, n_recorded: int | None, arch: str | None) -> None:
    where = f"source for model {m.name!r} ({m.path})"
    if arch is not None and m.arch != arch:
        raise SourceError(f"{where} is a {m.arch} model, the output is {arch} (wrong --source?)")
    if n_recorded is not None and m.block_count != n_recorded:
        raise SourceError(f"{where} has {m.block_count} layers; the output was made from a model with {n_recorded} "
                          f"({K_SOURCE_BLOCKS}): wrong --source?")
