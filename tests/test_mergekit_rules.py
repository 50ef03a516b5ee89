"""mergekit 0.1.5's parameter rules, case by case, end to end through `plan --json` and the
written tensors.

The expected factors come from a transcription, in this file, of mergekit's own source:
`config.evaluate_setting`, `ConfigReader.parameter_sources`, `parameter_resolver.resolve_parameter`,
`MergePlanner.plan_module/plan_slice` (t per layer; the embeddings planned with the first
slice at t = 0, the head with the last slice at t = 0), `passthrough` (tensor * scale),
`linear` (sum of weight * tensor, divided by the sum of weights when `normalize`), and the
merge dtype (`GatherTensors(dtype=config.dtype)`; torch multiplies half/bfloat16 by a scalar in
float32 and rounds once). It shares no code with upscaler/ (HF names included). Tensors are read
back with gguf-py's GGUFReader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from gguf import GGUFReader
from pydantic import TypeAdapter

from helpers import assert_one_line_error, cli
from modelfactory import make_model

# ---------------------------------------------------------------- mergekit, transcribed

SCALE = TypeAdapter(float | None).validate_python  # passthrough: scale: PerInput[Optional[float]]
WEIGHT = TypeAdapter(float).validate_python  # linear: weight: BatchParameter(float, INPUT)
NORMALIZE = TypeAdapter(bool).validate_python  # linear: normalize: bool = True


def mk_evaluate_setting(tensor_name: str, setting: Any, t: float, validate: Callable[[Any], Any]) -> Any:
    if isinstance(setting, dict):  # a ConditionalParameter
        setting = [setting]
    if isinstance(setting, (float, int, bool, str)):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(e, (float, int, bool, str)) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return mk_evaluate_setting(tensor_name, cond["value"], t, validate)
    return None


def mk_sources(config: dict, slice_out: dict, model: str | None) -> list[dict | None]:
    """ConfigReader.parameter_sources: highest precedence first."""
    out: list[dict | None] = []
    if model is not None:
        out += [s.get("parameters") for s in slice_out["sources"] if s["model"] == model]
    out.append(slice_out.get("parameters"))
    out.append(config.get("parameters"))
    return out


def mk_resolve(name: str, scopes: list[dict | None], tensor_name: str, t: float,
               validate: Callable[[Any], Any], default: Any) -> Any:
    for scope in scopes:
        if scope is not None and name in scope:
            v = mk_evaluate_setting(tensor_name, scope[name], t, validate)
            if v is not None:
                return v
    return default


HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
      "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def hf(layer: int, suffix: str) -> str:
    kind, _, w = suffix.rpartition(".")
    return f"model.layers.{layer}.{HF[kind]}.{w}"


def mk_factor(config: dict, slice_out: dict, in_name: str, out_name: str, t: float) -> tuple[str, float]:
    """(model the tensor comes from, factor on it) for one tensor of one output slice."""
    if config["merge_method"] == "passthrough":
        model = slice_out["sources"][0]["model"]
        s = mk_resolve("scale", mk_sources(config, slice_out, model), in_name, t, SCALE, None)
        return model, 1.0 if s is None else s
    weights = {src["model"]: mk_resolve("weight", mk_sources(config, slice_out, src["model"]),
                                        in_name, t, WEIGHT, None) for src in slice_out["sources"]}
    normalize = mk_resolve("normalize", mk_sources(config, slice_out, None), out_name, t, NORMALIZE, True)
    (model, w), = [(m, w) for m, w in weights.items() if w != 0]
    return model, (w / sum(weights.values()) if normalize else w)


def mk_plan(config: dict, n_layers: dict[str, int]) -> dict[str, tuple[str, str, float]]:
    """output tensor -> (model, source tensor, factor), as MergePlanner lays it out."""
    slices = config.get("slices") or [{"sources": [{"model": m["model"], "layer_range": [0, n_layers[m["model"]]],
                                                    "parameters": m.get("parameters")} for m in config["models"]]}]
    plan: dict[str, tuple[str, str, float]] = {}
    out_layer = 0
    suffixes = [f"{k}.weight" for k in HF]
    for name, hf_name in HF_GLOBAL.items():
        sl = slices[-1] if name.startswith("output") else slices[0]
        model, factor = mk_factor(config, sl, hf_name, hf_name, 0)
        plan[name] = (model, name, factor)
    for sl in slices:
        a, b = sl["sources"][0]["layer_range"]
        n = b - a
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1
            for suffix in suffixes:
                model, factor = mk_factor(config, sl, hf(a + idx, suffix), hf(out_layer, suffix), t)
                src = next(s for s in sl["sources"] if s["model"] == model)
                plan[f"blk.{out_layer}.{suffix}"] = (model, f"blk.{src['layer_range'][0] + idx}.{suffix}", factor)
            out_layer += 1
    return plan


def mk_value(x: np.ndarray, factor: float, dtype: str | None) -> np.ndarray:
    """`tensor * factor` in the merge dtype, as float32 (what convert_hf_to_gguf starts from)."""
    def to(v: np.ndarray, d: str | None) -> np.ndarray:
        if d == "float16":
            return v.astype(np.float16).astype(np.float32)
        if d == "bfloat16":
            u = v.astype(np.float32).view(np.uint32).astype(np.uint64)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            return u.astype(np.uint32).view(np.float32)
        return v.astype(np.float32)
    return to(to(x, dtype) * np.float32(factor), dtype)


def stored(v: np.ndarray, typ: str) -> np.ndarray:
    """convert_hf_to_gguf's storage: F16 for 2-D weights here, F32 for norms."""
    return v.astype(np.float16).astype(np.float32) if typ == "F16" else v.astype(np.float32)


