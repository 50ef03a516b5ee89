"""gguf-upscale: GGUF-native passthrough (frankenmerge) upscaling for llama.cpp users."""

__version__ = "0.1.0"
