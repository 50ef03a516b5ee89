"""Shared fixtures: tiny GGUF models written once per session by :mod:`modelfactory`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# Keep `from modelfactory import …` working even if tests/ later becomes a package.
_TESTS_DIR = str(Path(__file__).parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from modelfactory import load_llama as _load_llama  # noqa: E402
from modelfactory import make_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(model_dir: Path) -> Path:
    """4 layers, F16, untied, GQA (4 heads / 2 KV heads)."""
    return make_model(model_dir / "tiny-llama-F16.gguf")


@pytest.fixture(scope="session")
def tiny_llama_q8(model_dir: Path) -> Path:
    """Same weights as ``tiny_llama`` (same seed), quantized to Q8_0."""
    return make_model(model_dir / "tiny-llama-Q8_0.gguf", dtype="Q8_0")


@pytest.fixture(scope="session")
def tiny_llama_tied(model_dir: Path) -> Path:
    """No output.weight: llama.cpp reuses token_embd as the output projection."""
    return make_model(model_dir / "tiny-llama-tied-F16.gguf", tied=True)


@pytest.fixture(scope="session")
def llama80(model_dir: Path) -> Path:
    """80-layer GQA llama (llama.cpp classifies it as 70B), so real upscale YAMLs run verbatim."""
    return make_model(
        model_dir / "llama80-F16.gguf", n_layer=80, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, name="Llama80"
    )


@pytest.fixture(scope="session")
def tiny_llama_split(model_dir: Path) -> Path:
    """``tiny_llama`` split into 3 shards (~2 MB each); returns ``…-00001-of-00003.gguf``."""
    return make_model(model_dir / "split" / "tiny-llama-F16.gguf", split_max_size=2_000_000)


@pytest.fixture
def load_llama() -> Iterator[Callable[..., Any]]:
    """``load_llama(path, **kw)`` that closes every model it opened when the test ends."""
    opened: list[Any] = []

    def _open(path: Path | str, **kw: Any) -> Any:
        llm = _load_llama(path, **kw)
        opened.append(llm)
        return llm

    yield _open
    for llm in opened:
        llm.close()
