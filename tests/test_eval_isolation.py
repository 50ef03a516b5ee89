"""llama.cpp evaluation on plain CPU buffers, in a child process: real crashes of real children,
the recovery `run` offers when its smoke step dies, and the model card that belongs to its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, assert_one_line_error, cli
from modelfactory import load_llama, make_model
from upscaler.checks import llama_params, smoke
from upscaler.checks.eval_worker import CRASH_HOOK_ENV, EvalCrashed
from upscaler.checks.smoke import run_smoke
from upscaler.publish.model_card import card_is_stale, card_owner

FAST = dict(n_ctx=64, max_tokens_scored=160, n_predict=8, n_threads=1)
CLI_FAST = ("--ctx", "64", "--max-tokens", "96", "--n-predict", "4", "--threads", "1")


# --------------------------------------------------------------------------- plain CPU buffers


def test_model_params_turn_weight_repacking_off() -> None:
    import llama_cpp

    assert llama_cpp.llama_model_default_params().use_extra_bufts  # llama.cpp's default repacks
    params = llama_params.model_params(vocab_only=True)
    assert params.use_extra_bufts is False and params.vocab_only is True


def test_every_loader_goes_through_llama_params(tiny_llama: Path) -> None:
    """The test fixtures' loader and the smoke test both load with use_extra_bufts off."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params
    llm = load_llama(tiny_llama)
    try:
        assert llm.model_params.use_extra_bufts is False
    finally:
        llm.close()
    assert llama_module.llama_cpp.llama_model_default_params is original  # swapped back after the constructor
    assert llama_cpp.Llama  # the plain constructor is untouched
    assert run_smoke(tiny_llama, **FAST).extra_buffer_types is False  # reported by the child that loaded it


def test_q4_0_weights_stay_on_plain_buffers(tiny_llama: Path, tmp_path: Path) -> None:
    """Oracle: llama.cpp's own load log. With its defaults a Q4_0 model may be repacked (CPU_REPACK on
    AVX2/NEON, AMX on Xeons); through open_llama no extra buffer type is ever allocated."""
    import llama_cpp

    from upscaler.quant import llama_log
    from upscaler.quant.llama_quant import quantize_file

    q4 = tmp_path / "q4_0.gguf"
    quantize_file(tiny_llama, q4, "Q4_0", n_threads=1)  # llama.cpp's own quantizer
    with llama_log.capture() as ours:
        llm = llama_params.open_llama(q4, n_ctx=64, verbose=False, n_threads=2)
        llm.close()
    buffers = [ln for ln in ours if "model buffer size" in ln]
    assert buffers and all("REPACK" not in ln and "AMX" not in ln for ln in buffers), buffers
    with llama_log.capture() as default:
        llm = llama_cpp.Llama(model_path=str(q4), n_ctx=64, verbose=False, n_threads=2)
        llm.close()
    repacked = [ln for ln in default if "model buffer size" in ln and ("REPACK" in ln or "AMX" in ln)]
    if not repacked:
        pytest.skip("this CPU has no repack path for Q4_0; the plain-buffer half of the test still ran")


def test_physical_cores_counts_cores_not_threads() -> None:
    n = llama_params.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    pairs = set()
    for cpu in os.sched_getaffinity(0):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        pairs.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
    assert n == len(pairs)


# --------------------------------------------------------------------------- real crashes of a real child


@pytest.mark.parametrize("stage,sig,what", [
    ("loading model", "SIGSEGV", "llama.cpp crashed while loading model"),
    ("generating with model", "SIGABRT", "llama.cpp aborted while generating with model"),
    ("scoring reference", "SIGKILL", "killed (out of memory?) while scoring reference"),
])
def test_a_dying_child_is_one_error(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, stage: str, sig: str,
                                    what: str) -> None:
    monkeypatch.setenv(CRASH_HOOK_ENV, f"{stage}:{sig}")
    t0 = time.perf_counter()
    with pytest.raises(EvalCrashed) as e:
        run_smoke(tiny_llama, reference=tiny_llama, **FAST)
    assert e.value.signal_name == sig and e.value.stage.startswith(stage)
    assert what in str(e.value) and tiny_llama.name in str(e.value) and f"({sig}" in str(e.value)
    assert "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 60


