"""The pipeline as a library: recipe -> plan -> output model (`prepare`), and the steps that quantize
(imatrix options, the quantized write, its summary).

The CLI, the tests and the scripts (bench, demo) all go through `prepare`; the CLI only parses
options and prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from .errors import ImatrixError, QuantizeError
from .format.source import KV, SourceModel, TensorReader
from .format.tensor_data import check_scalable
from .format.writer import GGUFOutput, Progress
from .planning.output import OutputModel, OutTensor, build_output
from .planning.plan import Plan, build_plan
from .planning.resolve import Resolved, resolve
from .quant.imatrix import ImatrixData, imatrix_metadata, load_imatrix, quantize_entries
from .quant.quant_types import TENSOR_TYPES_NEEDING_IMATRIX, QuantType
from .quant.quantizer import QuantEmitter, QuantStats

Warn = Callable[[list[str]], None]


@dataclass
class Prepared:
    """A recipe resolved against its sources, planned, and laid out as an output model (no tensor read yet)."""

    resolved: Resolved
    plan: Plan
    output: OutputModel | None  # None when prepared with output=False

    @property
    def models(self) -> dict[str, SourceModel]:
        return self.resolved.models

    @property
    def input_paths(self) -> list[Path]:
        return self.resolved.input_paths

    @property
    def out(self) -> OutputModel:
        """The output model (prepared with output=True, the default)."""
        if self.output is None:
            raise ValueError("prepared without an output model")
        return self.output

    @property
    def warnings(self) -> list[str]:
        return self.resolved.recipe.warnings + (self.output.warnings if self.output is not None else [])


def prepare(source: str | None = None, *, slices: str | None = None, config: str | None = None,
            preset: str | None = None, models: list[str] | None = None, name: str | None = None,
            output: bool = True, warn: Warn | None = None) -> Prepared:
    """Resolve the recipe options and model references, build the plan and (unless `output` is
    False) the output model, refusing any scale that cannot be applied. `warn` is given the
    recipe's warnings as soon as it is read, then the output's (so they show before a later error)."""
    res = resolve(source, slices=slices, config=config, preset=preset, model_opts=models)
    if warn is not None:
        warn(res.recipe.warnings)
    plan = build_plan(res.recipe, res.models)
    if not output:
        return Prepared(res, plan, None)
    out = build_output(plan, res.models, name=name)
    if warn is not None:
        warn(out.warnings)
    for t in out.tensors:
        check_scalable(t)
    return Prepared(res, plan, out)


@dataclass
class LoadedImatrix:
    path: str
    data: ImatrixData
    entries: dict[str, np.ndarray]

    def kvs(self) -> list[KV]:
        return [KV(k, v, t) for k, (t, v) in imatrix_metadata(self.data, self.path).items()]


def load_imatrix_option(path: str) -> LoadedImatrix:
    data = load_imatrix(path)
    return LoadedImatrix(path, data, quantize_entries(data))


def parse_imatrix_options(items: list[str] | None, model_names: list[str]) -> dict[str, LoadedImatrix]:
    """`--imatrix FILE` (one model) or `--imatrix NAME=FILE` per model."""
    out: dict[str, LoadedImatrix] = {}
    for item in items or []:
        name, eq, path = item.partition("=")
        if not eq or Path(item).exists():
            if len(model_names) != 1:
                raise ImatrixError(f"--imatrix {item}: the recipe has {len(model_names)} models; "
                                   "give one imatrix per model as --imatrix NAME=FILE")
            name, path = model_names[0], item
        if name not in model_names:
            raise ImatrixError(f"--imatrix {item}: no model named {name!r} in the recipe ({', '.join(model_names)})")
        out[name] = load_imatrix_option(path)
    return out


def source_imatrix_lookup(out: OutputModel, plan: Plan, per_model: dict[str, LoadedImatrix]) -> dict[str, np.ndarray]:
    """Output tensor name -> the source model's imatrix row (no copies: duplicated layers share arrays)."""
    if not per_model:
        return {}
    missing = [n for n in plan.models if n not in per_model]
    if missing:
        raise ImatrixError(f"no importance matrix for model {missing[0]!r}; give --imatrix {missing[0]}=FILE")
    table: dict[str, np.ndarray] = {}
    for t in out.tensors:
        row = per_model[plan.model_of(t.name)].entries.get(t.source.name)
        if row is not None:
            table[t.name] = row
    return table


def check_imatrix_coverage(out: OutputModel, qtype: QuantType, entries: dict[str, np.ndarray]) -> None:
    """Refuse up front, naming the tensor, where llama.cpp would bail out mid-file."""
    for t in out.tensors:
        if t.type == t.source.ggml_type and t.factor == 1.0:
            continue
        if t.name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
            continue
        needs = t.type in TENSOR_TYPES_NEEDING_IMATRIX or (
            t.type == Q.Q2_K and qtype.ftype == LlamaFileType.MOSTLY_Q2_K_S)
        if needs and t.name not in entries:
            hint = ("an importance matrix (--imatrix FILE)" if not entries else
                    "an importance matrix entry for it: the imatrix does not cover this tensor "
                    "(was it computed on the source? `gguf-upscale imatrix` carries it over to the upscaled numbering)")
            raise QuantizeError(f"{qtype.name} makes {t.name} {t.type.name}, which needs {hint}")


def write_quantized(writer: GGUFOutput, *, entries: dict[str, np.ndarray], n_threads: int,
                    progress: Progress | None, log: Callable[[str], None] | None) -> tuple[list[Path], QuantStats]:
    """Write `writer`'s (quantized) output model, each distinct tensor quantized once."""
    with TensorReader() as reader:
        emitter = QuantEmitter(reader, imatrix=entries, n_threads=n_threads, log=log)
        emitter.total = len(writer.model.tensors)
        try:
            paths = writer.write(emitter, progress)
        finally:
            emitter.close()
    return paths, emitter.stats


LOSSLESS = (Q.F32, Q.F16, Q.BF16)


def requantize_warning(out: OutputModel, allow_requantize: bool = False) -> str | None:
    """What re-quantizing an already quantized source costs, said once, after every check passed.

    llama-quantize refuses such tensors without --allow-requantize; we convert them either way and
    warn, unless the user gave --allow-requantize (they know). Nothing to say when no quantized
    tensor changes type, or when the target types are lossless (F16/BF16/F32 hold every value)."""
    if allow_requantize:
        return None
    changed = [t for t in out.tensors
               if t.source.ggml_type not in LOSSLESS and len(t.shape) >= 2
               and t.type != t.source.ggml_type and t.type not in LOSSLESS]
    if not changed:
        return None
    kinds = sorted({f"{t.source.ggml_type.name} -> {t.type.name}" for t in changed})
    return (f"re-quantizing {len(changed)} already quantized tensor(s) ({', '.join(kinds[:2])}"
            f"{', ...' if len(kinds) > 2 else ''}) compounds their errors; --allow-requantize silences this")


def whole_model(m: SourceModel) -> OutputModel:
    """A model as an output model unchanged (what `quantize` starts from)."""
    return OutputModel(kvs=list(m.kvs.values()), tensors=[OutTensor(t.name, t) for t in m.tensors.values()],
                       alignment=m.alignment)
