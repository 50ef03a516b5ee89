"""Model card (README.md) for upscaled outputs: front matter, recipe, license, files, smoke, writing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import cli, metadata
from modelfactory import make_model
from upscaler import __version__
from upscaler.errors import OutputError
from upscaler.format.source import SourceModel
from upscaler.planning.recipe import parse_yaml_text
from upscaler.publish.model_card import card_path, render_model_card, repo_id_from_url, write_model_card

JA_NAME = "カラクリ LM テスト 70B Chat v0.1"
REPO = "karakuri-ai/karakuri-lm-70b-chat-v0.1"
KARAKURI_KV: dict[str, Any] = {
    "general.name": JA_NAME,
    "general.license": "llama2",
    "general.source.repo_url": f"https://huggingface.co/{REPO}",
    "general.languages": ["ja", "en"],
    "general.tags": ["llama", "japanese", "llama", "merge"],
    "general.base_model.0.name": "Karakuri LM 70B v0.1",
    "general.base_model.0.repo_url": "https://huggingface.co/karakuri-ai/karakuri-lm-70b-v0.1",
    "general.description": "ソースモデルの説明",
    "general.uuid": "00000000-0000-0000-0000-000000000001",
}
SMOKE = {
    "model": "/somewhere/private/out.gguf", "loaded": True, "text": " 静かな海辺の町です。", "prompt": "町の説明:",
    "chat": False, "perplexity": 12.3456, "n_tokens_scored": 1023, "n_ctx": 512, "n_vocab": 512,
    "n_generated": 8, "reference": "/somewhere/private/src.gguf", "reference_perplexity": 11.5,
    "kl_divergence": 0.0123, "kl_divergence_max": 0.5, "top1_agreement": 0.931,
}


def _split(card: str) -> tuple[dict[str, Any], str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    fm = yaml.safe_load(head)
    assert isinstance(fm, dict)
    return fm, body


def _yaml_block(body: str) -> str:
    m = re.search(r"^```yaml\n(.*?)\n```$", body, re.S | re.M)
    assert m, body
    return m.group(1)


def _upscale(src: Path, out: Path, *extra: object) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = cli("upscale", src, "--slices", "0:3,1:4", "-o", out, "-q", *extra, check=True)
    assert proc.returncode == 0
    return sorted(out.parent.glob(out.stem + "*.gguf"))


def _card(src: Path, outs: list[Path], **kw: Any) -> str:
    model = SourceModel(src, name=src.name)  # --slices names the model by its file name
    kw.setdefault("recipe_yaml", None)
    return render_model_card(outs, sources={src.name: model}, **kw)


@pytest.fixture(scope="module")
def karakuri(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp("card")
    src = make_model(d / "src" / "karakuri-tiny-F16.gguf", extra_kv=KARAKURI_KV)
    return src, _upscale(src, d / "out" / "karakuri-tiny-upscaled.gguf")


def test_front_matter_is_hub_yaml_with_lineage_license_language_tags(karakuri) -> None:
    src, outs = karakuri
    fm, body = _split(_card(src, outs))
    assert fm["base_model"] == [REPO]
    assert fm["base_model_relation"] == "merge"
    assert fm["library_name"] == "gguf"
    assert fm["license"] == "llama2" and "license_name" not in fm
    assert fm["language"] == ["ja", "en"]
    assert fm["pipeline_tag"] == "text-generation"
    tags = fm["tags"]
    assert len(tags) == len(set(tags))
    assert set(tags) >= {"gguf", "merge", "mergekit", "frankenmerge", "gguf-upscale", "llama", "japanese"}
    # the grandparent is lineage text, not a base_model of the merge
    assert "karakuri-ai/karakuri-lm-70b-v0.1" not in fm["base_model"]
    assert "itself based on [karakuri-ai/karakuri-lm-70b-v0.1]" in body


def test_recipe_block_parses_back_to_the_same_slices(karakuri) -> None:
    src, outs = karakuri
    _, body = _split(_card(src, outs))
    recipe = parse_yaml_text(_yaml_block(body))
    assert recipe.method == "passthrough"
    assert [tuple(s.sources[0].layer_range) for s in recipe.slices] == [(0, 3), (1, 4)]
    assert {s.sources[0].model for s in recipe.slices} == {src.name}
    # exactly what the output records
    assert _yaml_block(body) == str(metadata(outs[0])["upscale.recipe"]).rstrip("\n")
    # an explicit recipe text is shown verbatim
    given = ("merge_method: passthrough\nslices:\n"
             f"  - sources: [{{model: {src.name}, layer_range: [0, 3]}}]\n"
             f"  - sources: [{{model: {src.name}, layer_range: [1, 4]}}]")
    _, body2 = _split(_card(src, outs, recipe_yaml=given))
    assert _yaml_block(body2) == given


def test_layer_map_files_and_how_to_run(karakuri) -> None:
    src, outs = karakuri
    _, body = _split(_card(src, outs, quant_type="F16"))
    assert "| 0–2 | karakuri-ai/karakuri-lm-70b-chat-v0.1 | 0–2 | 3 |" in body
    assert "| 3–5 | karakuri-ai/karakuri-lm-70b-chat-v0.1 | 1–3 | 3 |" in body
    assert "4 → 6 layers" in body and "Source layers 1–2 are used twice" in body
    # 6 layers x (7 matrices F16 + 2 norms F32) + token_embd, output (F16) + output_norm (F32)
    assert re.search(rf"\| {re.escape(outs[0].name)} \| [\d.]+ MB \| F16 \| 57 \| F16 ×44, F32 ×13 \|", body), body
    assert f"llama-cli -m {outs[0].name}" in body
    assert f'Llama(model_path="{outs[0].name}"' in body
    assert f"Made with `gguf-upscale {__version__}`" in body


def test_license_carried_with_inheritance_statement(karakuri) -> None:
    src, outs = karakuri
    _, body = _split(_card(src, outs))
    lic = body.split("## License", 1)[1]
    assert "`llama2`" in lic and "general.license" in lic
    assert "inherits the license and use restrictions of its base model" in lic
    assert "must comply" in lic


def test_unknown_license_is_flagged(tmp_path: Path) -> None:
    src = make_model(tmp_path / "nolicense.gguf", extra_kv={"general.license": None})
    outs = _upscale(src, tmp_path / "out" / "up.gguf")
    card = _card(src, outs)
    fm, body = _split(card)
    assert fm["license"] == "unknown"
    assert "# license: the source GGUF records no license" in card.split("\n---\n")[0]
    assert "**The license is unknown:**" in body
    assert "inherits the license and use restrictions" in body
    # the fixture's only repo URL is its own parent's: no repo id for the source itself, none invented
    assert "base_model" not in fm and fm["base_model_relation"] == "merge"
    assert "# base_model: no Hugging Face repo id is recorded" in card


def test_other_license_gets_name_and_link(tmp_path: Path) -> None:
    src = make_model(tmp_path / "custom.gguf", extra_kv={
        "general.license": "other", "general.license.name": "Karakuri LM License",
        "general.license.link": "https://example.org/karakuri-license"})
    outs = _upscale(src, tmp_path / "out" / "up.gguf")
    fm, body = _split(_card(src, outs))
    assert fm["license"] == "other"
    assert fm["license_name"] == "karakuri-lm-license"
    assert fm["license_link"] == "https://example.org/karakuri-license"
    md = metadata(outs[0])
    assert md["general.license"] == "other"
    assert md["general.license.name"] == "Karakuri LM License"
    assert md["general.license.link"] == "https://example.org/karakuri-license"


def test_japanese_survives_in_card_and_file(karakuri, tmp_path: Path) -> None:
    src, outs = karakuri
    card = _card(src, outs, smoke=SMOKE)
    _, body = _split(card)
    assert f"# {JA_NAME} upscaled 6L" in body
    assert "静かな海辺の町です。" in body and "町の説明:" in body
    path = write_model_card(card, tmp_path, force=False)
    assert path.read_bytes().decode("utf-8") == card


def test_smoke_section_only_when_given(karakuri) -> None:
    src, outs = karakuri
    _, without = _split(_card(src, outs))
    assert "## Smoke test" not in without
    _, body = _split(_card(src, outs, smoke=SMOKE))
    smoke = body.split("## Smoke test", 1)[1].split("\n## ", 1)[0]
    assert "not a benchmark" in smoke
    assert "| 12.35 (source: 11.50) |" in smoke
    assert "0.0123 / 0.5000" in smoke
    assert "93.1 %" in smoke
    assert "`src.gguf`" in smoke and "/somewhere/private" not in body
    # a smoke run without a reference: perplexity only
    _, alone = _split(_card(src, outs, smoke={k: v for k, v in SMOKE.items()
                                              if k not in ("reference", "reference_perplexity", "kl_divergence",
                                                           "kl_divergence_max", "top1_agreement")}))
    assert "| 12.35 |" in alone and "KL divergence from the source" not in alone


def test_deterministic_and_no_local_paths(karakuri) -> None:
    src, outs = karakuri
    cmd = f"gguf-upscale upscale {src} --slices 0:3,1:4 -o {outs[0]} --model x=/home/alice/m.gguf"
    a = _card(src, outs, smoke=SMOKE, command_line=cmd)
    b = _card(src, outs, smoke=SMOKE, command_line=cmd)
    assert a == b
    assert str(src.parent) not in a and "/home/alice" not in a
    assert f"gguf-upscale upscale {src.name} --slices 0:3,1:4 -o {outs[0].name} --model x=m.gguf" in a


def test_split_output_lists_every_shard(tmp_path: Path, tiny_llama: Path) -> None:
    outs = _upscale(tiny_llama, tmp_path / "out" / "split.gguf", "--split-max-size", "3M")
    assert len(outs) > 1
    card = _card(tiny_llama, outs[:1])  # the first shard is enough: the set is found from it
    _, body = _split(card)
    for p in outs:
        assert f"| {p.name} |" in body
    assert f"**all {len(outs)} files**" in body
    assert f"llama-cli -m {outs[0].name}" in body


def test_two_models_with_different_licenses(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a.gguf", seed=1, name="Model A", extra_kv={
        "general.license": "apache-2.0", "general.repo_url": "https://huggingface.co/org-a/model-a"})
    b = make_model(tmp_path / "b.gguf", seed=2, name="Model B", extra_kv={
        "general.license": "llama2", "general.source.repo_url": "https://huggingface.co/org-b/model-b/tree/main"})
    cfg = tmp_path / "goliath.yaml"
    cfg.write_text("merge_method: passthrough\nslices:\n"
                   "  - sources: [{model: model-a, layer_range: [0, 2]}]\n"
                   "  - sources: [{model: model-b, layer_range: [1, 4]}]\n")
    out = tmp_path / "out" / "g.gguf"
    out.parent.mkdir()
    cli("upscale", "--config", cfg, "--model", f"model-a={a}", "--model", f"model-b={b}", "-o", out, check=True)
    md = metadata(out)
    assert md["general.license"] == "apache-2.0,llama2"
    assert md["general.base_model.0.repo_url"] == "https://huggingface.co/org-a/model-a"
    assert md["general.base_model.1.repo_url"] == "https://huggingface.co/org-b/model-b/tree/main"
    card = render_model_card([out], sources={"model-a": SourceModel(a, "model-a"), "model-b": SourceModel(b, "model-b")},
                             recipe_yaml=cfg.read_text(), smoke=None, quant_type=None, command_line=None)
    fm, body = _split(card)
    assert fm["base_model"] == ["org-a/model-a", "org-b/model-b"]
    assert fm["license"] == "other" and fm["license_name"] == "apache-2.0-and-llama2"
    assert "* [org-a/model-a](https://huggingface.co/org-a/model-a): `apache-2.0`" in body
    assert "* [org-b/model-b](https://huggingface.co/org-b/model-b): `llama2`" in body
    assert "| 0–1 | org-a/model-a | 0–1 | 2 |" in body and "| 2–4 | org-b/model-b | 1–3 | 3 |" in body
    assert "base models" in body and "inherits the license and use restrictions of its base models" in body


def test_output_gguf_metadata_for_hub_lineage(karakuri) -> None:
    src, outs = karakuri
    md = metadata(outs[0])
    assert md["general.license"] == "llama2"
    assert md["general.languages"] == ["ja", "en"]
    assert md["general.base_model.count"] == 1
    assert md["general.base_model.0.name"] == JA_NAME
    assert md["general.base_model.0.repo_url"] == f"https://huggingface.co/{REPO}"
    assert md["general.base_model.0.description"] == "ソースモデルの説明"
    tags = md["general.tags"]
    assert tags == ["llama", "japanese", "merge", "frankenmerge", "gguf-upscale"]
    # the source's own identity is not claimed by the output (it moved to general.base_model.0.*)
    for key in ("general.source.repo_url", "general.uuid", "general.description"):
        assert key not in md, key


def test_repo_ids_only_from_real_hub_urls() -> None:
    assert repo_id_from_url("https://huggingface.co/karakuri-ai/karakuri-lm-70b-chat-v0.1") == REPO
    assert repo_id_from_url("https://hf.co/org/m.v1/tree/main") == "org/m.v1"
    assert repo_id_from_url("https://huggingface.co/org/m.git") == "org/m"
    assert repo_id_from_url("https://huggingface.co/datasets/org/data") is None
    assert repo_id_from_url("https://github.com/org/m") is None
    assert repo_id_from_url("https://huggingface.co/org") is None
    assert repo_id_from_url(None) is None


def test_title_cased_organization_and_name_make_no_repo_id(tmp_path: Path) -> None:
    # what convert_hf_to_gguf writes from a folder name: not a repo id, so none is invented
    src = make_model(tmp_path / "s.gguf", name="Smollm2 135M Instruct", extra_kv={"general.organization": "HuggingFaceTB"})
    outs = _upscale(src, tmp_path / "out" / "up.gguf")
    fm, body = _split(_card(src, outs))
    assert "base_model" not in fm
    assert "its Hugging Face repo is not recorded in the GGUF" in body
    # ... but an organization and a name that are repo-id parts are taken as stated
    src2 = make_model(tmp_path / "s2.gguf", name="SmolLM2-135M", extra_kv={"general.organization": "HuggingFaceTB"})
    outs2 = _upscale(src2, tmp_path / "out2" / "up.gguf")
    fm2, _ = _split(_card(src2, outs2))
    assert fm2["base_model"] == ["HuggingFaceTB/SmolLM2-135M"]


def test_write_never_overwrites_without_force(karakuri, tmp_path: Path) -> None:
    src, outs = karakuri
    card = _card(src, outs)
    path = write_model_card(card, tmp_path, force=False)
    assert path == tmp_path / "README.md"
    with pytest.raises(OutputError, match=r"README\.md: model card already exists \(use --force"):
        write_model_card("other\n", tmp_path, force=False)
    assert path.read_text(encoding="utf-8") == card
    write_model_card("replaced\n", tmp_path, force=True)
    assert path.read_text(encoding="utf-8") == "replaced\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary files left
    assert (path.stat().st_mode & 0o777) != 0o600  # a normal file, not mkstemp's private mode


def test_card_path_rules(tmp_path: Path) -> None:
    assert card_path(tmp_path) == tmp_path / "README.md"
    assert card_path(tmp_path / "model.gguf") == tmp_path / "model.md"
    assert card_path(tmp_path / "model-00001-of-00003.gguf") == tmp_path / "model.md"
    assert card_path(tmp_path / "card.md") == tmp_path / "card.md"
    with pytest.raises(OutputError):
        card_path(tmp_path / "missing-folder")
    with pytest.raises(OutputError, match="does not exist"):
        write_model_card("x\n", tmp_path / "nope" / "README.md", force=False)
    (tmp_path / "README.md").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        write_model_card("x\n", tmp_path, force=True)


def test_not_an_upscaled_file_is_refused(tiny_llama: Path) -> None:
    from upscaler.errors import UpscaleError
    with pytest.raises(UpscaleError, match="not an upscaled GGUF"):
        render_model_card([tiny_llama], sources={}, recipe_yaml=None, smoke=None, quant_type=None, command_line=None)


def test_cli_upscale_writes_the_card_beside_the_output(karakuri, tmp_path: Path) -> None:
    """Default on: NAME.md beside NAME.gguf, with the recipe and the command; --force replaces it with
    the output; a card in the way is refused before any output is written; --no-model-card writes none."""
    src, _ = karakuri
    out = tmp_path / "k-up.gguf"
    proc = cli("upscale", src, "--slices", "0:3,1:4", "-o", out, check=True)
    card = tmp_path / "k-up.md"
    assert str(card) in proc.stdout
    text = card.read_text(encoding="utf-8")
    fm, body = _split(text)
    assert fm["license"] == "llama2" and REPO in fm["base_model"]
    assert parse_yaml_text(_yaml_block(body)).slices[1].sources[0].layer_range == (1, 4)
    assert "gguf-upscale upscale karakuri-tiny-F16.gguf --slices 0:3,1:4 -o k-up.gguf" in body
    # the output's own refusal comes first
    proc = cli("upscale", src, "--slices", "0:4", "-o", out)
    assert proc.returncode == 1 and "k-up.gguf: already exists" in proc.stderr
    cli("upscale", src, "--slices", "0:4", "-o", out, "--force", check=True)
    assert card.read_text(encoding="utf-8") != text and "--slices 0:4 " in card.read_text(encoding="utf-8")
    # a card in the way: refused before a byte of output
    other = tmp_path / "other.gguf"
    proc = cli("upscale", src, "--slices", "0:4", "-o", other, "--model-card-path", card)
    assert proc.returncode == 1 and "model card already exists" in proc.stderr and not other.exists()
    cli("upscale", src, "--slices", "0:4", "-o", other, "--no-model-card", check=True)
    assert other.exists() and not (tmp_path / "other.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k-up.gguf", "k-up.md", "other.gguf"]


def test_cli_run_card_has_type_and_smoke_figures(karakuri, tmp_path: Path) -> None:
    src, _ = karakuri
    out = tmp_path / "k-q4.gguf"
    cli("run", src, "--slices", "0:3,1:4", "-o", out, "--threads", "2", check=True)
    body = (tmp_path / "k-q4.md").read_text(encoding="utf-8")
    assert "Q4_K_M" in body and "top-1" in body.lower() and "perplexity" in body.lower()
