"""Recipes: mergekit YAML as people publish it, the compact `--slices` form, and presets.

Everything is normalized to one shape: an ordered list of slices, each taking a half-open
layer range from one model, with mergekit-style parameters (scale rules) attached at the
source, slice and global level. Parameter values are kept unevaluated here; `plan` evaluates
them per output tensor with mergekit's precedence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError

# A mergekit parameter value: scalar, gradient (list of numbers), or conditional list of {filter, value}.
ParamValue = float | int | bool | str | list[Any] | dict[str, Any] | None

SUPPORTED_METHODS = ("passthrough", "linear")
MAX_LAYER_INDEX = 100_000


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_keys(self, where: str) -> list[str]:
        out = [f"{where}.{k}" for k in (self.model_extra or {})]
        for name, value in self:
            items = value if isinstance(value, list) else [value]
            for i, v in enumerate(items):
                if isinstance(v, _Model):
                    sub = f"{where}.{name}[{i}]" if isinstance(value, list) else f"{where}.{name}"
                    out += v.unknown_keys(sub)
        return out


class SliceSource(_Model):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v: Any) -> Any:
        # mergekit accepts `model: {model: {path: ...}}` in some configs; keep the common forms
        if isinstance(v, dict) and "path" in v:
            return v["path"]
        if isinstance(v, dict) and isinstance(v.get("model"), dict) and "path" in v["model"]:
            return v["model"]["path"]
        return v

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return _check_model_name(v)


def _check_model_name(v: str) -> str:
    if not v or len(v) > 4096 or not v.isprintable():
        raise ValueError(f"model {_short(v, 60)} is not a usable model name or path")
    return v


class Slice(_Model):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: dict[str, ParamValue] | None = None
    base_model: str | None = None


class ModelEntry(_Model):
    model: str
    parameters: dict[str, ParamValue] | None = None

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return _check_model_name(v)


class MergeConfig(_Model):
    merge_method: str
    slices: list[Slice] | None = None
    models: list[ModelEntry] | None = None
    parameters: dict[str, ParamValue] | None = None
    base_model: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Any = None
    tokenizer: Any = None
    chat_template: str | None = None
    name: str | None = None


class Recipe(BaseModel):
    """The normalized recipe: what the plan is built from and what is recorded in the output."""

    method: str
    slices: list[Slice]
    parameters: dict[str, ParamValue] = {}
    name: str | None = None
    normalize: bool = True  # linear merges: divide by the sum of weights (mergekit default)
    dtype: str | None = None  # mergekit's dtype / out_dtype, kept so the recorded recipe is the user's
    out_dtype: str | None = None
    warnings: list[str] = []

    def model_names(self) -> list[str]:
        seen: list[str] = []
        for s in self.slices:
            for src in s.sources:
                if src.model not in seen:
                    seen.append(src.model)
        return seen

    def to_yaml(self) -> str:
        """The recipe as mergekit YAML (what we record in the output file and the model card).

        Plain YAML a person can read and mergekit can load: no anchors/aliases (values shared by
        several slices are written out each time), layer ranges in flow style.
        """
        doc: dict[str, Any] = {"merge_method": self.method, "slices": []}
        for s in self.slices:
            sd: dict[str, Any] = {"sources": []}
            for src in s.sources:
                d: dict[str, Any] = {"model": src.model, "layer_range": _Flow(src.layer_range)}
                if src.parameters:
                    d["parameters"] = src.parameters
                sd["sources"].append(d)
            if s.parameters:
                sd["parameters"] = s.parameters
            doc["slices"].append(sd)
        params = dict(self.parameters)
        if self.method == "linear" and not self.normalize:
            params["normalize"] = False
        if params:
            doc["parameters"] = params
        doc.update({k: v for k, v in (("dtype", self.dtype), ("out_dtype", self.out_dtype)) if v})
        return yaml.dump(doc, Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True)


class _Flow(list):
    """A list written in YAML flow style: `layer_range: [0, 40]`."""


class _RecipeDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, v: list) -> yaml.Node:
    """Lists of plain numbers/strings (layer ranges, gradients) in flow style, others in block style."""
    flow = all(isinstance(x, (int, float, str, bool)) or x is None for x in v)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=flow)


_RecipeDumper.add_representer(_Flow, _represent_list)
_RecipeDumper.add_representer(list, _represent_list)


# -- loading ----------------------------------------------------------------------------


MAX_RECIPE_BYTES = 1024 * 1024  # published recipes are a few KB
MAX_YAML_DEPTH = 64  # mergekit recipes nest about 8 levels
MAX_YAML_EVENTS = 100_000
_FastSafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available


def _short(value: Any, limit: int = 80) -> str:
    """A user-supplied value for a one-line message: repr (escapes newlines), cut to `limit`."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 5] + "..." + r[-1]


