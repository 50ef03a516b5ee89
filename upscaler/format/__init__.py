"""GGUF format and I/O: the strict header reader and the one GGUF serializer (gguf_header),
source models and streamed tensor reads (source), the streaming, atomic, split-aware
writer (writer), atomic small-file writes (atomic), each output tensor's bytes (tensor_data).
"""

__all__ = [
    "atomic",
    "gguf_header",
    "source",
    "tensor_data",
    "writer",
]
