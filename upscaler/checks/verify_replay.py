"""Recipe replay without sources: the recorded recipe evaluated against the output's own tensors,
with the plan's own per-tensor rules (plan.scales_for, linear_choice, fill_global_scales).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import cast

from ..errors import RecipeError
from ..format.source import BLOCK_RE, SourceModel
from ..planning.metadata import K_MODELS, K_RECIPE
from ..planning.plan import OutputLayer, Plan, fill_global_scales, linear_choice, scales_for
from ..planning.recipe import Recipe
from .verify_lineage import Lineage
from .verify_output import OutFile


@dataclass(frozen=True)
class _RecTensor:
    """A tensor as the output shows it, standing in for its source tensor (no-sources mode)."""

    name: str
    suffix: str
    shape: tuple[int, ...]


class _RecordedModel:
    """What the recipe evaluation needs of a source model, rebuilt from the output alone."""

    def __init__(self, name: str, arch: str, block_count: int, blocks: dict[int, dict[str, _RecTensor]],
                 non_block: list[_RecTensor]) -> None:
        self.name, self.arch, self.block_count = name, arch, block_count
        self.blocks, self.non_block_tensors = blocks, non_block


def recipe_layers(recipe: Recipe, lin: Lineage, out: OutFile) -> tuple[list[OutputLayer], dict[str, float]]:
    """Re-evaluate the recipe without sources: output layers with their scales, and global scales.

    Mirrors plan.build_plan's loop; each source layer's tensor kinds are taken from the first
    output layer recorded as its copy.
    """
    by_layer: dict[int, dict[str, _RecTensor]] = defaultdict(dict)
    non_block: list[_RecTensor] = []
    for t in out.tensors.values():
        m = BLOCK_RE.match(t.name)
        if m:
            by_layer[int(m.group(1))][m.group(2)] = _RecTensor(t.name, m.group(2), t.shape)
        else:
            non_block.append(_RecTensor(t.name, t.name, t.shape))
    blocks: dict[str, dict[int, dict[str, _RecTensor]]] = {n: {} for n in lin.names}
    for i in sorted(by_layer):
        src = lin.layer(i)
        if src is not None and src[0] in blocks:
            blocks[src[0]].setdefault(src[1], by_layer[i])
    counts = dict(zip(lin.names, lin.block_counts))
    arch = out.arch or ""
    # recorded models stand in for SourceModels: the plan's rules read only arch, block_count,
    # blocks and non_block_tensors
    models = cast(dict[str, SourceModel],
                  {n: _RecordedModel(n, arch, counts.get(n, 0), blocks[n], non_block) for n in lin.names})
    for name in recipe.model_names():
        if name not in models:
            raise RecipeError(f"{K_RECIPE} names model {name!r}, which {K_MODELS} does not list")
    layers: list[OutputLayer] = []
    for si, s in enumerate(recipe.slices):
        src_idx, wf = (0, 1.0) if recipe.method == "passthrough" else linear_choice(recipe, si, models)
        chosen = s.sources[src_idx]
        a, b = chosen.layer_range
        for layer in range(a, b):
            tensors = models[chosen.model].blocks.get(layer)
            if not tensors:
                raise RecipeError(f"{K_RECIPE} puts layer {layer} of {chosen.model!r} at output layer {len(layers)}, "
                                  "but no output layer is recorded as its copy")
            pos = (layer - a) / (b - a - 1) if b - a > 1 else 1.0
            layers.append(OutputLayer(len(layers), chosen.model, layer, si,
                                      scales_for(recipe, si, src_idx, tensors, layer, pos, wf, arch)))
    if not layers:
        raise RecipeError(f"{K_RECIPE} produces no layers")
    plan = Plan(recipe=recipe, arch=arch, models={}, layers=layers,
                embed_model=layers[0].model if recipe.method == "linear" else recipe.slices[0].sources[0].model,
                head_model=layers[-1].model if recipe.method == "linear" else recipe.slices[-1].sources[0].model)
    fill_global_scales(plan, models)
    return layers, plan.global_scales
