"""Recipe and plan: recipe forms (recipe, presets), model references (resolve), per-architecture
rules (archs), the plan (plan), the output's metadata (metadata) and tensor list (output),
and what llama.cpp refuses to load (llama_limits). Pure data: no tensor byte is read here.
"""

__all__ = [
    "archs",
    "llama_limits",
    "metadata",
    "output",
    "plan",
    "presets",
    "recipe",
    "resolve",
]
