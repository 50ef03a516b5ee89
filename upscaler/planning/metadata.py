"""Output metadata: the source's keys with their exact types, re-indexed per-layer values, lineage.

Rules (see DESIGN.md section 3): `{arch}.block_count` keeps its value type; per-layer arrays
move with their layers; keys that tie a layer's kind to its position are refused unless the
plan leaves every layer where it was; the normalized recipe and the per-layer source map are
recorded under `upscale.*` so `inspect` and `verify` can read them back.
"""

from __future__ import annotations

from typing import Any, Mapping

from gguf import GGUFValueType
from gguf.utility import size_label as gguf_size_label

from .. import __version__
from ..errors import RecipeError
from ..format.source import KV, SHARD_RE, SourceModel
from . import archs
from .plan import Plan

T = GGUFValueType

# Keys under which we record lineage in the output.
K_VERSION = "upscale.tool"
K_RECIPE = "upscale.recipe"
K_MODELS = "upscale.source_models"
K_FILES = "upscale.source_files"
K_LAYER_MODEL = "upscale.layer_source_model"
K_LAYER_INDEX = "upscale.layer_source_index"
K_SOURCE_BLOCKS = "upscale.source_block_counts"

LINEAGE_PREFIX = "general.base_model."
# Keys that identify the source model itself (its own repo, URL, DOI, UUID, description). They are
# not true of the output: they move into general.base_model.N.* (see `_lineage`) instead of being copied.
SOURCE_IDENTITY_KEYS = ("general.url", "general.doi", "general.uuid", "general.repo_url", "general.description",
                        "general.source.url", "general.source.doi", "general.source.uuid", "general.source.repo_url")


def _per_layer_value(models: dict[str, SourceModel], plan: Plan, key: str) -> KV | None:
    """Re-index `key` with the layers: array where any source has an array, else the shared scalar."""
    present = [m.kvs[key] for m in models.values() if key in m.kvs]
    if not present:
        return None
    proto = next((kv for kv in present if kv.vtype == T.ARRAY), present[0])
    if proto.vtype != T.ARRAY:
        if len({repr(kv.value) for kv in present}) == 1:
            return proto
    values = []
    for layer in plan.layers:
        m = models[layer.model]
        kv = m.kvs.get(key)
        if kv is None:
            raise RecipeError(f"model {layer.model!r} has no {key} while another model has it")
        if kv.vtype == T.ARRAY:
            if len(kv.value) != m.block_count:
                raise RecipeError(f"model {layer.model!r}: {key} has {len(kv.value)} entries for {m.block_count} "
                                  "layers")
            values.append(kv.value[layer.source_layer])
        else:
            values.append(kv.value)
    sub = proto.sub_type if proto.vtype == T.ARRAY else proto.vtype
    return KV(key, values, T.ARRAY, sub)


def _swa_value(models: dict[str, SourceModel], plan: Plan) -> KV | None:
    """The sliding-window pattern as a per-layer array: each output layer keeps its source layer's kind.

    llama.cpp's load_swa_pattern reads `{arch}.attention.sliding_window_pattern` as a per-layer
    BOOL array before falling back to the scalar period (or the arch's default period), so a
    pattern fixed by position becomes one value per layer, re-indexed like any per-layer key.
    """
    arch = plan.arch
    key = f"{arch}.{archs.SWA_KEY}"
    kinds = {name: archs.swa_layers(arch, {k: kv.value for k, kv in m.kvs.items()}, m.block_count)
             for name, m in models.items() if name in plan.models}
    if all(k is None for k in kinds.values()):
        return None
    if any(k is None for k in kinds.values()):
        on = next(n for n, k in kinds.items() if k is not None)
        off = next(n for n, k in kinds.items() if k is None)
        raise RecipeError(f"model {on!r} uses sliding-window attention and model {off!r} does not "
                          f"({arch}.{archs.SWA_WINDOW_KEY})")
    arrays = [m.kvs[key] for m in models.values() if key in m.kvs and m.kvs[key].vtype == T.ARRAY]
    sub = arrays[0].sub_type if arrays else T.BOOL
    values: list[Any] = [kinds[l.model][l.source_layer] for l in plan.layers]  # type: ignore[index]  # None: refused above
    if sub != T.BOOL:
        values = [int(v) for v in values]
    return KV(key, values, T.ARRAY, sub)


