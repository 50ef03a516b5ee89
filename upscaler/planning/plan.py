"""The plan: which source layer lands at each output position, and how each tensor is treated.

Built from a normalized recipe and the source models' headers (already in memory), before a
single tensor byte is read. Every check that can fail is made here, so errors surface in
`plan` exactly as they would in `upscale`, never half-way through a 200 GB write.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import RecipeError
from ..format.source import BLOCK_RE, SourceModel, SourceTensor
from . import archs
from .llama_limits import LLAMA_MAX_LAYERS
from .recipe import NORMALIZE, SCALE, WEIGHT, Recipe, lookup_parameter

# GGUF tensor kind -> the HF name mergekit filters see (llama naming; most archs share it)
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
HF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Metadata keys that must agree for two models to be stacked (after "{arch}.")
COMPAT_KEYS = ("embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
               "attention.key_length", "attention.value_length", "rope.dimension_count",
               "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size", "context_length",
               # global hyper-parameters every layer runs with (gemma, cohere, granite, phi3, MoE)
               "attention.layer_norm_epsilon", "attention.sliding_window", "rope.freq_base_swa",
               "attn_logit_softcapping", "final_logit_softcapping", "logit_scale", "residual_scale",
               "embedding_scale", "attention.scale", "rope.scaling.type", "rope.scaling.factor",
               "expert_count", "expert_used_count")


def hf_tensor_name(suffix: str, layer: int | None, arch: str | None = None) -> str:
    """The name a mergekit filter is matched against: the tensor's HF name as `arch`'s checkpoint
    has it (mergekit sees only those), at the source model's layer number (mergekit resolves
    per-input parameters against the input tensor's name)."""
    base, _, kind = suffix.rpartition(".")  # "attn_output.weight" -> ("attn_output", "weight")
    if layer is None:
        return f"{HF_GLOBAL.get(base, base)}.{kind}"
    hf = archs.hf_name(arch, base) or HF_NAMES.get(base, base)
    if ".experts." in hf:  # mergekit's stacked expert tensors carry no ".weight"
        return f"model.layers.{layer}.{hf}"
    return f"model.layers.{layer}.{hf}.{kind}"


@dataclass(frozen=True)
class OutputLayer:
    """Output block `index` is source block `source_layer` of `model`, with per-tensor scales."""

    index: int
    model: str
    source_layer: int
    slice_index: int
    scales: tuple[tuple[str, float], ...] = ()  # (tensor suffix, factor) for factors != 1

    def scale_of(self, suffix: str) -> float:
        for s, f in self.scales:
            if s == suffix:
                return f
        return 1.0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    arch: str
    block_count: int
    n_params: int
    n_bytes: int


@dataclass
class Plan:
    recipe: Recipe
    arch: str
    models: dict[str, ModelInfo]
    layers: list[OutputLayer]
    embed_model: str  # token_embd and other input-side globals (mergekit: the first slice's model)
    head_model: str  # output_norm / output (mergekit: the last slice's model)
    global_scales: dict[str, float] = field(default_factory=dict)  # non-block tensor -> factor

    @property
    def block_count(self) -> int:
        return len(self.layers)

    def is_identity(self) -> bool:
        return (len(self.models) == 1 and all(
            l.source_layer == l.index and not l.scales for l in self.layers)
            and len(self.layers) == next(iter(self.models.values())).block_count
            and not self.global_scales)

    def layer_map(self) -> list[tuple[str, int]]:
        """(model, source layer) of each output layer: the layer layout lineage, imatrix remap and checks use."""
        return [(l.model, l.source_layer) for l in self.layers]

    def model_of(self, tensor_name: str) -> str:
        """The recipe model output tensor `tensor_name` comes from: its layer's model for `blk.N.*`,
        mergekit's rule for the rest (`global_source`). The one place that decides it."""
        m = BLOCK_RE.match(tensor_name)
        if m and int(m.group(1)) < len(self.layers):
            return self.layers[int(m.group(1))].model
        return global_source(tensor_name, self)

    def scale_of(self, tensor_name: str) -> float:
        """The factor output tensor `tensor_name` is scaled by (1.0: unscaled)."""
        m = BLOCK_RE.match(tensor_name)
        if m and int(m.group(1)) < len(self.layers):
            return self.layers[int(m.group(1))].scale_of(m.group(2))
        return self.global_scales.get(tensor_name, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.arch,
            "block_count": self.block_count,
            "models": {k: vars(v) for k, v in self.models.items()},
            "embed_model": self.embed_model,
            "head_model": self.head_model,
            "layers": [{"index": l.index, "model": l.model, "source_layer": l.source_layer,
                        "slice": l.slice_index, "scales": dict(l.scales)} for l in self.layers],
            "global_scales": self.global_scales,
        }


