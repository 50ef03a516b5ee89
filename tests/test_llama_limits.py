"""Metadata llama.cpp asserts on (GGML_ASSERT aborts the process): refused by us first, one line.

Without these checks `quantize`, `plan` (its dry run) and `smoke` die in llama.cpp with a C
assertion and a core dump on such files; each case here would abort the CLI process."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFValueType

from helpers import assert_one_line_error, cli
from modelfactory import make_model

U32 = GGUFValueType.UINT32

# case -> (extra metadata, fragment of the error, commands that must refuse it)
CASES = {
    "block-count-0": ({"llama.block_count": (0, U32)}, "llama.block_count is 0", ("quantize", "smoke", "plan")),
    "block-count-600": ({"llama.block_count": (600, U32)}, "1 to 512 layers", ("quantize", "smoke")),
    "experts-over-limit": ({"llama.expert_count": (4096, U32), "llama.expert_used_count": (2, U32)},
                           "over llama.cpp's limit of 1024", ("quantize", "smoke", "plan")),
    "experts-used-without-experts": ({"llama.expert_used_count": (2, U32)}, "more than expert_count 0",
                                     ("quantize", "smoke", "plan")),
    "nextn-over-layers": ({"llama.nextn_predict_layers": (9, U32)}, "nextn_predict_layers is 9",
                          ("quantize", "smoke", "plan")),
    "rope-scaling-unknown": ({"llama.rope.scaling.type": "bogus"}, "rope.scaling.type is 'bogus'",
                             ("quantize", "smoke", "plan")),
    "value-length-differs": ({"llama.attention.key_length": (64, U32), "llama.attention.value_length": (32, U32)},
                             "value length 32 differs from key length 64", ("smoke",)),
}


def _args(command: str, model: Path, out: Path) -> list[object]:
    return {"quantize": ["quantize", model, "-o", out, "--threads", "1"],
            "smoke": ["smoke", model, "--n-predict", "1", "--ctx", "64", "--threads", "1"],
            "plan": ["plan", model, "--slices", "0:4"]}[command]


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_assertions_are_refused_first(case: str, tmp_path: Path) -> None:
    extra, fragment, commands = CASES[case]
    model = make_model(tmp_path / f"{case}.gguf", extra_kv=extra)
    for command in commands:
        out = tmp_path / "out.gguf"
        proc = cli(*_args(command, model, out))
        assert proc.returncode == 1, f"{command}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert_one_line_error(proc, model.name, fragment)
        assert not out.exists()


def test_more_layers_than_llama_cpp_loads_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "deep.gguf"
    proc = cli("upscale", tiny_llama, "--slices", ",".join(["0:4"] * 129), "-o", out)
    assert_one_line_error(proc, "516 layers", "at most 512")
    assert not out.exists()
