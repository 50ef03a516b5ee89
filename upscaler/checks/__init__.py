"""Checks of a written model: the smoke test (smoke, on llama_session's llama.cpp plumbing,
kl_stats' llama-perplexity statistics and scoring's per-token NLL/KL over text windows),
reference_scores (a source scored once, candidates against it: sweep), layer_influence (how
much each layer changes the hidden state: layers) and `verify` (verify, with its report,
streaming digests, output file, lineage, recipe replay, sources, metadata and tensor checks).
"""

__all__ = [
    "eval_worker",
    "kl_stats",
    "layer_influence",
    "llama_params",
    "llama_session",
    "reference_scores",
    "scoring",
    "smoke",
    "smoke_progress",
    "verify",
    "verify_lineage",
    "verify_metadata",
    "verify_output",
    "verify_replay",
    "verify_report",
    "verify_sources",
    "verify_stream",
    "verify_tensors",
]