# ---------------------------------------------------------------- the cases

CASES: dict[str, dict] = {
    "star filter scales every tensor, embeddings and head included": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4],
                                 "parameters": {"scale": [{"filter": "*", "value": 0.5}]}}]}]},
    "unfiltered gradient on the last slice reaches the head at t=0": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "a", "layer_range": [2, 4]}], "parameters": {"scale": [0.5, 1.0]}}]},
    "norm gradient rounded through float16": {
        "merge_method": "passthrough", "dtype": "float16",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}],
                    "parameters": {"scale": [{"filter": "input_layernorm", "value": [0.9, 0.7]}]}}]},
    "bfloat16 merge dtype": {
        "merge_method": "passthrough", "dtype": "bfloat16",
        "parameters": {"scale": [{"filter": "mlp", "value": 0.7}]},
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}]}]},
    "float32 merge dtype, three-point gradient": {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4],
                                 "parameters": {"scale": [0.3, 1.0, 0.6]}}]}]},
    "one-layer slices take t=1": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "a", "layer_range": [1, 2], "parameters": {"scale": [0.2, 0.8]}}]},
                   {"sources": [{"model": "a", "layer_range": [2, 4]}]}]},
    "booleans and strings validate to numbers and interpolate": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 3], "parameters": {"scale": [True, False]}}]},
                   {"sources": [{"model": "a", "layer_range": [3, 4], "parameters": {"scale": "0.25"}}]}]},
    "filter list falls through to the slice, then the global scope": {
        "merge_method": "passthrough", "parameters": {"scale": 0.75},
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 2],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0}]}}],
                    "parameters": {"scale": [{"filter": "mlp", "value": 0.5}]}},
                   {"sources": [{"model": "a", "layer_range": [2, 4]}]}]},
    "filters that match nothing leave tensors alone": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4], "parameters": {
            "scale": [{"filter": "no_such_tensor", "value": 0.5}, {"filter": "ffn_down", "value": 0.5}]}}]}]},
    "filters see the source layer's name": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]},
                   {"sources": [{"model": "a", "layer_range": [1, 3]}]}],
        "parameters": {"scale": [{"filter": "layers.1.", "value": 0.5}, {"filter": "embed", "value": 2}]}},
    "source beats slice beats global": {
        "merge_method": "passthrough", "parameters": {"scale": 0.1},
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 1], "parameters": {"scale": 0.3}}],
                    "parameters": {"scale": 0.2}},
                   {"sources": [{"model": "a", "layer_range": [1, 2]}], "parameters": {"scale": 0.2}},
                   {"sources": [{"model": "a", "layer_range": [2, 4]}]}]},
    "models form with global parameters": {
        "merge_method": "passthrough",
        "models": [{"model": "a", "parameters": {"scale": [{"filter": "down_proj", "value": [0.5, 1.0]}]}}],
        "parameters": {"scale": 0.25}},
    "linear, normalize false: the weight is a scale": {
        "merge_method": "linear", "parameters": {"normalize": False},
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": [0.5, 1.5]}},
                                {"model": "b", "layer_range": [0, 2], "parameters": {"weight": 0}}]},
                   {"sources": [{"model": "a", "layer_range": [1, 4], "parameters": {"weight": 0}},
                                {"model": "b", "layer_range": [1, 4], "parameters": {"weight": 0.8}}]}]},
    "linear, normalize per slice as a discrete list": {
        "merge_method": "linear", "parameters": {"weight": 0.5},
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]},
                                {"model": "b", "layer_range": [0, 3], "parameters": {"weight": 0}}],
                    "parameters": {"normalize": [False, True]}}]},
    "linear, normalized weights keep the tensors": {
        "merge_method": "linear", "tokenizer_source": "b",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": 0.0}},
                                {"model": "b", "layer_range": [0, 2], "parameters": {"weight": 0.3}}]}]},
    "tokenizer_source base": {
        "merge_method": "passthrough", "base_model": "a", "tokenizer_source": "base",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4],
                                 "parameters": {"scale": [{"filter": "lm_head", "value": 0.5}]}}]}]},
}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mk")
    return {"a": make_model(d / "a.gguf", seed=11), "b": make_model(d / "b.gguf", seed=12)}


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.array(t.data, dtype=np.float32).reshape(-1)) for t in r.tensors}


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_rule(case: str, two_models: dict[str, Path], tmp_path: Path) -> None:
    config = CASES[case]
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    named = {m["model"] for m in config.get("models", [])} | {
        src["model"] for sl in config.get("slices", []) for src in sl["sources"]}
    models = [x for m, p in two_models.items() if m in named for x in ("--model", f"{m}={p}")]
    expected = mk_plan(config, {"a": 4, "b": 4})

    proc = cli("plan", "--config", cfg, *models, "--json", check=True)
    plan = json.loads(proc.stdout)["plan"]
    got_factors = {f"blk.{l['index']}.{s}": f for l in plan["layers"] for s, f in l["scales"].items()}
    got_factors.update(plan["global_scales"])
    want_factors = {n: f for n, (_, _, f) in expected.items() if f != 1.0}
    assert got_factors == pytest.approx(want_factors, rel=0, abs=0), case
    assert [(l["model"], l["source_layer"]) for l in plan["layers"]] == [
        (expected[f"blk.{i}.attn_q.weight"][0], int(expected[f"blk.{i}.attn_q.weight"][1].split(".")[1]))
        for i in range(len(plan["layers"]))]

    out = tmp_path / "out.gguf"
    cli("upscale", "--config", cfg, *models, "-o", out, check=True)
    got = _tensors(out)
    sources = {m: _tensors(p) for m, p in two_models.items()}
    assert set(got) == set(expected)
    for name, (model, src_name, factor) in expected.items():
        typ, x = sources[model][src_name]
        # an unscaled tensor is copied: mergekit's cast of the whole model to `dtype` is the identity
        # on a GGUF converted from a checkpoint in that dtype, and is not re-done (README)
        want = x if factor == 1.0 else stored(mk_value(x, factor, config.get("dtype")), typ)
        assert got[name][0] == typ
        np.testing.assert_array_equal(got[name][1], want, err_msg=f"{case}: {name} ({factor})")
    if "dtype" in config:  # the recorded recipe keeps the dtype: verify recomputes the same rounding
        cli("verify", out, *models, check=True)


