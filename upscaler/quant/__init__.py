"""Quantization with llama.cpp's own code: ggml kernels (ggml), llama.cpp's log (llama_log), its
quantizer and per-tensor type decisions (llama_quant), type names (quant_types), the streaming
quantize-once writer step (quantizer) and importance matrices (imatrix).
"""

__all__ = [
    "ggml",
    "imatrix",
    "llama_log",
    "llama_quant",
    "quant_types",
    "quantizer",
]