class _NoAliasBombLoader(_FastSafeLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that refuses documents expanding to absurd sizes or depths through anchors/aliases,
    and notes duplicate keys (YAML keeps the last one silently, as mergekit does)."""

    MAX_NODES = 200_000

    def construct_document(self, node: yaml.Node) -> Any:
        count = 0
        stack = [(node, 1)]
        seen: set[int] = set()
        self.duplicates: list[str] = []
        while stack:
            n, depth = stack.pop()
            count += 1
            if count > self.MAX_NODES:
                raise RecipeError("recipe YAML expands to too many nodes (alias bomb?)")
            if depth > MAX_YAML_DEPTH:
                raise RecipeError(f"recipe YAML nests more than {MAX_YAML_DEPTH} levels deep (through aliases?)")
            if isinstance(n, yaml.SequenceNode):
                stack.extend((v, depth + 1) for v in n.value)
            elif isinstance(n, yaml.MappingNode):
                if id(n) not in seen:
                    seen.add(id(n))
                    keys: set[Any] = set()
                    for k, _ in n.value:
                        if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                            if k.value in keys:
                                self.duplicates.append(f"key {_short(k.value)} appears twice in one mapping "
                                                       f"(line {k.start_mark.line + 1}); the last one is used")
                            keys.add(k.value)
                for k, v in n.value:
                    stack.extend(((k, depth + 1), (v, depth + 1)))
        return super().construct_document(node)


def _check_shape(text: str) -> None:
    """Refuse deep nesting and huge documents before the (recursive) composer sees them."""
    depth = events = 0
    for ev in yaml.parse(text, Loader=_FastSafeLoader):
        events += 1
        if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise RecipeError(f"recipe YAML nests more than {MAX_YAML_DEPTH} levels deep "
                                  f"(line {ev.start_mark.line + 1 if ev.start_mark else '?'})")
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
        if events > MAX_YAML_EVENTS:
            raise RecipeError(f"recipe YAML has more than {MAX_YAML_EVENTS} items; a recipe is a few slices")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) if isinstance(p, int) or (p.isprintable() and len(p) <= 40) else _short(p, 40)
                   for p in err["loc"])
    msg = " ".join(str(err["msg"]).split())
    return f"{loc}: {msg}" if loc else msg


def load_yaml_document(text: str, origin: str = "recipe") -> tuple[Any, list[str]]:
    """Recipe text -> (the YAML document, duplicate-key notes), refusing what no recipe is: over
    MAX_RECIPE_BYTES, too deep or too many items (checked before composing), alias bombs, YAML
    tags. Errors are one-line RecipeErrors prefixed with `origin`."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{origin}: recipe is over {MAX_RECIPE_BYTES // 1024} KB; a recipe is a few KB")
    try:
        _check_shape(text)
        loader = _NoAliasBombLoader(text)
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or (str(e).splitlines() or ["unreadable"])[0]
        raise RecipeError(f"{origin}: malformed YAML{where}: {' '.join(str(problem).split())[:200]}") from None
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None
    except RecursionError:  # a last resort; the depth checks above should make it unreachable
        raise RecipeError(f"{origin}: recipe YAML nests too deeply") from None
    return doc, list(getattr(loader, "duplicates", []))


