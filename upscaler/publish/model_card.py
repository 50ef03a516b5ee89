"""Model card (a Hugging Face-style README.md) for an upscaled GGUF, written next to it.

What goes in, and where it comes from (nothing is invented):

- front matter: ``base_model`` lists the sources' Hugging Face repo ids, only where a source GGUF
  records one (``general.repo_url`` / ``general.source.repo_url`` pointing at huggingface.co, or
  ``general.organization`` + ``general.name`` when both are already repo-id shaped);
  ``license`` from the sources' ``general.license`` (``other`` + ``license_name``/``license_link``
  when it is not a Hub license id); ``language`` from ``general.languages``; tags;
- the recipe exactly as recorded (mergekit YAML), the layer map read back from the output's
  ``upscale.*`` lineage keys, the files with their tensor types, the smoke-test figures when
  given, how to run it, the license with the inheritance statement, and how it was made.

Output is deterministic for the same inputs (no clock, no absolute paths: local paths in the
command line are shortened to file names).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import yaml

from .. import __version__
from ..errors import OutputError, UpscaleError
from ..format.atomic import atomic_write
from ..format.source import SHARD_RE, SourceModel
from ..planning.metadata import base_models, recorded_lineage
from ..planning.plan import Plan
from .report import human_bytes, human_count

__all__ = ["CARD_NAME", "card_is_stale", "card_owner", "card_path", "check_card_writable", "render_model_card",
           "repo_id_from_url", "write_model_card"]

CARD_NAME = "README.md"
TOOL = "gguf-upscale"

# Licence ids the Hugging Face Hub accepts in `license:` (hub-docs, "Licenses"); anything else is
# written as `license: other` with `license_name` (and `license_link` when the source has one).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0
odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3
llama4 gemma unknown other
""".split())

# Hub pipeline tags a source may carry in general.tags (convert_hf_to_gguf copies the card's
# pipeline_tag there); a decoder LLM with none of them is text-generation.
PIPELINE_TAGS = ("text-generation", "text2text-generation", "image-text-to-text", "feature-extraction",
                 "sentence-similarity", "fill-mask", "text-classification")
OUR_TAGS = ("gguf", "merge", "mergekit", "frankenmerge", TOOL)