def test_cli_crash_is_one_line_exit_1(tiny_llama: Path) -> None:
    proc = cli("smoke", tiny_llama, "--reference", tiny_llama, *CLI_FAST,
               env={CRASH_HOOK_ENV: "scoring reference:SIGSEGV", "PYTHONFAULTHANDLER": "1"})
    assert proc.returncode == 1
    assert_one_line_error(proc, "llama.cpp crashed while scoring reference", tiny_llama.name, "SIGSEGV")
    assert "Fatal Python error" not in proc.stderr and proc.stdout == ""


def test_a_real_ggml_assert_is_quoted() -> None:
    """Not our hook: ggml itself aborts (a GGML_ASSERT in the child), and its line is quoted."""
    from upscaler.checks.eval_worker import run_isolated

    with pytest.raises(EvalCrashed, match=r"^llama.cpp aborted while asserting \(SIGABRT: .*GGML_ASSERT\(start % "):
        run_isolated("test_eval_isolation:_ggml_assert_in_child", None)


def _ggml_assert_in_child(_request: object, reporter) -> None:
    """Runs in the child: ggml_quantize_chunk with a start inside a Q4_0 block trips
    GGML_ASSERT(start % type_traits[type].blck_size == 0) before touching any buffer."""
    import ctypes

    import llama_cpp

    reporter.stage("asserting")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    fn(2, None, None, 1, 1, 32, None)


def test_child_refusals_keep_their_class_and_stderr_stays_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = make_model(tmp_path / "no-embd.gguf", extra_kv={"llama.embedding_length": None})
    with pytest.raises(smoke.SmokeError, match=r"failed to load: .*llama\.embedding_length"):
        run_smoke(model, **FAST)
    assert capfd.readouterr() == ("", "")


def test_ctrl_c_ends_the_child(tiny_llama: Path, tmp_path: Path) -> None:
    """SIGINT to the CLI while the child evaluates: exit 130, one line, no child left behind."""
    proc = subprocess.Popen([sys.executable, "-c", "from upscaler.cli import main; main()", "smoke", str(tiny_llama),
                             "--reference", str(tiny_llama), *CLI_FAST],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, CRASH_HOOK_ENV: "scoring reference:SIGSTOP"})
    try:
        time.sleep(0.5)
        deadline = time.time() + 60
        children: list[int] = []
        while time.time() < deadline and not children:
            children = _children(proc.pid)
            time.sleep(0.2)
        assert children
        while time.time() < deadline and _state(children[0]) != "T":  # stopped at the stage
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert [l for l in err.splitlines() if l.strip()] == ["error: interrupted"]
    time.sleep(0.5)
    assert all(not Path(f"/proc/{c}").exists() or _state(c) == "Z" for c in children)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# --------------------------------------------------------------------------- --json and thresholds


def test_json_figures_printed_when_the_threshold_fails(tiny_llama: Path, tmp_path: Path) -> None:
    noisy = make_model(tmp_path / "noisy.gguf", seed=123)
    proc = cli("smoke", noisy, "--reference", tiny_llama, "--json", *CLI_FAST, "--min-agreement", "0.99")
    assert proc.returncode == 1
    assert_one_line_error(proc, "below the minimum 0.990")
    rep = json.loads(proc.stdout)
    assert rep["top1_agreement"] < 0.99 and rep["kl_divergence"] > 0


# --------------------------------------------------------------------------- run: the output stays, one command finishes it