def global_source(name: str, plan: Plan) -> str:
    """mergekit's rule: output-side tensors from the last slice's model, the rest from the first's."""
    return plan.head_model if name.startswith("output") else plan.embed_model


def _check_compatible(models: dict[str, SourceModel]) -> None:
    names = list(models)
    first = models[names[0]]
    for other_name in names[1:]:
        other = models[other_name]
        where = f"models {names[0]!r} and {other_name!r}"
        if other.arch != first.arch:
            raise RecipeError(f"{where} differ in architecture ({first.arch} vs {other.arch})")
        for key in COMPAT_KEYS:
            a, b = first.arch_get(key), other.arch_get(key)
            if a != b:
                raise RecipeError(f"{where} differ in {first.arch}.{key} ({a} vs {b})")
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            if first.get(key) != other.get(key):
                raise RecipeError(f"{where} use different tokenizers ({key}: {first.get(key)} vs {other.get(key)})")
        if _digest(first.get("tokenizer.ggml.tokens")) != _digest(other.get("tokenizer.ggml.tokens")):
            raise RecipeError(f"{where} have different vocabularies (tokenizer.ggml.tokens differ)")
        a_shapes = {t.suffix: t.shape for t in first.blocks.get(0, {}).values()}
        b_shapes = {t.suffix: t.shape for t in other.blocks.get(0, {}).values()}
        if a_shapes != b_shapes:
            diff = sorted(set(a_shapes.items()) ^ set(b_shapes.items()))
            raise RecipeError(f"{where} have differently shaped layers (first difference: {diff[0][0]})")
        for t in ("token_embd.weight", "output.weight"):
            ta, tb = first.tensors.get(t), other.tensors.get(t)
            if (ta is None) != (tb is None) or (ta and tb and ta.shape != tb.shape):
                raise RecipeError(f"{where} differ in {t} (shape or presence)")


