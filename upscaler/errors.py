"""Domain exceptions. The CLI catches UpscaleError once and prints `error: <message>`."""

from __future__ import annotations


class UpscaleError(Exception):
    """Anything the user did or the input holds; printed as one line, exit code 1."""


class RecipeError(UpscaleError):
    """The recipe (YAML, --slices, --preset) is malformed or does not fit the source models."""


class SourceError(UpscaleError):
    """A source GGUF (or shard set) cannot be read or is not usable."""


class OutputError(UpscaleError):
    """The output cannot be written (exists, no space, is an input, ...)."""


class QuantizeError(UpscaleError):
    """llama.cpp refused or failed to quantize."""


class SmokeError(UpscaleError):
    """The smoke test failed: the model did not load, produced non-finite logits, or fell below a threshold."""


class ImatrixError(UpscaleError):
    """An importance matrix cannot be read, written or mapped."""
