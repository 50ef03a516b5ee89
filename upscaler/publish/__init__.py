"""Publishing: the model card (model_card) and human-readable figures (report).
"""

__all__ = [
    "model_card",
    "report",
]