_ID_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HF_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([^/?#]+)/([^/?#]+)(?:[/?#].*)?$")


# --------------------------------------------------------------------------- small helpers


def _is_id_part(s: str) -> bool:
    return bool(_ID_PART.match(s)) and "--" not in s and ".." not in s


def repo_id_from_url(url: Any) -> str | None:
    """`https://huggingface.co/org/name[/tree/...]` -> `org/name`; None for anything else."""
    if not isinstance(url, str):
        return None
    m = _HF_URL.match(url.strip())
    if not m:
        return None
    org, name = m.group(1), m.group(2)
    if name.endswith(".git"):
        name = name[:-4]
    if org in ("datasets", "spaces", "models", "docs", "api", "blog") or not (_is_id_part(org) and _is_id_part(name)):
        return None
    return f"{org}/{name}"


def _repo_id(m: SourceModel) -> str | None:
    """The source's own Hub repo id, only from what its metadata states."""
    for key in ("general.repo_url", "general.source.repo_url"):
        rid = repo_id_from_url(m.get(key))
        if rid:
            return rid
    org, name = m.get("general.organization"), m.get("general.name")
    if isinstance(org, str) and isinstance(name, str):
        if "/" in name and repo_id_from_url(f"https://huggingface.co/{name}") and name.split("/")[0] == org:
            return name
        if _is_id_part(org) and _is_id_part(name):
            return f"{org}/{name}"
    return None


def _hub_link(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}"


# Markup characters; `_` only at a word edge (GFM ignores intraword underscores, so Q4_K_M stays readable).
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def _md(text: Any) -> str:
    """Plain text for Markdown prose and table cells (markup characters escaped, one line)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _code(text: Any) -> str:
    """Inline code span that survives backticks in the text."""
    s = " ".join(str(text).split())
    ticks = max((len(r) for r in re.findall(r"`+", s)), default=0)
    fence = "`" * (ticks + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _fence(body: str, lang: str = "") -> str:
    ticks = max((len(r) for r in re.findall(r"`{3,}", body)), default=2)
    f = "`" * max(3, ticks + 1)
    return f"{f}{lang}\n{body.rstrip(chr(10))}\n{f}"


def _file_stem(path: Path) -> str:
    m = SHARD_RE.match(path.name)
    return m.group("stem") if m else path.stem


def _ranges(indices: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] + 1 == i:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}–{b}"


def _spans(indices: Iterable[int]) -> str:
    return ", ".join(_span(a, b) for a, b in _ranges(indices))


def _times(n: int) -> str:
    return {1: "once", 2: "twice", 3: "three times", 4: "four times"}.get(n, f"{n} times")


def _file_type_name(ftype: Any) -> str | None:
    if ftype is None:
        return None
    from ..quant.quant_types import QUANT_TYPES
    for q in QUANT_TYPES:
        if q.ftype == int(ftype) and q.name != "COPY":
            return q.name
    try:
        from gguf import LlamaFileType
        return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return None


def _type_counts(types: Iterable[str]) -> str:
    c = Counter(types)
    return ", ".join(f"{t} ×{n}" for t, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9.+]+", "-", text.lower()).strip("-")
    return s or "custom"


def _shorten_paths(command_line: str) -> str:
    """Absolute local paths in a command line become file names (a card is public)."""
    try:
        argv = shlex.split(command_line)
    except ValueError:
        return command_line

    def short(tok: str) -> str:
        if tok.startswith(("/", "~")) and len(tok) > 1:
            return Path(tok).name or tok
        for sep in ("=",):
            head, eq, tail = tok.partition(sep)
            if eq and tail.startswith(("/", "~")) and len(tail) > 1:
                return f"{head}={Path(tail).name or tail}"
        return tok

    return shlex.join(short(t) for t in argv)


# --------------------------------------------------------------------------- gathering facts


class _Source:
    """What the card says about one source model."""

    def __init__(self, recipe_name: str, m: SourceModel):
        self.recipe_name = recipe_name
        self.model = m
        self.repo_id = _repo_id(m)
        self.title = str(m.get("general.name") or m.get("general.basename") or _file_stem(m.path))
        self.license = _str_or_none(m.get("general.license"))
        self.license_name = _str_or_none(m.get("general.license.name"))
        self.license_link = _str_or_none(m.get("general.license.link"))
        self.tags = [str(t) for t in (m.get("general.tags") or [])]
        self.languages = [str(t) for t in (m.get("general.languages") or [])]
        self.file_type = _file_type_name(m.get("general.file_type")) or _dominant_type(m)
        self.parents = [{k: str(v) for k, v in bm.items()}
                        for bm in base_models({k: kv.value for k, kv in m.kvs.items()})]

    @property
    def label(self) -> str:
        return self.repo_id or self.title

    def link_md(self) -> str:
        return f"[{_md(self.repo_id)}]({_hub_link(self.repo_id)})" if self.repo_id else f"**{_md(self.title)}**"


def _str_or_none(v: Any) -> str | None:
    return str(v).strip() or None if v is not None else None


def _dominant_type(m: SourceModel) -> str:
    c = Counter(t.ggml_type.name for t in m.tensors.values() if len(t.shape) >= 2)
    return max(sorted(c), key=lambda k: c[k]) if c else "?"


def _license_front_matter(srcs: list[_Source]) -> tuple[dict[str, str], str]:
    """(front-matter license fields, state) with state one of known / unknown / mixed."""
    if any(s.license is None for s in srcs):
        return {"license": "unknown"}, "unknown"
    distinct = list(dict.fromkeys(s.license or "" for s in srcs))
    if len(distinct) > 1:
        return {"license": "other", "license_name": "-and-".join(_slug(x) for x in distinct)}, "mixed"
    lic = distinct[0] or ""
    s0 = srcs[0]
    if lic.lower() in HUB_LICENSES and lic.lower() != "other":
        return {"license": lic.lower()}, "known"
    fm = {"license": "other", "license_name": _slug(s0.license_name or (lic if lic.lower() != "other" else "custom"))}
    if s0.license_link:
        fm["license_link"] = s0.license_link
    return fm, "known"


def _pipeline_tag(srcs: list[_Source]) -> str:
    for s in srcs:
        for t in s.tags:
            if t in PIPELINE_TAGS:
                return t
    return "text-generation"  # every architecture gguf-upscale accepts is a decoder-only LLM


# --------------------------------------------------------------------------- rendering


def render_model_card(output_paths: list[Path], *, sources: dict[str, SourceModel], recipe_yaml: str | None,
                      smoke: dict[str, Any] | None = None, quant_type: str | None = None,
                      command_line: str | None = None, plan: Plan | None = None) -> str:
    """The README.md for the written output (`output_paths`: its file or shards, first shard first).

    `sources`: recipe model name -> opened source model, in the plan's order. `recipe_yaml`: the
    recipe as recorded (the output's `upscale.recipe` is used when None). `smoke`:
    `SmokeReport.to_dict()` or None. `quant_type`: the llama-quantize type the output was made
    with (else read from `general.file_type`). `command_line`: how it was made, shown as given
    except that absolute paths are shortened to file names. `plan`: the plan the output was made
    from (the layer map's scale notes come from it; none without it).
    """
    if not output_paths:
        raise UpscaleError("model card: no output files given")
    out = SourceModel(Path(output_paths[0]))
    kv = {k: v.value for k, v in out.kvs.items()}
    lineage = recorded_lineage(kv)
    if lineage is None:
        raise UpscaleError(f"{out.path}: not an upscaled GGUF (no upscale.* lineage keys); no model card written")
    recipe_text = recipe_yaml if recipe_yaml else str(lineage.get("recipe") or "")
    if not recipe_text.strip():
        raise UpscaleError(f"{out.path}: no recipe recorded; no model card written")

    srcs = [_Source(name, m) for name, m in sources.items()]
    by_name = {s.recipe_name: s for s in srcs}
    for name in lineage["source_models"]:
        if name not in by_name:
            raise UpscaleError(f"model card: the output names source model {name!r}, which was not given")

    title, _ = card_title(kv, out.path)
    qtype = quant_type.upper() if quant_type else (_file_type_name(kv.get("general.file_type")) or _dominant_type(out))
    arch = str(kv.get("general.architecture"))
    size_label = kv.get("general.size_label")
    files = [(p, p.stat().st_size) for p in out.paths]
    total_bytes = sum(sz for _, sz in files)
    first = out.paths[0].name

    fm_license, license_state = _license_front_matter(srcs)
    parts = [
        _front_matter(srcs, fm_license, license_state),
        f"# {_md(title)}",
        _description(title, srcs, lineage, _slice_count(recipe_text, lineage), out.n_params, size_label, qtype,
                     total_bytes, len(files)),
        _merge_details(srcs, recipe_text, lineage, plan),
        _files_section(out, files, qtype),
    ]
    if smoke:
        parts.append(_smoke_section(smoke))
    parts.append(_how_to_run(first, len(files), kv, arch))
    parts.append(_license_section(srcs, license_state))
    parts.append(_provenance(kv, command_line, lineage))
    parts.append(_owner_marker(out.paths[0]))
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


TITLE_MAX = 48  # a longer general.name reads as an internal name (a path, a run id), not a title


def card_title(kv: dict[str, Any], path: Path) -> tuple[str, str | None]:
    """The card's title, and a note when general.name was too long to serve as one.

    A name like `models--org--x-70b/snapshots/3f2a... upscaled 120L` is what converters write
    from a folder; the card then uses general.basename (or the name's last path part) with the
    size label, and the note tells the user to choose one with --name."""
    name = str(kv.get("general.name") or "").strip()
    if name and len(name) <= TITLE_MAX and "/" not in name and "\\" not in name:
        return name, None
    if not name:
        return _file_stem(path), None
    base = _readable_part(str(kv.get("general.basename") or "").strip() or name)
    label = str(kv.get("general.size_label") or "").strip()
    title = f"{base} upscaled {label}".strip() if label and label not in base else base
    if len(title) > TITLE_MAX:
        title = title[:TITLE_MAX - 1].rstrip(" -_.") + "…"
    return title, (f"general.name {name[:40]!r}{'...' if len(name) > 40 else ''} is long; the model card is "
                   f"titled {title!r}: give the output a readable name with --name")


def _readable_part(name: str) -> str:
    """The telling part of a path-like name: `models--org--x-7b/snapshots/3f2a...` -> `x-7b`."""
    parts = [p for p in re.split(r"[/\\]+", name) if p and p != "snapshots" and not re.fullmatch(r"[0-9a-f]{16,}", p)]
    part = parts[-1] if parts else name
    return part.rsplit("--", 1)[-1] if part.startswith("models--") else part


def _front_matter(srcs: list[_Source], fm_license: dict[str, str], license_state: str) -> str:
    doc: dict[str, Any] = {}
    repo_ids = list(dict.fromkeys(s.repo_id for s in srcs if s.repo_id))
    if repo_ids:
        doc["base_model"] = repo_ids
    doc["base_model_relation"] = "merge"  # the Hub draws the model tree from it (with base_model)
    doc["library_name"] = "gguf"
    doc.update(fm_license)
    langs = list(dict.fromkeys(lang for s in srcs for lang in s.languages))
    if langs:
        doc["language"] = langs
    doc["pipeline_tag"] = _pipeline_tag(srcs)
    tags = list(dict.fromkeys([*OUR_TAGS, *(t for s in srcs for t in s.tags if t not in PIPELINE_TAGS)]))
    doc["tags"] = tags
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10_000, default_flow_style=False)
    notes = []
    missing = [s for s in srcs if not s.repo_id]
    if missing:
        notes.append("# base_model: no Hugging Face repo id is recorded in the source GGUF for "
                     + ", ".join(s.title for s in missing) + "; add it here (e.g. org/model) so the Hub shows the "
                                                             "lineage")
    if license_state == "unknown":
        notes.append("# license: the source GGUF records no license; check the base model's license and set it here")
    return "---\n" + body + "".join(n.replace("\n", " ") + "\n" for n in notes) + "---"


def _usage(srcs: list[_Source], lineage: dict[str, Any]) -> dict[str, Counter]:
    use: dict[str, Counter] = {s.recipe_name: Counter() for s in srcs}
    for m, j in lineage["layers"]:
        use.setdefault(m, Counter())[j] += 1
    return use


def _slice_count(recipe_text: str, lineage: dict[str, Any]) -> int:
    """Slices of the recipe (runs of consecutive source layers if it cannot be read back)."""
    from ..planning.recipe import parse_yaml_text
    try:
        return len(parse_yaml_text(recipe_text, "recorded recipe").slices)
    except UpscaleError:
        return len(_runs(lineage["layers"]))


def _description(title: str, srcs: list[_Source], lineage: dict[str, Any], n_slices: int, n_params: int,
                 size_label: Any, qtype: str, total_bytes: int, n_files: int) -> str:
    use = _usage(srcs, lineage)
    used = [s for s in srcs if use.get(s.recipe_name)]
    n_layers = len(lineage["layers"])
    if len(used) == 1:
        s = used[0]
        head = (f"**{_md(title)}** is a frankenmerge of {s.link_md()} with itself: {n_slices} "
                f"slice{'s' if n_slices != 1 else ''} of its layers stacked with the passthrough method, "
                f"{s.model.block_count} → {n_layers} layers.")
    else:
        names = ", ".join(x.link_md() for x in used[:-1]) + f" and {used[-1].link_md()}"
        per = "; ".join(f"{_md(x.label)} gives {sum(use[x.recipe_name].values())} of them" for x in used)
        head = (f"**{_md(title)}** is a frankenmerge of {names}: {n_slices} slices of their layers interleaved "
                f"with the passthrough method into {n_layers} layers ({per}).")
    reuse = []
    for s in used:
        counts = use[s.recipe_name]
        by_times: dict[int, list[int]] = {}
        for j, c in counts.items():
            if c > 1:
                by_times.setdefault(c, []).append(j)
        who = f"{_md(s.label)} " if len(used) > 1 else ""
        for c in sorted(by_times):
            reuse.append(f"{who}layers {_spans(by_times[c])} are used {_times(c)}")
        unused = [j for j in range(s.model.block_count) if j not in counts]
        if unused:
            reuse.append(f"{who}layers {_spans(unused)} are left out")
    lines = [head]
    if reuse:
        lines.append("Source " + "; ".join(reuse) + ".")
    label = f" (size label {_md(size_label)})" if size_label else ""
    lines.append(f"It has {human_count(n_params)} parameters{label} and is stored here as {_md(qtype)} GGUF, "
                 f"{human_bytes(total_bytes)} in {n_files} file{'s' if n_files != 1 else ''}.")
    para = " ".join(lines)
    note = ("The layers were copied, not trained: no fine-tuning was done after merging, so judge the model by "
            f"evaluating it, not by its size. The merge was done directly on GGUF files by {TOOL}, with the same "
            "layer stacking as mergekit's passthrough method; the recipe below reproduces it.")
    return para + "\n\n" + note


def _runs(layers: list[tuple[str, int]]) -> list[tuple[int, int, str, int, int]]:
    out: list[tuple[int, int, str, int, int]] = []
    for i, (m, j) in enumerate(layers):
        if out:
            oa, ob, om, sa, sb = out[-1]
            if om == m and sb + 1 == j and ob + 1 == i:
                out[-1] = (oa, i, m, sa, j)
                continue
        out.append((i, i, m, j, j))
    return out


def _scales_by_layer(plan: Plan | None, lineage: dict[str, Any]) -> dict[int, str]:
    """Output layer -> 'attn_output ×0, ffn_down ×0' from the plan the output was made with (none
    without a plan, or when the plan's layer map is not the recorded one)."""
    if plan is None or plan.layer_map() != [tuple(x) for x in lineage["layers"]]:
        return {}
    return {l.index: ", ".join(f"{s} ×{f:g}" for s, f in l.scales) for l in plan.layers if l.scales}


def _merge_details(srcs: list[_Source], recipe_text: str, lineage: dict[str, Any], plan: Plan | None) -> str:
    out = ["## Merge details", "", "### Merge method", "",
           "This model was merged using the passthrough merge method: output layers are copies of source "
           "layers, in the order the recipe lists them. The token embeddings come from the first slice's model "
           "and the output norm and head from the last slice's model, as in mergekit.",
           "", "### Models merged", "", "The following models were included in the merge:", ""]
    for s in srcs:
        m = s.model
        files = f"{len(m.paths)} files" if len(m.paths) > 1 else "1 file"
        bits = [f"named {_code(s.recipe_name)} in the recipe",
                f"GGUF {_code(m.path.name)} ({files}, {_md(s.file_type)}, {m.block_count} layers)",
                f"license {_code(s.license)}" if s.license else "license not recorded"]
        line = f"* {s.link_md()}"
        if s.repo_id and s.title != s.repo_id:
            line += f" ({_md(s.title)})"
        org = m.get("general.organization")
        if not s.repo_id and org:
            line += f" by {_md(org)}"
        out.append(line + " — " + "; ".join(bits))
        if not s.repo_id:
            out.append("  * its Hugging Face repo is not recorded in the GGUF")
        if s.parents:
            refs = []
            for p in s.parents:
                rid = repo_id_from_url(p.get("repo_url"))
                name = p.get("name") or rid or "?"
                refs.append(f"[{_md(rid)}]({_hub_link(rid)})" if rid else _md(name))
            out.append("  * itself based on " + ", ".join(refs))
    out += ["", "### Configuration", "",
            "The following YAML configuration was used to produce this model (mergekit format):", "",
            _fence(recipe_text, "yaml"), ""]
    if any(not s.repo_id or s.recipe_name != s.repo_id for s in srcs):
        names = ", ".join(f"{_code(s.recipe_name)} is {s.link_md()}" for s in srcs)
        out.append(f"In the recipe, {names}. To redo the merge with mergekit, point `model:` at the Hugging "
                   f"Face checkpoint; with {TOOL}, give the GGUF file (`--model NAME=FILE`, or as the source "
                   "argument when the recipe names one model).")
        out.append("")
    out += ["### Layer map", "",
            "Layer numbers are inclusive here; `layer_range` in the recipe is half-open, as in mergekit.", ""]
    scales = _scales_by_layer(plan, lineage)
    by_name = {s.recipe_name: s for s in srcs}
    rows = []
    for oa, ob, name, sa, _sb in _runs(lineage["layers"]):
        # split a run where the scaling changes, so each row has one note
        start = oa
        for i in range(oa, ob + 1):
            if i == ob or scales.get(i + 1, "") != scales.get(i, ""):
                rows.append((start, i, name, sa + (start - oa), sa + (i - oa), scales.get(i, "")))
                start = i + 1
    has_notes = any(r[5] for r in rows)
    head = "| output layers | from model | source layers | count |" + (" scaled tensors |" if has_notes else "")
    sep = "|---|---|---|---:|" + ("---|" if has_notes else "")
    out += [head, sep]
    for oa, ob, name, sa, sb, note in rows:
        label = by_name[name].label if name in by_name else name
        row = f"| {_span(oa, ob)} | {_md(label)} | {_span(sa, sb)} | {ob - oa + 1} |"
        out.append(row + (f" {_md(note)} |" if has_notes else ""))
    return "\n".join(out)


def _files_section(out: SourceModel, files: list[tuple[Path, int]], qtype: str) -> str:
    per_file: dict[Path, list[str]] = {p: [] for p, _ in files}
    for t in out.tensors.values():
        per_file.setdefault(t.path, []).append(t.ggml_type.name)
    lines = ["## Files", "", "| file | size | quant type | tensors | tensor types |", "|---|---:|---|---:|---|"]
    for p, size in files:
        types = per_file.get(p, [])
        lines.append(f"| {_md(p.name)} | {human_bytes(size)} | {_md(qtype)} | {len(types)} | {_type_counts(types)} |")
    if len(files) > 1:
        all_types = [t.ggml_type.name for t in out.tensors.values()]
        lines.append(f"| **all {len(files)} files** | {human_bytes(sum(s for _, s in files))} | {_md(qtype)} | "
                     f"{len(all_types)} | {_type_counts(all_types)} |")
        lines += ["", f"The model is split in {len(files)} files (llama.cpp's gguf-split layout). Download all of them "
                      f"into one folder and load the first, {_code(files[0][0].name)}; llama.cpp finds the others."]
    return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str | None:
    if v is None:
        return None
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return None


def _smoke_section(smoke: dict[str, Any]) -> str:
    ref = smoke.get("reference")
    ref_name = _code(Path(str(ref)).name) if ref else "the source model"
    lines = ["## Smoke test", "",
             f"A sanity check run by {TOOL} right after writing the file, **not a benchmark**: it shows that llama.cpp "
             "loads the model and generates with it, and how far its next-token predictions moved from the source's. "
             "Perplexity is measured on a short sample text; "
             f"KL divergence and top-1 agreement compare the next-token predictions with those of {ref_name} on "
             "the same tokens. An upscaled model is a different model and is expected to differ from its source; "
             "these figures catch a broken file, they do not measure quality.", "",
             "| check | result |", "|---|---|"]
    lines.append(f"| loads in llama.cpp | {'yes' if smoke.get('loaded', True) else 'no'} |")
    ppl = _fmt(smoke.get("perplexity"), ".2f")
    if ppl:
        n_tok, n_ctx = smoke.get("n_tokens_scored"), smoke.get("n_ctx")
        where = ", ".join(x for x in (f"{n_tok} tokens" if n_tok else "", f"context {n_ctx}" if n_ctx else "") if x)
        ref_ppl = _fmt(smoke.get("reference_perplexity"), ".2f")
        lines.append(f"| perplexity{f' ({where})' if where else ''} | {ppl}"
                     + (f" (source: {ref_ppl})" if ref_ppl else "") + " |")
    kl = _fmt(smoke.get("kl_divergence"), ".4f")
    if kl:
        kl_max = _fmt(smoke.get("kl_divergence_max"), ".4f")
        lines.append(f"| KL divergence from the source, nats per token (mean{' / max' if kl_max else ''}) | "
                     f"{kl}{f' / {kl_max}' if kl_max else ''} |")
    top1 = _fmt(smoke.get("top1_agreement"), ".4f")
    if top1:
        lines.append(f"| top-1 agreement with the source | {float(top1) * 100:.1f} % |")
    text = smoke.get("text")
    if text:
        prompt = smoke.get("prompt")
        how = "through the model's chat template" if smoke.get("chat") else "as plain text"
        n = smoke.get("n_generated")
        shown = "the prompt followed by the model's continuation" if prompt and not smoke.get("chat") else "the reply"
        lines += ["", f"Greedy sample{f' ({n} tokens)' if n else ''}, prompt given {how}; {shown}:", ""]
        sample = (f"{prompt}{text}" if prompt and not smoke.get("chat") else str(text))
        if prompt and smoke.get("chat"):
            lines += [f"Prompt: {_md(prompt)}", ""]
        lines.append(_fence(sample, "text"))
    return "\n".join(lines)


def _pystr(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a valid Python string literal, double-quoted, UTF-8 kept


def _how_to_run(first: str, n_files: int, kv: dict[str, Any], arch: str) -> str:
    ctx = kv.get(f"{arch}.context_length")
    n_ctx = min(int(ctx), 4096) if isinstance(ctx, int) and ctx > 0 else 4096
    chat = bool(kv.get("tokenizer.chat_template"))
    q = shlex.quote(first)
    cli = [f"llama-cli -m {q} -c {n_ctx} -n 256 -p {shlex.quote('Hello, ')}"]
    if chat:
        cli = [f"llama-cli -m {q} -c {n_ctx} -cnv   # chat, with the model's own template"]
    cli.append(f"llama-server -m {q} -c {n_ctx}   # OpenAI-compatible server on http://localhost:8080")
    if chat:
        py = (f"from llama_cpp import Llama\n\nllm = Llama(model_path={_pystr(first)}, n_ctx={n_ctx})\n"
              "out = llm.create_chat_completion(messages=[{\"role\": \"user\", \"content\": \"Hello!\"}], "
              "max_tokens=256)\n"
              "print(out[\"choices\"][0][\"message\"][\"content\"])")
    else:
        py = (f"from llama_cpp import Llama\n\nllm = Llama(model_path={_pystr(first)}, n_ctx={n_ctx})\n"
              "print(llm(\"Hello, \", max_tokens=256)[\"choices\"][0][\"text\"])")
    split = " (the first file; the others are loaded from the same folder)" if n_files > 1 else ""
    return "\n".join(["## How to run", "",
                      f"With [llama.cpp](https://github.com/ggml-org/llama.cpp){split}:", "",
                      _fence("\n".join(cli), "sh"), "",
                      "With [llama-cpp-python](https://github.com/abetlen/llama-cpp-python):", "",
                      _fence(py, "python")])


def _license_section(srcs: list[_Source], state: str) -> str:
    bases = ", ".join(s.link_md() for s in srcs)
    lines = ["## License", ""]
    if state == "unknown":
        missing = ", ".join(s.link_md() for s in srcs if s.license is None)
        lines.append(f"**The license is unknown:** the source GGUF of {missing} records no license "
                     "(`general.license`). Find the license of the base model and check its terms before you "
                     "publish or use this model; then set `license:` at the top of this card.")
        known = [s for s in srcs if s.license]
        if known:
            lines.append("")
            lines += [f"* {s.link_md()}: {_code(s.license)}" for s in known]
    else:
        s0 = srcs[0]
        if state == "known":
            shown = s0.license if not s0.license_name else f"{s0.license} ({s0.license_name})"
            link = f" — {s0.license_link}" if s0.license_link else ""
            lines.append(f"License: {_code(shown)}{link}, carried from the source GGUF's metadata (`general.license`).")
        else:
            lines.append("The base models carry different licenses (from their GGUF metadata, `general.license`), "
                         "and all of them apply:")
            lines.append("")
            for s in srcs:
                link = f" — {s.license_link}" if s.license_link else ""
                lines.append(f"* {s.link_md()}: {_code(s.license)}{link}")
    lines += ["", f"This model is a derivative of {bases} and inherits the license and use restrictions of its base "
                  f"model{'s' if len(srcs) > 1 else ''}. By using or redistributing it you must comply with them, "
                  "including any attribution, acceptable-use and commercial-use terms; read the original license "
                  f"on the base model's page before you do."]
    return "\n".join(lines)


def _provenance(kv: dict[str, Any], command_line: str | None, lineage: dict[str, Any]) -> str:
    tool = str(lineage.get("tool") or f"{TOOL} {__version__}")
    lines = ["## How it was made", "",
             f"Made with {_code(tool)}, which reads the source GGUF, copies and renumbers its layers per the recipe, "
             "and writes the new GGUF (re-quantizing with llama.cpp's own kernels when a quant type is asked for). "
             "The recipe and the source of every layer are recorded in the file itself (`upscale.*` keys); "
             f"`{TOOL} inspect` shows them and `{TOOL} verify` checks every tensor against the sources."]
    if command_line:
        lines += ["", _fence(_shorten_paths(command_line), "sh")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing


def card_path(dest_dir_or_path: Path) -> Path:
    """Where the card goes: the `.md` path given, `README.md` in a folder given, or `NAME.md` beside a
    `NAME.gguf` output (`NAME-0000N-of-0000M.gguf` shards: `NAME.md`), so that several outputs made in
    one folder (one per quant type) do not contend for one README.md."""
    p = Path(dest_dir_or_path)
    if p.suffix.lower() == ".md":
        return p
    if p.suffix.lower() == ".gguf":
        return p.parent / f"{_file_stem(p)}.md"
    if p.is_dir():
        return p / CARD_NAME
    raise OutputError(f"{p}: model card destination must be a folder, a .gguf output or a .md file")


# The card names the output it describes in an HTML comment (invisible on the Hub), so a card
# whose output was deleted by hand, or re-made since, is recognised as stale and may be replaced
# without --force: it belongs to its output, and must not block the next write of that output.
_OWNER = re.compile(rf"^<!-- {TOOL} model card of: (?P<name>.+?) -->$", re.MULTILINE)


def _owner_marker(first_file: Path) -> str:
    return f"<!-- {TOOL} model card of: {first_file.name} -->"


def card_owner(path: Path) -> str | None:
    """The output file name a card written by us records as its own (None for any other file)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = list(_OWNER.finditer(tail))
    return found[-1].group("name") if found else None


def _output_files(owner: Path) -> list[Path]:
    """The files of output `owner` (OUT.gguf, or its OUT-0000N-of-0000M.gguf shards) that exist."""
    stem = _file_stem(owner)
    files = [owner] if owner.is_file() else []
    files += [p for p in owner.parent.glob(f"{glob.escape(stem)}-*-of-*.gguf") if _file_stem(p) == stem]
    return files


def card_is_stale(path: Path, owner: Path | None) -> bool:
    """A card of ours for output `owner` that no longer describes it: the output is gone, or was
    written after the card (re-made over a deleted one)."""
    if owner is None or not path.is_file():
        return False
    name = card_owner(path)
    if name is None or _file_stem(Path(name)) != _file_stem(owner):
        return False
    files = _output_files(owner)
    if not files:
        return True
    try:
        return path.stat().st_mtime_ns < min(f.stat().st_mtime_ns for f in files)
    except OSError:
        return False


def check_card_writable(path: Path, *, force: bool, owner: Path | None = None) -> None:
    """Refuse before any work is done: existing card without force (unless it is a stale card of
    `owner`, the output it will describe), missing folder, a folder in the way."""
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: folder for the model card does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; cannot write the model card there")
    if (path.exists() or path.is_symlink()) and not force and not card_is_stale(path, owner):
        raise OutputError(f"{path}: model card already exists (use --force to overwrite it, or --no-model-card)")


def write_model_card(card: str, dest_dir_or_path: Path, *, force: bool, owner: Path | None = None) -> Path:
    """Write `card` atomically (atomic.atomic_write); never replace an existing file without
    `force`, except a stale card of `owner` (the output this card describes; see card_is_stale)."""
    path = card_path(Path(dest_dir_or_path))
    check_card_writable(path, force=force, owner=owner)
    force = force or card_is_stale(path, owner)
    try:
        atomic_write(path, card.encode("utf-8"), replace=force)
    except FileExistsError:
        raise OutputError(f"{path}: model card already exists (use --force to overwrite it, "
                          "or --no-model-card)") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot write the model card ({e.strerror or e})") from None
    return path
