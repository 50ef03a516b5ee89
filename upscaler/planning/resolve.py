"""Turn CLI recipe options and model references into a Recipe and opened SourceModels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError, SourceError
from ..format.source import SourceModel, resolve_model_path
from .presets import preset_recipe
from .recipe import Recipe, load_yaml, parse_slices


@dataclass
class Resolved:
    recipe: Recipe
    models: dict[str, SourceModel]

    @property
    def input_paths(self) -> list[Path]:
        return [p for m in self.models.values() for p in m.paths]


def parse_model_options(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise RecipeError(f"--model {item!r}: expected NAME=PATH")
        out[name] = path
    return out


def choose_recipe(slices: str | None, config: str | None, preset: str | None) -> str:
    given = [n for n, v in (("--slices", slices), ("--config", config), ("--preset", preset)) if v]
    if len(given) != 1:
        raise RecipeError("give exactly one of --slices, --config or --preset"
                          + (f" (got {', '.join(given)})" if given else ""))
    return given[0]


def resolve(source: str | None, *, slices: str | None = None, config: str | None = None,
            preset: str | None = None, model_opts: list[str] | None = None) -> Resolved:
    """Load the recipe and open every model it names (headers only)."""
    kind = choose_recipe(slices, config, preset)
    named = parse_model_options(model_opts)
    opened: dict[str, SourceModel] = {}

    def open_model(name: str, ref: str) -> SourceModel:
        if name not in opened:
            opened[name] = SourceModel(ref, name=name)
        return opened[name]

    if kind == "--config":
        recipe = load_yaml(config)  # type: ignore[arg-type]
        names = recipe.model_names()
        for name in names:
            if name in named:
                open_model(name, named[name])
            elif source is not None and len(names) == 1:
                open_model(name, source)
            else:
                try:
                    resolve_model_path(name)
                except SourceError:
                    raise RecipeError(f"recipe names model {name!r}, which is not a GGUF file or folder here; "
                                      f"give it with --model {name}=PATH" +
                                      (" or as the positional SOURCE" if len(names) == 1 else "")) from None
                open_model(name, name)
        unused = set(named) - set(names)
        if unused:
            raise RecipeError(f"--model {sorted(unused)[0]} is not named in the recipe (it names: {', '.join(names)})")
        return Resolved(recipe, {n: opened[n] for n in names})

    # --slices / --preset: one model, the positional SOURCE (or a single --model)
    if source is None:
        if len(named) == 1:
            name, ref = next(iter(named.items()))
        else:
            raise RecipeError(f"{kind} needs the source model as the positional SOURCE argument")
    else:
        if len(named) > 0:
            raise RecipeError(f"{kind} takes one source model; --model is for --config recipes")
        name, ref = resolve_model_path(source).name, source
    model = open_model(name, ref)
    if kind == "--slices":
        recipe = parse_slices(slices, name)  # type: ignore[arg-type]
    else:
        recipe = preset_recipe(preset, model.block_count, name, model.arch)  # type: ignore[arg-type]
    return Resolved(recipe, {name: model})
