"""Publishing: the model card (model_card), human-readable figures (report) and charts (charts).
"""

__all__ = [
    "charts",
    "model_card",
    "report",
]