def _check_positional(models: dict[str, SourceModel], plan: Plan) -> list[str]:
    """Refuse position-dependent keys when layers move; return warnings for unknown per-layer arrays."""
    arch = plan.arch
    notes: list[str] = []
    if plan.is_identity():
        return notes
    for name, m in models.items():
        for suffix in archs.POSITIONAL_KEYS:
            kv = m.kvs.get(f"{arch}.{suffix}")
            if kv is None or (suffix in archs.PER_LAYER_KEYS and kv.vtype == T.ARRAY):
                continue
            if suffix == archs.SWA_KEY and archs.swa_rule(arch) is not None:
                continue  # re-expressed per layer by _swa_value
            if suffix in archs.ZERO_IS_NEUTRAL and kv.value == 0:
                continue
            raise RecipeError(f"model {name!r}: metadata {kv.key} = {kv.value} fixes layer kinds by position; "
                              "moving layers would change them and llama.cpp has no per-layer form for it here")
        known = {f"{arch}.{k}" for k in archs.PER_LAYER_KEYS}
        for kv in m.kvs.values():
            if (kv.vtype == T.ARRAY and kv.key.startswith(f"{arch}.") and kv.key not in known
                    and len(kv.value) == m.block_count and m.block_count > 4):
                notes.append(f"model {name!r}: {kv.key} has one entry per layer but is not a key llama.cpp reads "
                             "per layer; kept unchanged")
    return notes


def output_param_count(models: dict[str, SourceModel], plan: Plan) -> int:
    n = 0
    for layer in plan.layers:
        n += sum(t.n_elements for t in models[layer.model].blocks[layer.source_layer].values())
    emb = models[plan.embed_model]
    n += sum(t.n_elements for t in emb.non_block_tensors)
    return n


def build_metadata(models: dict[str, SourceModel], plan: Plan, *,
                   name: str | None = None) -> tuple[list[KV], list[str]]:
    """The output's key/value list (in the first model's order) and any warnings."""
    arch = plan.arch
    notes = _check_positional(models, plan)
    emb = models[plan.embed_model]
    out: dict[str, KV] = {}
    for key, kv in emb.kvs.items():
        if key.startswith(LINEAGE_PREFIX) or key.startswith("upscale.") or key in SOURCE_IDENTITY_KEYS:
            continue
        out[key] = kv

    bc = emb.kvs[f"{arch}.block_count"]
    out[bc.key] = bc.with_value(plan.block_count)
    swa = None if plan.is_identity() else _swa_value(models, plan)
    for suffix in archs.PER_LAYER_KEYS:
        key = f"{arch}.{suffix}"
        per_layer = swa if swa is not None and key == swa.key else _per_layer_value(models, plan, key)
        if per_layer is not None:
            out[per_layer.key] = per_layer

    n_params = output_param_count(models, plan)
    label = gguf_size_label(n_params, n_params, 0, 0)
    src_name = emb.get("general.name") or emb.path.stem
    out["general.name"] = KV("general.name", name or f"{src_name} upscaled {plan.block_count}L", T.STRING)
    out["general.size_label"] = KV("general.size_label", label, T.STRING)
    # tags of every source model (plan order), each once, then ours
    tags: list[str] = []
    for tag in [t for mname in plan.models for t in (models[mname].get("general.tags") or [])] + [
            "merge", "frankenmerge", "gguf-upscale"]:
        if str(tag) not in tags:
            tags.append(str(tag))
    out["general.tags"] = KV("general.tags", tags, T.ARRAY, T.STRING)
    # the output is bound by every source's license: when the sources disagree, name them all
    # (comma-separated, as gguf-py writes a list of licenses); general.license.name/.link stay the first's
    licenses = []
    for mname in plan.models:
        lic = models[mname].get("general.license")
        if lic and str(lic) not in licenses:
            licenses.append(str(lic))
    if len(licenses) > 1:
        out["general.license"] = KV("general.license", ",".join(licenses), T.STRING)

    for kv in _lineage(models, plan):
        out[kv.key] = kv
    for kv in _record(models, plan):
        out[kv.key] = kv
    return list(out.values()), notes