def _digest(value: Any) -> str | None:
    if value is None:
        return None
    h = hashlib.sha256()
    for item in value:
        h.update(str(item).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def scales_for(recipe: Recipe, slice_idx: int, src_idx: int, tensors: dict[str, SourceTensor],
                layer: int, t: float, weight_factor: float, arch: str | None = None) -> tuple[tuple[str, float], ...]:
    """Per-tensor factors of one output layer, as mergekit resolves them.

    passthrough: the source's `scale` (None: unscaled) times `weight_factor`. linear: `scale`
    is not one of its parameters (mergekit ignores it); the factor is the chosen source's
    `weight` where `normalize` is false for that tensor, else 1 (`weight_factor` is ignored:
    a gradient weight differs per tensor).
    """
    out = []
    for suffix in sorted(tensors):
        name = hf_tensor_name(suffix, layer, arch)
        if recipe.method == "linear":
            factor = _linear_factor(recipe, slice_idx, src_idx, name, t)
        else:
            scale = lookup_parameter(recipe, slice_idx, src_idx, "scale", name, t, validate=SCALE)
            factor = (1.0 if scale is None else _as_float(scale, "scale")) * weight_factor
        if factor != 1.0:
            _check_offset_norm(arch, f"blk.{layer}.{suffix}", factor)
            out.append((suffix, factor))
    return tuple(out)


def _linear_factor(recipe: Recipe, si: int, k: int, name: str, t: float) -> float:
    """The factor of source `k` in a linear slice where it is the only non-zero one: its weight
    divided by the sum of weights (1) when normalizing, else the weight itself."""
    if _normalize(recipe, si, name, t):
        return 1.0
    w = lookup_parameter(recipe, si, k, "weight", name, t, validate=WEIGHT)
    return 1.0 if w is None else float(w)


def _normalize(recipe: Recipe, si: int, name: str, t: float) -> bool:
    """linear's shared `normalize`: the slice's setting, then the global one (default true)."""
    v = lookup_parameter(recipe, si, None, "normalize", name, t, validate=NORMALIZE)
    return recipe.normalize if v is None else bool(v)


def _check_offset_norm(arch: str | None, name: str, factor: float) -> None:
    """Gemma's GGUF norms hold 1 + w (convert_hf_to_gguf adds 1); mergekit scales w, we would scale 1 + w."""
    if archs.is_offset_norm(arch, name):
        raise RecipeError(f"{arch}: the recipe scales {name} by {factor:g}, but {arch} GGUF files store norm weights "
                          "as 1 + w, so that is not the scale mergekit would apply; exclude norms from the scale "
                          "(e.g. filter o_proj / down_proj)")


def _as_float(v: Any, what: str) -> float:
    if not isinstance(v, (int, float)):
        raise RecipeError(f"parameter {what} must be a number, got {v!r}")
    return float(v)


def linear_choice(recipe: Recipe, si: int, models: dict[str, SourceModel]) -> tuple[int, float]:
    """A linear slice is a passthrough when exactly one source has a non-zero weight.

    Returns that source and its factor on the slice's first tensor (see scales_for: the
    factor is evaluated per tensor, since a gradient weight differs between layers)."""
    s = recipe.slices[si]
    chosen: set[int] = set()
    first: float | None = None
    for src in s.sources:
        a, b = src.layer_range
        model = models[src.model]
        for layer in range(a, b):
            t = (layer - a) / (b - a - 1) if b - a > 1 else 1.0
            for suffix in model.blocks.get(layer, {}):
                name = hf_tensor_name(suffix, layer, model.arch)
                k = _nonzero_source(recipe, si, name, t, lambda kk, suffix=suffix, layer=layer, a=a, model=model:
                                    hf_tensor_name(suffix, s.sources[kk].layer_range[0] + layer - a, model.arch))
                chosen.add(k)
                if first is None:
                    first = _linear_factor(recipe, si, k, name, t)
        break  # all sources of a slice cover the same number of layers; the first is enough
    if len(chosen) != 1:
        raise RecipeError(f"slice {si}: the non-zero source changes between tensors; "
                          "that is a real merge, not a passthrough")
    return chosen.pop(), 1.0 if first is None else first


def _nonzero_source(recipe: Recipe, si: int, name: str, t: float, input_name=None) -> int:
    """The one source of linear slice `si` with a non-zero weight for tensor `name` (mergekit
    resolves each source's weight against that source's own tensor name, `input_name(k)`)."""
    s = recipe.slices[si]
    weights = []
    for k in range(len(s.sources)):
        w = lookup_parameter(recipe, si, k, "weight", input_name(k) if input_name else name, t, validate=WEIGHT)
        if w is None:
            raise RecipeError(f"slice {si}: source {s.sources[k].model!r} has no weight for {name} "
                              "(linear merges need a weight for every source)")
        weights.append(float(w))
    nonzero = [k for k, w in enumerate(weights) if w != 0.0]
    if len(nonzero) != 1:
        raise RecipeError(f"slice {si}: {len(nonzero)} sources have a non-zero weight for {name}; "
                          "only linear slices with exactly one non-zero source can be done as passthrough")
    return nonzero[0]


def _whole_model_ranges(recipe: Recipe, used: dict[str, SourceModel]) -> Recipe:
    """A `models:` recipe stands for the whole model: record its real layer range, not a placeholder."""
    slices = []
    for s in recipe.slices:
        srcs = [src.model_copy(update={"layer_range": (0, used[src.model].block_count)})
                if tuple(src.layer_range) == (0, -1) else src for src in s.sources]
        slices.append(s.model_copy(update={"sources": srcs}))
    return recipe.model_copy(update={"slices": slices})


def build_plan(recipe: Recipe, models: dict[str, SourceModel]) -> Plan:
    """Validate `recipe` against the source headers and lay out the output layers."""
    for name in recipe.model_names():
        if name not in models:
            raise RecipeError(f"recipe names model {name!r}, which was not given (use --model {name}=PATH)")
    used = {n: models[n] for n in recipe.model_names()}
    for m in used.values():
        m.check_loadable()
    recipe = _whole_model_ranges(recipe, used)
    first = next(iter(used.values()))
    arch = first.arch
    if archs.lookup(arch) is None:
        raise RecipeError(f"{first.path.name}: {archs.refusal(arch)}")
    if len(used) > 1:
        _check_compatible(used)

    layers: list[OutputLayer] = []
    for si, s in enumerate(recipe.slices):
        src_idx, weight_factor = (0, 1.0) if recipe.method == "passthrough" else linear_choice(recipe, si, used)
        src = s.sources[src_idx]
        model = used[src.model]
        n = model.block_count
        a, b = src.layer_range
        if b > n:
            raise RecipeError(f"slice {si} ({src.model}) layer_range [{a}, {b}] is outside the model's "
                              f"{n} layers (valid: 0 <= start < end <= {n})")
        for layer in range(a, b):
            tensors = model.blocks.get(layer)
            if not tensors:
                raise RecipeError(f"slice {si}: model {src.model!r} has no tensors for layer {layer} "
                                  f"although block_count is {n}")
            t = (layer - a) / (b - a - 1) if b - a > 1 else 1.0
            scales = scales_for(recipe, si, src_idx, tensors, layer, t, weight_factor, arch)
            layers.append(OutputLayer(len(layers), src.model, layer, si, scales))
    if not layers:
        raise RecipeError("the recipe produces no layers")
    if len(layers) > LLAMA_MAX_LAYERS:
        raise RecipeError(f"the recipe produces {len(layers)} layers; llama.cpp loads at most {LLAMA_MAX_LAYERS} "
                          "(LLAMA_MAX_LAYERS) and aborts on more")
    archs.check_layout(arch, used, [(l.model, l.source_layer) for l in layers])

    plan = Plan(recipe=recipe, arch=arch,
                models={k: ModelInfo(k, str(m.path), m.arch, m.block_count, m.n_params, m.n_bytes)
                        for k, m in used.items()},
                layers=layers,
                embed_model=recipe.slices[0].sources[0].model,
                head_model=recipe.slices[-1].sources[0].model)
    if recipe.method == "linear":  # the chosen source, not necessarily the first listed
        plan.embed_model = layers[0].model
        plan.head_model = layers[-1].model
    _check_tokenizer_source(recipe, used, plan.embed_model)
    fill_global_scales(plan, used)
    return plan


def _check_tokenizer_source(recipe: Recipe, models: dict[str, SourceModel], embed_model: str) -> None:
    """mergekit's tokenizer_source: the output carries that model's tokenizer, and the embeddings
    are permuted to its vocabulary (the identity when vocabularies agree, which stacking requires).
    The output's tokenizer metadata is the first slice's model's, so the two must agree."""
    tok = recipe.tokenizer_source
    if tok is None or tok == embed_model:
        return
    a, b = models[embed_model], models[tok]
    for key in sorted(k for k in set(a.kvs) | set(b.kvs) if k.startswith("tokenizer.")):
        va, vb = a.get(key), b.get(key)
        if (_digest(va) if isinstance(va, list) else va) != (_digest(vb) if isinstance(vb, list) else vb):
            raise RecipeError(f"tokenizer_source {tok!r}: its {key} differs from that of {embed_model!r}, "
                              "whose tokenizer the output carries; taking another model's tokenizer is not supported")


def fill_global_scales(plan: Plan, models: dict[str, SourceModel]) -> None:
    """Scale rules also apply to the embeddings and the head, as mergekit plans them
    (MergePlanner.plan_module): `token_embd` with the first slice's parameters, `output_norm`
    and `output` with the last slice's, both at t = 0 (the module's ConfigReader; a gradient
    gives them its first value). Tensors with no HF weight (rope_freqs, ...) are never scaled."""
    recipe = plan.recipe
    for name in (t.name for t in models[plan.embed_model].non_block_tensors):
        base, _, kind = name.rpartition(".")
        if base not in HF_GLOBAL:
            continue
        head = base != "token_embd"
        si = len(recipe.slices) - 1 if head else 0
        hf = hf_tensor_name(name, None)
        if recipe.method == "linear":
            k = _nonzero_source(recipe, si, hf, 0.0)
            model = recipe.slices[si].sources[k].model
            if model != (plan.head_model if head else plan.embed_model):
                raise RecipeError(f"slice {si}: the non-zero weight for {hf} is {model!r}'s, not that of the model "
                                  "its layers come from; that is a real merge, not a passthrough")
            factor = _linear_factor(recipe, si, k, hf, 0.0)
        else:
            scale = lookup_parameter(recipe, si, 0, "scale", hf, 0.0, validate=SCALE)
            factor = 1.0 if scale is None else _as_float(scale, "scale")
        if factor != 1.0:
            _check_offset_norm(plan.arch, name, factor)
            plan.global_scales[name] = factor
