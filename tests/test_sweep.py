"""`gguf-upscale sweep`: candidates built and scored against the source scored once, ranked.

Oracles outside the code under test: `upscale` + `run_smoke(candidate, reference=source)` for the
figures (the smoke test's own, one-child path), tensor bytes read back by gguf-py for the kept
and re-built models, hand-written layer ranges for the generated families, a spy on the real
child launcher for "the source is scored once", and a real SIGINT to a real process group.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import ROOT, assert_one_line_error, cli, tensor_bytes
from modelfactory import make_model
from upscaler.checks import reference_scores
from upscaler.checks.eval_worker import CRASH_HOOK_ENV
from upscaler.checks.smoke import SmokeReport, default_text, run_smoke
from upscaler.errors import RecipeError
from upscaler.format.source import SourceModel
from upscaler.planning.recipe import load_yaml
from upscaler.sweep import candidates
from upscaler.sweep.runner import TMP_PREFIX, SweepOptions, prepare_candidates, run_sweep

N_CTX, MAX_TOKENS = 64, 160
FAST = ("--ctx", str(N_CTX), "--max-tokens", str(MAX_TOKENS), "--threads", "1")

# The main sweep's candidates (6-layer source), by label, as layer ranges written out by hand:
# overlap K is three slices sharing K layers, depth 6 + 2K, the middle one centred.
PLANS = {
    "0:3,0:6": "0:3,0:6",  # 9 layers, layers 0-2 run twice in a row: clearly the worst
    "0:4,2:6": "0:4,2:6",
    "overlap 0": "0:2,2:4,4:6",  # the source itself, cut in three
    "overlap 1": "0:2,1:5,4:6",
}
KEEP_NAMES = {"0:3,0:6": "0-3-0-6.gguf", "0:4,2:6": "0-4-2-6.gguf", "overlap 0": "overlap-0.gguf",
              "overlap 1": "overlap-1.gguf"}


def _yaml(path: Path, model: str, ranges: list[tuple[int, int]]) -> Path:
    lines = ["merge_method: passthrough", "slices:"]
    for a, b in ranges:
        lines += ["- sources:", f"  - model: {model}", f"    layer_range: [{a}, {b}]"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _folder(path: Path) -> dict[str, bytes]:
    """Every file under `path` (names relative) with its bytes: what a refused command must not change."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 layers of the factory's tiny llama: its layers matter (duplicating some moves top-1 to ~25%)."""
    return make_model(tmp_path_factory.mktemp("sweep-src") / "src6.gguf", n_layer=6)


