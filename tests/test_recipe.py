"""Recipe parsing and mergekit parameter semantics, as pure functions."""

from __future__ import annotations

import pytest

from upscaler.errors import RecipeError
from upscaler.planning.presets import preset_recipe
from upscaler.planning.recipe import evaluate_setting, lookup_parameter, parse_slices, parse_yaml_text


def ranges(recipe):
    return [tuple(s.sources[0].layer_range) for s in recipe.slices]


def test_compact_slices() -> None:
    assert ranges(parse_slices("0:40, 20:60 ,40:80")) == [(0, 40), (20, 60), (40, 80)]


@pytest.mark.parametrize("n, expected", [
    (80, [(0, 40), (20, 60), (40, 80)]),
    (30, [(0, 15), (7, 22), (15, 30)]),
    (32, [(0, 16), (8, 24), (16, 32)]),
])
def test_overlap_halves_preset_scales_with_depth(n: int, expected) -> None:
    assert ranges(preset_recipe("overlap-halves", n)) == expected


def test_solar_preset() -> None:
    assert ranges(preset_recipe("solar", 32)) == [(0, 24), (8, 32)]  # SOLAR 10.7B from a 32-layer Mistral
    assert ranges(preset_recipe("solar:drop=4", 32)) == [(0, 28), (4, 32)]


def test_llama_pro_preset() -> None:
    r = preset_recipe("llama-pro", 32)  # LLaMA-Pro: 32 -> 40 layers, a copy after every 4
    rs = ranges(r)
    assert len(rs) == 16 and sum(b - a for a, b in rs) == 40
    zeroed = [s for s in r.slices if s.sources[0].parameters]
    assert [tuple(s.sources[0].layer_range) for s in zeroed][:2] == [(3, 4), (7, 8)]


def test_seed_yaml_parses_with_anchors() -> None:
    r = parse_yaml_text("""
merge_method: passthrough
base: &m ./karakuri-lm-70b-chat-v0.1
slices:
  - sources: [{model: *m, layer_range: [0, 40]}]
  - sources: [{model: *m, layer_range: [20, 60]}]
dtype: bfloat16
""")
    assert r.model_names() == ["./karakuri-lm-70b-chat-v0.1"]
    assert any("base" in w for w in r.warnings)


def test_filter_list_first_match_wins() -> None:
    setting = [{"filter": "o_proj", "value": 0.0}, {"filter": "self_attn", "value": 0.5}, {"value": 1.0}]
    assert evaluate_setting("model.layers.3.self_attn.o_proj.weight", setting, 0) == 0.0
    assert evaluate_setting("model.layers.3.self_attn.q_proj.weight", setting, 0) == 0.5
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", setting, 0) == 1.0


def test_gradient_interpolates_over_the_slice() -> None:
    assert evaluate_setting("x", [0.0, 1.0], 0.0) == 0.0
    assert evaluate_setting("x", [0.0, 1.0], 0.25) == 0.25
    assert evaluate_setting("x", [0.0, 1.0, 0.0], 0.5) == 1.0


def test_precedence_source_then_slice_then_global() -> None:
    r = parse_yaml_text("""
merge_method: passthrough
parameters: {scale: 0.1}
slices:
  - sources: [{model: m, layer_range: [0, 2], parameters: {scale: 0.3}}]
    parameters: {scale: 0.2}
  - sources: [{model: m, layer_range: [0, 2]}]
    parameters: {scale: 0.2}
  - sources: [{model: m, layer_range: [0, 2]}]
""")
    assert lookup_parameter(r, 0, 0, "scale", "t", 0) == 0.3
    assert lookup_parameter(r, 1, 0, "scale", "t", 0) == 0.2
    assert lookup_parameter(r, 2, 0, "scale", "t", 0) == 0.1


def test_models_form_is_whole_model() -> None:
    r = parse_yaml_text("merge_method: passthrough\nmodels:\n  - model: a\n    parameters: {scale: 1.0}\n")
    assert r.model_names() == ["a"]
    with pytest.raises(RecipeError, match="exactly one model"):
        parse_yaml_text("merge_method: passthrough\nmodels:\n  - model: a\n  - model: b\n")


def test_recipe_round_trips_through_yaml() -> None:
    r = preset_recipe("llama-pro:every=2", 4)
    again = parse_yaml_text(r.to_yaml())
    assert ranges(again) == ranges(r)
    assert again.slices[1].sources[0].parameters == r.slices[1].sources[0].parameters


def test_star_filter_validation_and_empty_lists() -> None:
    """mergekit 0.1.5's evaluate_setting: "*" matches everything, values are validated as the
    parameter's type before a list is called a gradient, an empty list is no value."""
    from upscaler.planning.recipe import NORMALIZE, SCALE
    assert evaluate_setting("lm_head.weight", [{"filter": "*", "value": 0.5}], 0, validate=SCALE) == 0.5
    assert evaluate_setting("lm_head.weight", {"filter": "*", "value": [0.0, 1.0]}, 0.25, validate=SCALE) == 0.25
    assert evaluate_setting("x", ["0.5", True], 0.5, validate=SCALE) == 0.75  # strings and booleans are numbers
    assert evaluate_setting("x", [False, True], 0.5, validate=NORMALIZE) is False  # discrete: int(0.5) == 0
    assert evaluate_setting("x", [], 0.5, validate=SCALE) is None
    assert evaluate_setting("model.norm.weight", [{"filter": "o_proj", "value": 0}], 0, validate=SCALE) is None
    with pytest.raises(RecipeError, match="valid number"):
        evaluate_setting("x", "half", 0, validate=SCALE)


def test_filter_list_matching_nothing_falls_through() -> None:
    r = parse_yaml_text("""
merge_method: passthrough
parameters: {scale: 0.1}
slices:
  - sources: [{model: m, layer_range: [0, 2], parameters: {scale: [{filter: o_proj, value: 0}]}}]
    parameters: {scale: [{filter: mlp, value: 0.5}]}
""")
    assert lookup_parameter(r, 0, 0, "scale", "model.layers.0.self_attn.o_proj.weight", 0) == 0
    assert lookup_parameter(r, 0, 0, "scale", "model.layers.0.mlp.up_proj.weight", 0) == 0.5
    assert lookup_parameter(r, 0, 0, "scale", "model.layers.0.self_attn.q_proj.weight", 0) == 0.1


def test_dtype_names_and_models_form_base_model() -> None:
    assert parse_yaml_text("merge_method: passthrough\ndtype: torch.bfloat16\nmodels: [{model: a}]\n").dtype == "bfloat16"
    with pytest.raises(RecipeError, match="dtype"):
        parse_yaml_text("merge_method: passthrough\ndtype: int64\nmodels: [{model: a}]\n")
    with pytest.raises(RecipeError, match="base_model"):
        parse_yaml_text("merge_method: passthrough\nbase_model: b\nmodels: [{model: a}]\n")