def parse_yaml_text(text: str, origin: str = "recipe") -> Recipe:
    doc, duplicates = load_yaml_document(text, origin)
    if not isinstance(doc, dict):
        raise RecipeError(f"{origin}: expected a mergekit YAML mapping with merge_method and slices")
    try:
        cfg = MergeConfig.model_validate(doc)
    except ValidationError as e:
        raise RecipeError(f"{origin}: {_first_error(e)}") from None
    recipe = normalize_config(cfg, origin)
    recipe.warnings[:0] = [f"{origin}: {d}" for d in duplicates]
    return recipe


def load_yaml(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{p}: recipe file is {p.stat().st_size} bytes; refusing anything over "
                              f"{MAX_RECIPE_BYTES // 1024} KB (a recipe is a few KB)")
        with open(p, "rb") as f:  # bounded read: also safe for /dev/zero, pipes and the like
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"{p}: recipe is over {MAX_RECIPE_BYTES // 1024} KB; a recipe is a few KB")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise RecipeError(f"{p}: recipe is not UTF-8 text (byte {e.start}, line {line})") from None
    except OSError as e:
        raise RecipeError(f"{p}: cannot read recipe ({e.strerror or e})") from None
    return parse_yaml_text(text, str(p))


def normalize_config(cfg: MergeConfig, origin: str = "recipe") -> Recipe:
    """Check what mergekit would accept and what we can do natively; turn it into a Recipe."""
    notes = [f"{origin}: unknown key {_short(k)} ignored (mergekit ignores it too)" for k in cfg.unknown_keys("config")]
    method = cfg.merge_method.strip().lower()
    if method not in SUPPORTED_METHODS:
        raise RecipeError(f"{origin}: merge_method {_short(cfg.merge_method)} is not supported; "
                          "gguf-upscale does passthrough (and linear recipes with one non-zero source per slice)")
    if cfg.tokenizer_source not in (None, "base") and not isinstance(cfg.tokenizer_source, str):
        raise RecipeError(f"{origin}: tokenizer_source {_short(cfg.tokenizer_source)} is not supported "
                          "(the tokenizer is taken from the first slice's model)")
    if cfg.tokenizer_source == "union" or cfg.tokenizer is not None:
        raise RecipeError(f"{origin}: tokenizer merging (tokenizer_source: union / tokenizer:) is not supported; "
                          "all models must share one tokenizer")
    if cfg.slices is None and cfg.models is None:
        raise RecipeError(f"{origin}: recipe has neither slices nor models")
    if cfg.slices is not None and cfg.models is not None:
        raise RecipeError(f"{origin}: recipe has both slices and models; mergekit takes one or the other")

    params = dict(cfg.parameters or {})
    normalize = True
    if method == "linear":
        norm = params.pop("normalize", True)
        if not isinstance(norm, bool):
            raise RecipeError(f"{origin}: parameters.normalize must be true or false")
        normalize = norm

    if cfg.models is not None:
        # `models:` form: passthrough of whole models. mergekit allows exactly one model here.
        if len(cfg.models) != 1:
            raise RecipeError(f"{origin}: a `models:` recipe takes exactly one model for {method}, got "
                              f"{len(cfg.models)}; "
                              "use slices to stack models")
        m = cfg.models[0]
        # layer range filled in by the plan from the model's block count
        slices = [Slice(sources=[SliceSource(model=m.model, layer_range=(0, -1), parameters=m.parameters)])]
    else:
        slices = list(cfg.slices or [])

    for i, s in enumerate(slices):
        for src in s.sources:
            a, b = src.layer_range
            if (a, b) == (0, -1) and cfg.models is not None:
                continue
            if a < 0 or b < 0:
                raise RecipeError(f"{origin}: slice {i} ({src.model}) layer_range [{a}, {b}] has a negative index")
            if a > MAX_LAYER_INDEX or b > MAX_LAYER_INDEX:
                raise RecipeError(f"{origin}: slice {i} ({src.model}) layer_range [{a}, {b}] is absurdly large")
            if b <= a:
                kind = "empty" if a == b else "reversed"
                raise RecipeError(f"{origin}: slice {i} ({src.model}) layer_range [{a}, {b}] is {kind}; "
                                  "ranges are half-open [start, end) with end > start")
        if method == "passthrough" and len(s.sources) != 1:
            raise RecipeError(f"{origin}: slice {i} has {len(s.sources)} sources; passthrough takes exactly one per "
                              "slice")
        if method == "linear":
            lens = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lens) != 1:
                raise RecipeError(f"{origin}: slice {i} sources have layer ranges of different lengths")
    for key in ("dtype", "out_dtype"):
        if getattr(cfg, key):
            notes.append(f"{origin}: {key}: {getattr(cfg, key)} does not convert the output (tensors keep their "
                         "source types; --type sets them when quantizing); it stays in the recorded recipe")
    return Recipe(method=method, slices=slices, parameters=params, name=cfg.name,
                  normalize=normalize, dtype=cfg.dtype, out_dtype=cfg.out_dtype, warnings=notes)