@pytest.fixture(scope="module")
def main_sweep(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI sweep of the four PLANS with --json, -o, --save-best and --keep."""
    work = tmp_path_factory.mktemp("sweep-main")
    proc = cli("sweep", src, "--slices", "0:3,0:6", "--slices", "0:4,2:6", "--overlap", "0..1", *FAST, "--json",
               "-o", work / "results.json", "--save-best", work / "best.yaml", "--keep", work / "kept", check=True)
    return {"proc": proc, "json": json.loads(proc.stdout), "work": work,
            "file": json.loads((work / "results.json").read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def built(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, SmokeReport]]:
    """Each PLAN built by `gguf-upscale upscale` and scored by the smoke test against the source."""
    out = {}
    folder = tmp_path_factory.mktemp("sweep-built")
    for label, slices in PLANS.items():
        path = folder / KEEP_NAMES[label]
        cli("upscale", src, "--slices", slices, "-o", path, check=True)
        out[label] = (path, run_smoke(path, reference=src, n_ctx=N_CTX, max_tokens_scored=MAX_TOKENS, n_threads=1,
                                      n_predict=0))
    return out


@pytest.fixture(scope="module")
def crashed_sweep(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A text-mode sweep at 80 columns whose second candidate's llama.cpp child segfaults (the eval
    worker's test hook, aimed at that candidate's stage only), with a label too long for the table."""
    work = tmp_path_factory.mktemp("sweep-crash")
    long_cfg = _yaml(work / ("a-rather-long-recipe-file-name-for-a-candidate-that-cannot-fit-in-the-"
                             "candidate-column-at-eighty.yaml"), "src6.gguf", [(0, 5), (1, 6)])
    env = {CRASH_HOOK_ENV: "scoring candidate candidate-002.gguf:SIGSEGV", "COLUMNS": "80"}
    proc = cli("sweep", src, "--slices", "0:4,2:6", "--slices", "0:3,0:6", "--config", long_cfg, *FAST,
               "-o", work / "results.json", env=env)
    return {"proc": proc, "work": work, "long": long_cfg.name,
            "file": json.loads((work / "results.json").read_text(encoding="utf-8"))}


# --------------------------------------------------------------------------- 1. known answer


def test_figures_and_ranking_equal_the_smoke_tests(main_sweep: dict[str, Any],
                                                   built: dict[str, tuple[Path, SmokeReport]]) -> None:
    res = main_sweep["json"]
    rows = {c["label"]: c for c in res["candidates"]}
    assert set(rows) == set(PLANS)
    for label, (path, rep) in built.items():
        row = rows[label]
        assert row["error"] is None
        assert rep.reference_perplexity is not None and rep.top1_agreement is not None
        assert _rel(row["perplexity"], rep.perplexity) < 1e-6, label
        assert _rel(row["reference_perplexity"], rep.reference_perplexity) < 1e-6, label
        assert rep.kl_divergence is not None
        assert abs(row["kl_divergence"] - rep.kl_divergence) <= 1e-6 * max(rep.kl_divergence, 1e-9) + 1e-12, label
        assert abs(row["top1_agreement"] - rep.top1_agreement) < 1e-9, label
        assert row["n_layer"] == rep.n_layer == SourceModel(path).block_count == row["block_count"]
        assert row["size"] == path.stat().st_size, label  # the sweep writes what `upscale` writes
        assert _rel(res["source_perplexity"], rep.reference_perplexity) < 1e-6
    assert res["n_tokens_scored"] == MAX_TOKENS and res["n_ctx"] == N_CTX
    # the ranking is the smoke test's perplexity order, and it is not trivial
    by_smoke = sorted(PLANS, key=lambda lb: built[lb][1].perplexity)
    assert [c["label"] for c in res["candidates"]] == by_smoke
    assert by_smoke[-1] == "0:3,0:6"
    assert built["0:3,0:6"][1].perplexity > 1.3 * res["source_perplexity"]
    assert (built["0:3,0:6"][1].top1_agreement or 1.0) < 0.5  # the fixture's layers matter
    # the best is the best upscale: "overlap 0" rebuilds the source and is the control, never "best"
    assert res["best"] == next(lb for lb in by_smoke if lb != "overlap 0")


# --------------------------------------------------------------------------- 2. overlap 0 = the source


def test_overlap_zero_scores_as_the_source(main_sweep: dict[str, Any]) -> None:
    res = main_sweep["json"]
    (row,) = [c for c in res["candidates"] if c["label"] == "overlap 0"]
    assert row["block_count"] == 6
    assert row["slices"] == "0:6"  # three contiguous slices: every source layer once, in order
    assert abs(row["kl_divergence"]) < 1e-9
    assert row["top1_agreement"] == 1.0
    assert _rel(row["perplexity"], res["source_perplexity"]) < 1e-9
    assert row["is_source"] is True and res["best"] != "overlap 0"
    assert sum(c["is_source"] for c in res["candidates"]) == 1
    assert [s["sources"][0]["layer_range"] for s in yaml.safe_load(row["recipe_yaml"])["slices"]] == \
        [[0, 2], [2, 4], [4, 6]]


# --------------------------------------------------------------------------- 3. the source scored once


def test_source_is_scored_once(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on the real child launcher counts the evaluations: one of the source, one per candidate."""
    targets: list[str] = []
    real = reference_scores.run_isolated

    def spy(target: str, request: Any, **kw: Any) -> Any:
        targets.append(target.rsplit(":", 1)[-1])
        return real(target, request, **kw)

    monkeypatch.setattr(reference_scores, "run_isolated", spy)
    opts = SweepOptions(text=default_text(), text_label="the built-in text", n_ctx=N_CTX,
                        max_tokens_scored=MAX_TOKENS, eval_threads=1)
    planned, notes = prepare_candidates(str(src), [candidates.Candidate("a", slices="0:4,2:6"),
                                                   candidates.Candidate("b", slices="0:5,1:6"),
                                                   candidates.Candidate("c", slices="0:6")], opts)
    assert notes == []
    events: list[tuple[str, Any]] = []
    result = run_sweep(str(src), planned, opts, work_dir=tmp_path, results_path=tmp_path / "r.json",
                       on_event=lambda kind, value: events.append((kind, value)))
    assert targets == ["_score_reference"] + ["_score_candidate"] * 3
    stages = [v for k, v in events if k == "stage"]
    assert sum(s.startswith("scoring the source") for s in stages) == 1
    assert [k for k, _ in events].count("source") == 1
    assert [k for k, _ in events].count("candidate") == 3
    saved = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert result.reference is not None
    assert saved["source"] == str(src) and saved["source_perplexity"] == result.reference.perplexity
    assert sorted(c["label"] for c in saved["candidates"]) == ["a", "b", "c"]
    assert saved["pending"] == [] and saved["interrupted"] is False
    # "c" is the source's own plan: scored against the kept source logits it must match exactly
    (c,) = [c for c in saved["candidates"] if c["label"] == "c"]
    assert c["perplexity"] == saved["source_perplexity"] and c["top1_agreement"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # the kept logits went with the temp folder


# --------------------------------------------------------------------------- 4. dedupe


def test_two_spellings_of_one_plan_are_scored_once(src: Path, tmp_path: Path) -> None:
    hub = _yaml(tmp_path / "hub.yaml", "someorg/Some-Model-6L", [(0, 4), (2, 6)])  # a published YAML's Hub name
    a = _yaml(tmp_path / "a" / "x.yaml", "src6.gguf", [(0, 3), (0, 6)])  # two files with one name,
    b = _yaml(tmp_path / "b" / "x.yaml", "src6.gguf", [(0, 5), (1, 6)])  # two different plans
    proc = cli("sweep", src, "--slices", "0:2,1:5,4:6", "--slices", "0:4,2:6", "--config", hub, "--config", a,
               "--config", b, "--overlap", "1", *FAST, "--json", "-o", tmp_path / "r.json", check=True)
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: hub.yaml is the same plan as 0:4,2:6; scored once",
                     "note: overlap 1 is the same plan as 0:2,1:5,4:6; scored once"], proc.stderr
    res = json.loads(proc.stdout)
    rows = {c["label"]: c for c in res["candidates"]}
    assert sorted(rows) == sorted(["0:2,1:5,4:6", "0:4,2:6", str(a), str(b)])
    assert res["notes"] == [n.removeprefix("note: ") for n in notes]
    # each same-named file scored as its own plan
    assert (rows[str(a)]["block_count"], rows[str(a)]["slices"]) == (9, "0:3,0:6")
    assert (rows[str(b)]["block_count"], rows[str(b)]["slices"]) == (10, "0:5,1:6")
    assert rows[str(a)]["perplexity"] != rows[str(b)]["perplexity"]


# --------------------------------------------------------------------------- 5. bad input


@pytest.mark.parametrize("case", ["no candidates", "bad range", "overlap too large", "results exist",
                                  "plot exists", "bad mixture", "bad slices"])
def test_bad_input_is_one_line_and_writes_nothing(src: Path, tmp_path: Path, case: str) -> None:
    work = tmp_path / "w"
    work.mkdir()
    results, keep = work / "results.json", work / "kept"
    args: list[object] = ["--slices", "0:4,2:6"]
    extra: list[object] = []
    if case == "no candidates":
        args, fragment = [], "no candidates"
    elif case == "bad range":
        args, fragment = ["--overlap", "5..x"], "--overlap '5..x'"
    elif case == "overlap too large":
        args, fragment = ["--overlap", "2..4"], "--overlap 4: three slices of a 6-layer model can share at most 3"
    elif case == "results exist":
        results.write_text('{"mine": true}\n', encoding="utf-8")
        fragment = "exists; pass --force"
    elif case == "plot exists":
        (work / "chart.png").write_bytes(b"not mine to replace")
        extra, fragment = ["--plot", work / "chart.png"], "exists; pass --force"
    elif case == "bad mixture":
        extra, fragment = ["--mixture", "average"], "--mixture"
    else:  # a bad candidate among good ones is refused before the source is scored
        args, fragment = ["--slices", "0:4,2:6", "--slices", "0:4,2:9"], "candidate 0:4,2:9"
    before = _folder(work)
    proc = cli("sweep", src, *args, *FAST, "-o", results, "--keep", keep, *extra)
    assert_one_line_error(proc, fragment)
    assert proc.stdout == ""
    assert _folder(work) == before  # nothing written, nothing replaced, no --keep folder made
    assert not [p for p in ROOT.iterdir() if p.name.startswith(TMP_PREFIX)]


# --------------------------------------------------------------------------- 6. a crashing candidate


def test_a_crashing_candidate_is_a_failed_row(crashed_sweep: dict[str, Any]) -> None:
    proc, res = crashed_sweep["proc"], crashed_sweep["file"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert res["source_perplexity"] is not None  # the hook aimed at a candidate left the source alone
    labels = [c["label"] for c in res["candidates"]]
    assert sorted(labels) == sorted(["0:4,2:6", "0:3,0:6", crashed_sweep["long"]])
    assert labels[-1] == "0:3,0:6"  # failed rows rank last
    failed = res["candidates"][-1]
    assert "perplexity" not in failed and failed["size"] and failed["block_count"] == 9
    # named by its label, not by its temporary file
    assert "llama.cpp crashed while scoring candidate '0:3,0:6' (SIGSEGV)" in failed["error"]
    assert all(c["error"] is None and c["perplexity"] > 0 for c in res["candidates"][:2])  # the sweep went on
    assert res["best"] in labels[:2]
    rows = [line for line in proc.stdout.splitlines() if "failed: llama.cpp crashed" in line]
    assert len(rows) == 1 and rows[0].startswith("-  0:3,0:6")
    assert any(line.startswith("sweep:   0:3,0:6: llama.cpp crashed") for line in proc.stderr.splitlines())
    assert sorted(p.name for p in crashed_sweep["work"].iterdir()) == sorted([crashed_sweep["long"], "results.json"])


# --------------------------------------------------------------------------- 7. Ctrl-C


def test_ctrl_c_keeps_the_results_so_far(src: Path, tmp_path: Path) -> None:
    """A real SIGINT to the whole process group (as a terminal's Ctrl-C) once a candidate is done."""
    work = tmp_path / "w"
    work.mkdir()
    results = work / "results.json"
    cmd = [sys.executable, "-c", "from upscaler.cli import main; main()", "sweep", str(src), "--overlap", "1..3",
           "--solar-drop", "1..5", "--ctx", str(N_CTX), "--max-tokens", "480", "--threads", "1", "--json",
           "-o", str(results)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "COLUMNS": "80"})
    try:
        deadline = time.monotonic() + 60
        seen = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                seen = json.loads(results.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                seen = None
            if seen and seen["candidates"]:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        assert seen and seen["candidates"] and seen["pending"], "no candidate finished in 60 s"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: interrupted; the sweep was stopped after ")
    assert lines[0].endswith(f"of 8 candidates; the results so far are in {results}")
    assert sorted(p.name for p in work.iterdir()) == ["results.json"]  # no temp folder, no candidate GGUF
    res = json.loads(results.read_text(encoding="utf-8"))
    assert res["interrupted"] is True
    done = [c["label"] for c in res["candidates"]]
    assert done and res["pending"]
    assert f"stopped after {len(done)} of 8" in lines[0]
    assert all(c["error"] is None and c["perplexity"] > 0 for c in res["candidates"])
    every = [f"overlap {k}" for k in (1, 2, 3)] + [f"solar drop {m}" for m in range(1, 6)]
    assert res["pending"] == every[len(every) - len(res["pending"]):]  # the rest, in order
    assert sorted(done + res["pending"]) == sorted(every)
    assert json.loads(out) == res  # --json still prints what was kept


# --------------------------------------------------------------------------- 8. JSON, --save-best, --keep


def test_json_report(main_sweep: dict[str, Any]) -> None:
    res = main_sweep["json"]
    assert res == main_sweep["file"]  # -o holds what --json printed
    assert main_sweep["proc"].stderr.strip() == ""  # --json: nothing on stderr for a clean run
    assert isinstance(res["source_perplexity"], float) and res["source_perplexity"] > 1
    assert res["source_n_layer"] == 6 and res["interrupted"] is False and res["pending"] == []
    for c in res["candidates"]:
        for key in ("perplexity", "kl_divergence", "top1_agreement", "block_count", "size"):
            assert isinstance(c[key], (int, float)) and not isinstance(c[key], bool), key
            assert math.isfinite(c[key])
    first = next(c for c in res["candidates"] if not c["is_source"])
    assert res["best"] == first["label"]
    assert res["best_recipe_yaml"] == first["recipe_yaml"]
    # paired comparison with the best: exp(mean NLL difference) is exactly the perplexities' ratio,
    # and pairing over the same tokens gives a smaller uncertainty than the two ± combined
    for c in res["candidates"]:
        assert _rel(c["perplexity_ratio_to_best"], c["perplexity"] / first["perplexity"]) < 1e-9
        if c is not first:
            both = math.hypot(c["perplexity_uncertainty"] / c["perplexity"],
                              first["perplexity_uncertainty"] / first["perplexity"]) * c["perplexity_ratio_to_best"]
            assert 0 < c["perplexity_ratio_to_best_uncertainty"] < both


def test_save_best_is_a_recipe_that_rebuilds_the_best(src: Path, main_sweep: dict[str, Any], tmp_path: Path) -> None:
    res, work = main_sweep["json"], main_sweep["work"]
    best = work / "best.yaml"
    assert best.read_text(encoding="utf-8") == res["best_recipe_yaml"]
    ranges = [tuple(s.sources[0].layer_range) for s in load_yaml(best).slices]
    expected = [tuple(int(x) for x in r.split(":")) for r in PLANS[res["best"]].split(",")]
    assert ranges == expected
    cli("upscale", src, "--config", best, "-o", tmp_path / "again.gguf", check=True)
    assert tensor_bytes(tmp_path / "again.gguf") == tensor_bytes(work / "kept" / KEEP_NAMES[res["best"]])


def test_keep_holds_each_candidate_named_after_its_label(main_sweep: dict[str, Any],
                                                         built: dict[str, tuple[Path, SmokeReport]]) -> None:
    kept = main_sweep["work"] / "kept"
    assert sorted(p.name for p in kept.iterdir()) == sorted(KEEP_NAMES.values())  # no temp folder left
    for c in main_sweep["json"]["candidates"]:
        path = kept / KEEP_NAMES[c["label"]]
        assert c["kept"] == str(path)
        assert path.stat().st_size == c["size"]
        assert tensor_bytes(path) == tensor_bytes(built[c["label"]][0]), c["label"]


# --------------------------------------------------------------------------- 9. 80 columns


def test_output_fits_80_columns(crashed_sweep: dict[str, Any]) -> None:
    out = crashed_sweep["proc"].stdout.splitlines()
    assert any(line.lstrip().startswith("#  candidate") for line in out)
    assert any("…" in line for line in out)  # the long label was cut, not wrapped
    assert any(line.startswith("perplexity by candidate") for line in out)
    assert any(line.startswith("best: ") for line in out)
    too_long = [line for line in out if len(line) > 80]
    assert not too_long, too_long


# --------------------------------------------------------------------------- 10. candidates.py


def _ranges(spec: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (r.split(":") for r in spec.split(","))]


def test_overlap_slices_known_answers() -> None:
    assert candidates.overlap_slices(80, 20) == "0:40,20:60,40:80"  # karakuri-lm-chat-upscaled-103b
    assert candidates.overlap_slices(6, 1) == "0:2,1:5,4:6"
    assert candidates.solar_slices(32, 8) == "0:24,8:32"  # SOLAR 10.7B


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8, 24, 32, 80])
def test_overlap_slices_shape(n: int) -> None:
    flat = [layer for a, b in _ranges(candidates.overlap_slices(n, 0)) for layer in range(a, b)]
    assert flat == list(range(n))  # K = 0: every layer once, in order
    for k in range(0, n - 2):
        spec = candidates.overlap_slices(n, k)
        (a1, b1), (a2, b2), (a3, b3) = _ranges(spec)
        assert (a1, b3) == (0, n) and a1 < b1 and a2 < b2 and a3 < b3, spec
        assert (b1 - a1) + (b2 - a2) + (b3 - a3) == n + 2 * k, spec  # depth n + 2K
        assert (b1 - a2, b2 - a3) == (k, k), spec  # consecutive slices share K layers
        assert abs((b1 - a1) - (b3 - a3)) <= 1 and 0 <= (b2 - a2) - (b1 - a1) <= 2, spec  # middle centred
    with pytest.raises(RecipeError, match=f"at most {n - 3} layers"):
        candidates.overlap_slices(n, n - 2)


def test_too_shallow_and_bad_solar() -> None:
    with pytest.raises(RecipeError, match="too shallow"):
        candidates.overlap_slices(2, 0)
    for m in (0, 32, 40):
        with pytest.raises(RecipeError, match="--solar-drop"):
            candidates.solar_slices(32, m)


def test_parse_range() -> None:
    assert candidates.parse_range("4..12:2", "--overlap") == [4, 6, 8, 10, 12]
    assert candidates.parse_range("4..11:2", "--overlap") == [4, 6, 8, 10]
    assert candidates.parse_range("3", "--overlap") == [3]
    assert candidates.parse_range(" 0..2 ", "--overlap") == [0, 1, 2]
    for bad in ("", "x", "5..x", "4..", "..4", "4..2", "-1..3", "1..3:0", "1..3:x", "1.5"):
        with pytest.raises(RecipeError, match="--solar-drop"):
            candidates.parse_range(bad, "--solar-drop")


def test_families_and_given_labels() -> None:
    assert [(c.label, c.slices) for c in candidates.overlap_family(6, "0..1")] == \
        [("overlap 0", "0:2,2:4,4:6"), ("overlap 1", "0:2,1:5,4:6")]
    assert [(c.label, c.slices) for c in candidates.solar_family(32, "8")] == [("solar drop 8", "0:24,8:32")]
    got = candidates.given(["0:4,2:6"], ["cfg/a/x.yaml", "cfg/b/x.yaml", "cfg/y.yaml"], ["solar:drop=2"])
    assert [c.label for c in got] == ["0:4,2:6", "cfg/a/x.yaml", "cfg/b/x.yaml", "y.yaml", "solar:drop=2"]
    kept, notes = candidates.dedupe(got[:3], ["p", "q", "p"])
    assert [c.label for c in kept] == ["0:4,2:6", "cfg/a/x.yaml"]
    assert notes == ["cfg/b/x.yaml is the same plan as 0:4,2:6; scored once"]


# --------------------------------------------------------------------------- quantized source, --mixture source


def test_quantized_source_with_mixture_source_keeps_the_source_bytes(tmp_path: Path) -> None:
    """--type Q8_0 --mixture source on a Q8_0 source: each kept candidate holds exactly what
    `run --type Q8_0 --mixture source` writes for the same plan (no tensor re-quantized)."""
    q8 = make_model(tmp_path / "src-q8.gguf", n_layer=6, dtype="Q8_0")
    work = tmp_path / "work"
    work.mkdir()
    proc = cli("sweep", q8, "--slices", "0:4,2:6", "--type", "Q8_0", "--mixture", "source", *FAST,
               "-o", work / "r.json", "--keep", work / "kept")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((work / "r.json").read_text(encoding="utf-8"))
    (row,) = res["candidates"]
    assert row["error"] is None and row["block_count"] == 8
    ref = tmp_path / "run.gguf"
    cli("run", q8, "--slices", "0:4,2:6", "--type", "Q8_0", "--mixture", "source", "--no-smoke", "--no-model-card",
        "-o", ref, check=True)
    kept = Path(row["kept"])
    assert tensor_bytes(kept) == tensor_bytes(ref)
    source = tensor_bytes(q8)
    assert tensor_bytes(kept)["blk.7.attn_q.weight"] == source["blk.5.attn_q.weight"]  # copied, not re-quantized