def test_float16_rounding_differs_from_float32() -> None:
    """The dtype rule is observable: a scaled F32 norm rounded through float16 is not the float32 product."""
    x = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    assert not np.array_equal(mk_value(x, 0.9, "float16"), mk_value(x, 0.9, None))


@pytest.mark.parametrize("key, value, fragment", [
    ("dtype", "int8", "dtype"),
    ("tokenizer_source", "elsewhere", "tokenizer_source"),
])
def test_what_mergekit_refuses(key: str, value: str, fragment: str, two_models: dict[str, Path],
                               tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(json.dumps({"merge_method": "passthrough", key: value,
                               "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]}]}))
    assert_one_line_error(cli("plan", "--config", cfg, "--model", f"a={two_models['a']}"), fragment)


def test_gguf_name_filter_is_warned_and_matches_nothing(two_models: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "gguf-names.yaml"
    cfg.write_text(json.dumps({"merge_method": "passthrough", "slices": [{"sources": [
        {"model": "a", "layer_range": [0, 4], "parameters": {"scale": [{"filter": "ffn_down", "value": 0}]}}]}]}))
    proc = cli("plan", "--config", cfg, "--model", f"a={two_models['a']}", "--json", check=True)
    assert "ffn_down" in proc.stderr and "matches no tensor" in proc.stderr
    assert all(not l["scales"] for l in json.loads(proc.stdout)["plan"]["layers"])


@pytest.mark.parametrize("filt, hits", [
    ("experts.down_proj", {"ffn_down_exps.weight"}),
    ("gate_up_proj", {"ffn_gate_exps.weight", "ffn_up_exps.weight"}),  # one fused HF tensor, two GGUF ones
    ("mlp.gate.", {"ffn_gate_inp.weight"}),  # the router
    ("down_proj.weight", set()),  # mergekit's stacked expert tensors carry no ".weight"
])
def test_moe_filters_use_mergekits_stacked_expert_names(filt: str, hits: set[str], tmp_path: Path) -> None:
    """mergekit 0.1.5 (qwen3_moe.json, mixtral.json) names experts model.layers.N.mlp.experts.down_proj
    and .gate_up_proj, stacked like GGUF's *_exps, and the router mlp.gate.weight."""
    src = make_model(tmp_path / "moe.gguf", arch="qwen3moe", n_layer=2)
    cfg = tmp_path / "moe.yaml"
    cfg.write_text(json.dumps({"merge_method": "passthrough", "slices": [{"sources": [
        {"model": "m", "layer_range": [0, 2], "parameters": {"scale": [{"filter": filt, "value": 0.5}]}}]}]}))
    proc = cli("plan", "--config", cfg, "--model", f"m={src}", "--json", check=True)
    layers = json.loads(proc.stdout)["plan"]["layers"]
    assert all(set(layer["scales"]) == hits for layer in layers), layers