# -- compact forms ------------------------------------------------------------------------


def parse_slices(spec: str, model: str = "source") -> Recipe:
    """`0:40,20:60,40:80` (half-open ranges) -> a single-model passthrough recipe."""
    slices = []
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise RecipeError("--slices is empty; expected e.g. 0:40,20:60,40:80")
    for part in parts:
        bits = part.split(":")
        if len(bits) != 2:
            raise RecipeError(f"--slices: {_short(part)} is not START:END")
        try:
            a, b = int(bits[0]), int(bits[1])
        except ValueError:
            raise RecipeError(f"--slices: {_short(part)} is not START:END with whole numbers") from None
        slices.append({"sources": [{"model": model, "layer_range": [a, b]}]})
    cfg = MergeConfig.model_validate({"merge_method": "passthrough", "slices": slices})
    return normalize_config(cfg, "--slices")


# -- parameter evaluation (mergekit semantics) ---------------------------------------------------


def evaluate_setting(tensor_name: str, setting: ParamValue, t: float) -> Any:
    """mergekit's evaluate_setting: scalars, gradients over the slice (t in [0, 1]), filter lists.

    `tensor_name` may hold several names separated by spaces (HF and GGUF forms); a filter
    matches when it is a substring of any of them.
    """
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if setting and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(math.floor(scaled))
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if setting and all(isinstance(e, (int, float, bool, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise RecipeError(f"parameter list item {cond!r} is neither a number nor a {{filter, value}} mapping")
            flt = cond.get("filter")
            if flt is None or str(flt) in tensor_name:
                return evaluate_setting(tensor_name, cond["value"], t)
        return None
    if isinstance(setting, dict):
        if "value" in setting:
            flt = setting.get("filter")
            if flt is None or str(flt) in tensor_name:
                return evaluate_setting(tensor_name, setting["value"], t)
            return None
    raise RecipeError(f"cannot evaluate parameter value {setting!r}")


def lookup_parameter(recipe: Recipe, slice_idx: int, source_idx: int, name: str,
                     tensor_name: str, t: float) -> Any:
    """mergekit precedence: the slice source's parameters, then the slice's, then the global ones."""
    s = recipe.slices[slice_idx]
    for scope in (s.sources[source_idx].parameters, s.parameters, recipe.parameters):
        if scope and name in scope:
            v = evaluate_setting(tensor_name, scope[name], t)
            if v is not None:
                return v
    return None
