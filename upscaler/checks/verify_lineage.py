"""The lineage an upscaled GGUF records (`upscale.*` keys) and its recorded recipe, read back.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from ..errors import RecipeError, UpscaleError
from ..planning.metadata import K_FILES, K_LAYER_INDEX, K_LAYER_MODEL, K_MODELS, K_RECIPE, K_SOURCE_BLOCKS
from ..planning.recipe import MergeConfig, Recipe, load_yaml_document, normalize_config
from .verify_output import OutFile
from .verify_report import VerifyReport

# --------------------------------------------------------------------------- recipe and lineage


@dataclass
class Lineage:
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


def read_lineage(out: OutFile, report: VerifyReport) -> Lineage:
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

    return Lineage(names=items(K_MODELS, str), files=items(K_FILES, str), block_counts=items(K_SOURCE_BLOCKS, int),
                    layer_model=items(K_LAYER_MODEL, int), layer_index=items(K_LAYER_INDEX, int),
                    recipe_text=out.get(K_RECIPE))


def recorded_recipe(lin: Lineage) -> Recipe:
    """The recorded YAML as a Recipe. A `models:` recipe is recorded with layer_range [0, -1]
    ("the whole model"), which the slices form rejects; it is filled in from the recorded depth."""
    text = lin.recipe_text
    if not isinstance(text, str):
        raise RecipeError(f"{K_RECIPE} is missing or not a string")
    doc, _ = load_yaml_document(text, K_RECIPE)  # the size cap and shape checks every recipe gets
    counts = dict(zip(lin.names, lin.block_counts))
    if isinstance(doc, dict) and isinstance(doc.get("slices"), list):
        for s in doc["slices"]:
            for src in (s.get("sources") or []) if isinstance(s, dict) else []:
                whole = isinstance(src, dict) and list(src.get("layer_range") or []) == [0, -1]
                if whole and src.get("model") in counts:
                    src["layer_range"] = [0, counts[src["model"]]]
    if not isinstance(doc, dict):
        raise RecipeError(f"{K_RECIPE} is not a recipe mapping")
    try:
        cfg = MergeConfig.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(f"{K_RECIPE}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return normalize_config(cfg, K_RECIPE)
