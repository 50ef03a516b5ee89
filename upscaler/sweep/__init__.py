"""Choosing a recipe by measurement: candidate plans (candidates), built and scored against the
source scored once (runner), ranked and shown (table).
"""

__all__ = [
    "candidates",
    "runner",
    "table",
]
