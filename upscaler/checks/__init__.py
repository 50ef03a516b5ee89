"""Checks of a written model: the smoke test (smoke) and `verify` (verify, with its report,
streaming digests, output file, lineage, recipe replay, sources, metadata and tensor checks).
"""

__all__ = [
    "eval_worker",
    "llama_params",
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