def _lineage(models: dict[str, SourceModel], plan: Plan) -> list[KV]:
    """general.base_model.* names the source models (the output's parents), as hubs expect."""
    kvs = [KV(f"{LINEAGE_PREFIX}count", len(plan.models), T.UINT32)]
    for i, mname in enumerate(plan.models):
        m = models[mname]
        shard = SHARD_RE.match(m.path.name)
        fields = {  # the keys gguf-py's Metadata writes for a base model
            "name": (m.get("general.name") or m.get("general.basename")
                     or (shard.group("stem") if shard else m.path.stem)),
            "author": m.get("general.author"),
            "version": m.get("general.version"),
            "organization": m.get("general.organization"),
            "description": m.get("general.description"),
            "url": m.get("general.url") or m.get("general.source.url"),
            "doi": m.get("general.doi") or m.get("general.source.doi"),
            "uuid": m.get("general.uuid") or m.get("general.source.uuid"),
            # where its weights live: its own repo, else the repo it was converted from (never a web page)
            "repo_url": m.get("general.repo_url") or m.get("general.source.repo_url"),
        }
        for field, value in fields.items():
            if value:
                kvs.append(KV(f"{LINEAGE_PREFIX}{i}.{field}", str(value), T.STRING))
    return kvs


def _record(models: dict[str, SourceModel], plan: Plan) -> list[KV]:
    names = list(plan.models)
    index = {n: i for i, n in enumerate(names)}
    return [
        KV(K_VERSION, f"gguf-upscale {__version__}", T.STRING),
        KV(K_RECIPE, plan.recipe.to_yaml(), T.STRING),
        KV(K_MODELS, names, T.ARRAY, T.STRING),
        KV(K_FILES, [models[n].path.name for n in names], T.ARRAY, T.STRING),
        KV(K_SOURCE_BLOCKS, [models[n].block_count for n in names], T.ARRAY, T.UINT32),
        KV(K_LAYER_MODEL, [index[l.model] for l in plan.layers], T.ARRAY, T.UINT16),
        KV(K_LAYER_INDEX, [l.source_layer for l in plan.layers], T.ARRAY, T.UINT32),
    ]


def base_models(kvs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The `general.base_model.{i}.*` entries (i < general.base_model.count) grouped by i, in one
    pass over the keys: a claimed count costs nothing beyond the keys the file really holds."""
    count = kvs.get(f"{LINEAGE_PREFIX}count")
    n = count if isinstance(count, int) and not isinstance(count, bool) else 0
    out: dict[int, dict[str, Any]] = {}
    for k, v in kvs.items():
        idx, _, field = k[len(LINEAGE_PREFIX):].partition(".") if k.startswith(LINEAGE_PREFIX) else ("", "", "")
        if idx.isdigit() and int(idx) < n and field:
            out.setdefault(int(idx), {})[field] = v
    return [out[i] for i in sorted(out)]


def recorded_lineage(kvs: dict[str, Any]) -> dict[str, Any] | None:
    """Read back what `_record` wrote (values already decoded), or None for a non-upscaled file."""
    if K_LAYER_INDEX not in kvs:
        return None
    names = list(kvs.get(K_MODELS) or [])
    return {
        "tool": kvs.get(K_VERSION),
        "recipe": kvs.get(K_RECIPE),
        "source_models": names,
        "source_files": list(kvs.get(K_FILES) or []),
        "source_block_counts": list(kvs.get(K_SOURCE_BLOCKS) or []),
        "layers": [(names[m] if m < len(names) else f"#{m}", int(j))
                   for m, j in zip(kvs.get(K_LAYER_MODEL) or [], kvs.get(K_LAYER_INDEX) or [])],
    }
