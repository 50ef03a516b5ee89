"""The output model: metadata plus an ordered list of output tensors, each a recipe over a source tensor.

Nothing here reads tensor data. The writer pulls bytes from each OutTensor in order; what a
tensor *is* (copy, zero, scale, quantize) is decided here and executed in `tensor_data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gguf import GGMLQuantizationType

from ..format.source import KV, SourceModel, SourceTensor
from .metadata import build_metadata
from .plan import Plan


@dataclass(frozen=True)
class OutTensor:
    """Output tensor `name` = `factor` x source tensor, stored as `ggml_type`."""

    name: str
    source: SourceTensor
    factor: float = 1.0
    ggml_type: GGMLQuantizationType | None = None  # None: the source's type (no re-quantization)
    n_bytes: int | None = None  # None: the source's size
    # mergekit's merge and output dtypes: a scale is computed through them (tensor_data.scale_values)
    dtype: str | None = None
    out_dtype: str | None = None

    @property
    def type(self) -> GGMLQuantizationType:
        return self.ggml_type if self.ggml_type is not None else self.source.ggml_type

    @property
    def size(self) -> int:
        return self.n_bytes if self.n_bytes is not None else self.source.n_bytes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def op(self) -> str:
        if self.factor == 0.0:
            return "zero"
        if self.factor != 1.0:
            return "scale"
        if self.ggml_type is not None and self.ggml_type != self.source.ggml_type:
            return "quantize"
        return "copy"

    @property
    def content_key(self) -> tuple:
        """Equal keys mean equal bytes: duplicated layers are computed once and reused."""
        return (str(self.source.path), self.source.offset, self.factor, int(self.type), self.dtype, self.out_dtype)


@dataclass
class OutputModel:
    kvs: list[KV]
    tensors: list[OutTensor]
    alignment: int
    warnings: list[str] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        return sum(t.size for t in self.tensors)

    def kv(self, key: str) -> KV | None:
        return next((kv for kv in self.kvs if kv.key == key), None)

    def with_tensors(self, tensors: list[OutTensor], kvs: list[KV] | None = None) -> OutputModel:
        return replace(self, tensors=tensors, kvs=kvs if kvs is not None else self.kvs)


def build_output(plan: Plan, models: dict[str, SourceModel], *, name: str | None = None) -> OutputModel:
    """Lay out the output tensors in the first model's order, with blocks renumbered."""
    kvs, notes = build_metadata(models, plan, name=name)
    emb = models[plan.embed_model]
    order = list(emb.tensors.values())
    first_block = next((i for i, t in enumerate(order) if t.block is not None), len(order))
    before = [t for t in order[:first_block] if t.block is None]
    after = [t for t in order[first_block:] if t.block is None]

    def global_tensor(t: SourceTensor) -> OutTensor:
        src_model = models[plan.model_of(t.name)]
        src = src_model.tensors.get(t.name, t)
        return scaled(t.name, src, plan.global_scales.get(t.name, 1.0))

    def scaled(name: str, src: SourceTensor, factor: float) -> OutTensor:
        if factor in (0.0, 1.0):
            return OutTensor(name, src, factor)
        return OutTensor(name, src, factor, dtype=plan.recipe.dtype, out_dtype=plan.recipe.out_dtype)

    tensors = [global_tensor(t) for t in before]
    for layer in plan.layers:
        m = models[layer.model]
        src_order = [t for t in m.tensors.values() if t.block == layer.source_layer]
        for t in src_order:
            tensors.append(scaled(f"blk.{layer.index}.{t.suffix}", t, layer.scale_of(t.suffix)))
    tensors += [global_tensor(t) for t in after]
    # a model with output.weight only in the head model (embed model tied) keeps whatever the head has
    head = models[plan.head_model]
    names = {t.name for t in tensors}
    for t in head.non_block_tensors:
        if t.name not in names and t.name.startswith("output"):
            tensors.append(scaled(t.name, t, plan.global_scales.get(t.name, 1.0)))
    return OutputModel(kvs=kvs, tensors=tensors, alignment=emb.alignment, warnings=notes)
