"""Recipes: mergekit YAML as people publish it, the compact `--slices` form, and presets.

Everything is normalized to one shape: an ordered list of slices, each taking a half-open
layer range from one model, with mergekit-style parameters (scale rules) attached at the
source, slice and global level. Parameter values are kept unevaluated here; `plan` evaluates
them per output tensor with mergekit's precedence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ..errors import RecipeError

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
    warnings: list[str] = []
    # mergekit's merge dtype and output dtype: scaled tensors are rounded through them (tensor_data)
    dtype: str | None = None
    out_dtype: str | None = None
    # the model whose tokenizer the output carries (mergekit's tokenizer_source); None: the first slice's
    tokenizer_source: str | None = None

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
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
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
    if isinstance(cfg.tokenizer_source, dict):  # a model reference mapping, as in `model:`
        ref = cfg.tokenizer_source
        cfg.tokenizer_source = ref.get("path") or (ref.get("model") or {}).get("path") or ref
    if cfg.tokenizer_source not in (None, "base") and not isinstance(cfg.tokenizer_source, str):
        raise RecipeError(f"{origin}: tokenizer_source {_short(cfg.tokenizer_source)} is not supported "
                          "(the tokenizer is taken from the first slice's model)")
    if cfg.tokenizer_source == "union" or cfg.tokenizer is not None:
        raise RecipeError(f"{origin}: tokenizer merging (tokenizer_source: union / tokenizer:) is not supported; "
                          "all models must share one tokenizer")
    dtype, out_dtype = (_dtype_name(origin, k, v) for k, v in (("dtype", cfg.dtype), ("out_dtype", cfg.out_dtype)))
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
        if cfg.base_model and cfg.base_model not in [m.model for m in cfg.models]:
            raise RecipeError(f"{origin}: base_model {_short(cfg.base_model)} is not among `models:`; mergekit adds "
                              f"it as another whole-model source, which {method} as a passthrough cannot take")
        if len(cfg.models) != 1:
            raise RecipeError(f"{origin}: a `models:` recipe takes exactly one model for {method}, got "
                              f"{len(cfg.models)}; "
                              "use slices to stack models")
        whole = cfg.models[0]
        # layer range filled in by the plan from the model's block count
        slices = [Slice(sources=[SliceSource(model=whole.model, layer_range=(0, -1), parameters=whole.parameters)])]
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
    tok = cfg.tokenizer_source
    if tok == "base":  # mergekit: the base model, else the first model it references
        tok = cfg.base_model or None
    if tok is not None:
        tok = _tokenizer_model(origin, tok, slices)
    notes += _gguf_name_filters(origin, cfg, slices)
    if method == "linear" and any("scale" in (p or {}) for p in [params] + [s.parameters for s in slices]
                                  + [src.parameters for s in slices for src in s.sources]):
        notes.append(f"{origin}: `scale` is not a parameter of linear merges; mergekit ignores it, and so does "
                     "gguf-upscale (with normalize: false the weight is the scale)")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value:
            notes.append(f"{origin}: {key}: {value}: scaled tensors are computed in {value} and rounded as mergekit "
                         "does; tensors keep their source types (--type sets them when quantizing)")
    return Recipe(method=method, slices=slices, parameters=params, name=cfg.name,
                  normalize=normalize, warnings=notes, dtype=dtype, out_dtype=out_dtype, tokenizer_source=tok)


# mergekit's dtype_from_name (common.py): these names, optionally prefixed "torch."
DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(origin: str, key: str, value: str | None) -> str | None:
    """The dtype as mergekit names it, or a one-line error for names mergekit refuses too."""
    if value is None or value == "":
        return None
    name = value[len("torch."):] if value.startswith("torch.") else value
    if name not in DTYPES:
        raise RecipeError(f"{origin}: {key} {_short(value)} is not a dtype mergekit knows "
                          f"({', '.join(DTYPES)}; int64 cannot hold weights)")
    return name


def _tokenizer_model(origin: str, tok: Any, slices: list[Slice]) -> str:
    """tokenizer_source names a model of the recipe: its tokenizer is the one the output carries."""
    names = [src.model for s in slices for src in s.sources]
    if not isinstance(tok, str) or tok not in names:
        raise RecipeError(f"{origin}: tokenizer_source {_short(tok)} is not one of the recipe's models; "
                          "gguf-upscale takes the tokenizer from a model it stacks (all share one vocabulary)")
    return tok


# GGUF tensor-name pieces no HF checkpoint name contains: mergekit's filters never match them
_GGUF_ONLY = ("blk.", "attn_", "ffn_", "token_embd", "output")


def _gguf_name_filters(origin: str, cfg: MergeConfig, slices: list[Slice]) -> list[str]:
    """Warn about filters written with GGUF names: mergekit matches HF names only, and so do we."""
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            f = v.get("filter")
            if isinstance(f, str) and any(p in f for p in _GGUF_ONLY) and f not in found:
                found.append(f)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk([cfg.parameters, [s.parameters for s in slices], [src.parameters for s in slices for src in s.sources]])
    return [f"{origin}: filter {_short(f)} is a GGUF tensor name, but filters match HF names as in "
            "mergekit (o_proj, down_proj, embed_tokens, lm_head, ...), so it matches no tensor" for f in found]


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


def _as_is(v: Any) -> Any:
    return v


def _matches(flt: Any, tensor_name: str) -> bool:
    """mergekit's filter test: none, `"*"` (every tensor) or a substring of the tensor's HF name."""
    return flt is None or flt == "*" or (bool(tensor_name) and str(flt) in tensor_name)


def evaluate_setting(tensor_name: str, setting: ParamValue, t: float = 0,
                     *, validate: Callable[[Any], Any] | None = None) -> Any:
    """mergekit 0.1.5's evaluate_setting (config.py), rule for rule.

    `validate` is the parameter's type check (pydantic, as mergekit's ParameterSpec.validate):
    scalars are validated; a list of scalars is validated element-wise, then interpolated along
    the slice (t in [0, 1]) when every validated value is a number, else indexed at
    int(t * (n - 1)) (a discrete list); a {filter, value} mapping or a list of them returns the
    first match (`"*"` matches every tensor), evaluated recursively, and None when nothing
    matches, so the next scope is asked. An empty list is None.
    """
    check = validate or _as_is
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validated(check, setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [_validated(check, e) for e in setting]
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return _validated(check, (1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise RecipeError(f"parameter list item {_short(cond)} is neither a number nor a "
                                  "{filter, value} mapping (mergekit takes one or the other)")
            if _matches(cond.get("filter"), tensor_name):
                return evaluate_setting(tensor_name, cond["value"], t, validate=validate)
        return None
    raise RecipeError(f"cannot evaluate parameter value {_short(setting)}")


def _validated(check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except ValidationError as e:
        msg = " ".join(str(e.errors()[0]["msg"]).split())
        raise RecipeError(f"parameter value {_short(value)}: {msg}") from None


# mergekit's parameter types (merge_methods/passthrough.py, linear.py): validated as it does
SCALE = TypeAdapter(float | None).validate_python  # passthrough, per input
WEIGHT = TypeAdapter(float).validate_python  # linear, per input
NORMALIZE = TypeAdapter(bool).validate_python  # linear, shared


def lookup_parameter(recipe: Recipe, slice_idx: int, source_idx: int | None, name: str,
                     tensor_name: str, t: float, *, validate: Callable[[Any], Any] | None = None) -> Any:
    """mergekit's precedence (ConfigReader.parameter_sources): the parameters of every source of
    the slice that names the same model as source `source_idx`, then the slice's, then the
    global ones; the first scope whose setting evaluates to a value wins (a filter list that
    matches nothing falls through). `source_idx` None: a shared parameter (no source scope)."""
    s = recipe.slices[slice_idx]
    scopes: list[dict[str, ParamValue] | None] = []
    if source_idx is not None:
        model = s.sources[source_idx].model
        scopes += [src.parameters for src in s.sources if src.model == model]
    scopes += [s.parameters, recipe.parameters]
    for scope in scopes:
        if scope and name in scope:
            v = evaluate_setting(tensor_name, scope[name], t, validate=validate)
            if v is not None:
                return v
    return None