def test_run_whose_smoke_crashes_keeps_output_and_names_the_finishing_command(tiny_llama: Path,
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "up.gguf"
    proc = cli("run", tiny_llama, "--slices", "0:3,1:4", "-o", out, "--type", "Q8_0", "--threads", "1",
               env={CRASH_HOOK_ENV: "scoring model:SIGSEGV"})
    assert_one_line_error(proc, f"{out} is complete and kept", "SIGSEGV", "To finish: gguf-upscale smoke")
    assert out.is_file() and not out.with_suffix(".md").exists()
    line = proc.stderr.strip().splitlines()[-1]
    finish = line.split("To finish: ", 1)[1]
    assert finish == f"gguf-upscale smoke {out} --reference {tiny_llama} --write-card --threads 1"
    done = cli(*finish.split()[1:], check=True)  # the command works as printed
    assert "(model card)" in done.stdout
    card = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "## Smoke test" in card and "top-1 agreement" in card and card_owner(out.with_suffix(".md")) == out.name
    again = cli(*finish.split()[1:])  # a finished job is not redone silently
    assert_one_line_error(again, "model card already exists")


def test_run_interrupted_in_smoke_keeps_output(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "int.gguf"
    proc = subprocess.Popen([sys.executable, "-c", "from upscaler.cli import main; main()", "run", str(tiny_llama),
                             "--slices", "0:4", "-o", str(out), "--type", "Q8_0", "--threads", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, CRASH_HOOK_ENV: "scoring reference:SIGSTOP"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(_state(c) == "T" for c in _children(proc.pid)):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: interrupted; {out} is complete and kept"), err
    assert "To finish: gguf-upscale smoke" in lines[0] and out.is_file()


def test_write_card_needs_an_upscaled_file_and_its_sources(tiny_llama: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli("smoke", tiny_llama, "--write-card", *CLI_FAST), "not an upscaled GGUF")
    out = tmp_path / "u.gguf"
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", out, "--no-model-card", check=True)
    assert_one_line_error(cli("smoke", out, "--write-card", *CLI_FAST), "give --reference SOURCE")
    assert not out.with_suffix(".md").exists()


# --------------------------------------------------------------------------- a card belongs to its output


def test_card_of_a_deleted_output_does_not_block_its_next_write(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    card = out.with_suffix(".md")
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", out, check=True)
    assert card_owner(card) == out.name and not card_is_stale(card, out)
    out.unlink()  # by hand
    assert card_is_stale(card, out)
    cli("upscale", tiny_llama, "--slices", "0:3,1:4", "-o", out, check=True)  # no --force needed
    assert "| 4–4 |" not in card.read_text(encoding="utf-8") or card_owner(card) == out.name
    assert "6 layers" in card.read_text(encoding="utf-8") or "0–2" in card.read_text(encoding="utf-8")
    # A card of another output, or a file that is not ours, still needs --force.
    other = tmp_path / "other.gguf"
    (tmp_path / "other.md").write_text("my own notes\n", encoding="utf-8")
    assert_one_line_error(cli("upscale", tiny_llama, "--slices", "0:4", "-o", other), "model card already exists")
    assert not other.exists()
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", other, "--model-card-path", card, "--force", check=True)
    assert card_owner(card) == other.name
    out.unlink()
    assert not card_is_stale(card, out)  # it now belongs to other.gguf


def test_card_older_than_its_remade_output_is_stale(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.gguf"
    card = out.with_suffix(".md")
    cli("upscale", tiny_llama, "--slices", "0:4", "-o", out, check=True)
    assert not card_is_stale(card, out)
    past = time.time() - 100
    os.utime(card, (past, past))
    assert card_is_stale(card, out)


def test_a_script_without_main_guard_can_run_smoke(tiny_llama: Path, tmp_path: Path) -> None:
    """The child is a fresh interpreter, not multiprocessing's spawn (which re-runs the caller's script)."""
    script = tmp_path / "check.py"
    script.write_text("from upscaler.checks.smoke import run_smoke\n"
                      f"print(run_smoke({str(tiny_llama)!r}, n_ctx=64, max_tokens_scored=32, n_predict=2, "
                      "n_threads=1).loaded)\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "True\n", "")


def test_table_fits_80_columns_and_progress_only_on_a_terminal(tiny_llama: Path, tiny_llama_q8: Path) -> None:
    import pty

    proc = cli("smoke", tiny_llama_q8, "--reference", tiny_llama, *CLI_FAST, check=True)
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    for label in ("[PPL(Q)]", "[PPL(base)]", "[PPL(Q)/PPL(base)]", "[KLD]", "median", "99th percentile",
                  "maximum", "[same top p]"):
        assert any(label in line for line in lines), label
    assert proc.stderr == ""  # a pipe: no progress
    master, slave = pty.openpty()
    try:
        tty = subprocess.run([sys.executable, "-c", "from upscaler.cli import main; main()", "smoke", str(tiny_llama_q8),
                              "--reference", str(tiny_llama), *CLI_FAST], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=slave, timeout=300, env={**os.environ, "COLUMNS": "80"})
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert tty.returncode == 0
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", "replace"))
    assert "scoring model" in text and "scoring reference" in text and "/96 tokens" in text and "ETA" in text
