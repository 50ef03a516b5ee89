"""Metadata values llama.cpp does not refuse but *asserts* on: GGML_ASSERT aborts the whole process.

A GGUF with `block_count` 0 or 4096, an expert count over 1024 or an unknown RoPE scaling type
makes llama.cpp's `load_hparams` (src/llama-model.cpp of the pinned llama.cpp) abort, which no
Python code can catch: `quantize`, `run`, `plan` (its dry run) and `smoke` would die with a C
assertion and a core dump. These checks mirror those assertions, so such files get one line
naming the file and the key instead, before llama.cpp sees them. Values llama.cpp refuses with
an exception (array lengths, n_rot for llama) need no mirror here: they are caught and reported.
"""

from __future__ import annotations

from typing import Any, Mapping

LLAMA_MAX_LAYERS = 512  # src/llama-hparams.h
LLAMA_MAX_EXPERTS = 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES

# Graph builders assert head geometry (src/models/*.cpp): value head == key head, and for
# these also the RoPE dimension == key head.
_HEAD_V_IS_K = {"llama", "qwen2", "qwen3", "granite", "mistral3", "smollm3", "phi3", "command-r", "cohere2",
                "olmo", "olmo2", "starcoder2", "stablelm", "falcon", "internlm2", "exaone", "glm4", "qwen2moe",
                "olmoe", "deci"}
_ROT_IS_K = {"llama", "qwen2", "qwen3", "granite", "mistral3", "smollm3",
             "olmo", "olmo2", "starcoder2", "falcon", "internlm2", "exaone", "qwen2moe", "olmoe", "deci"}


def _ints(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def load_problem(kvs: Mapping[str, Any], arch: str) -> str | None:
    """Why llama.cpp would abort loading a model with these metadata values, or None.

    `kvs`: key -> value (arrays as lists). What `load_hparams` asserts, in its order."""

    def get(suffix: str, default: Any = 0) -> Any:
        return kvs.get(f"{arch}.{suffix}", default)

    n_layer = get("block_count", None)
    if not _ints(n_layer) or isinstance(n_layer, list) or not 0 < int(n_layer) <= LLAMA_MAX_LAYERS:
        return (f"{arch}.block_count is {n_layer!r}; llama.cpp loads models of 1 to {LLAMA_MAX_LAYERS} layers "
                "(LLAMA_MAX_LAYERS) and aborts otherwise")
    n_layer = int(n_layer)
    for key in ("nextn_predict_layers", "posnet.block_count", "convnext.block_count"):
        n = max(_ints(get(key)), default=0)
        if n > n_layer:
            return f"{arch}.{key} is {n}, more than {arch}.block_count {n_layer}; llama.cpp aborts on that"

    n_expert = max(_ints(get("expert_count")), default=0)
    used = get("expert_used_count")
    used_max = max(_ints(used[:n_layer] if isinstance(used, list) else used), default=0)
    groups = max(_ints(get("expert_group_count")), default=0)
    group_used = max(_ints(get("expert_group_used_count")), default=0)
    expert_rule = None
    if n_expert > LLAMA_MAX_EXPERTS:
        expert_rule = f"expert_count {n_expert} is over llama.cpp's limit of {LLAMA_MAX_EXPERTS}"
    elif used_max > n_expert:
        expert_rule = f"expert_used_count {used_max} is more than expert_count {n_expert}"
    elif n_expert > 0:
        if used_max == 0:
            expert_rule = f"expert_count is {n_expert} but expert_used_count is 0"
        elif groups >= n_expert:
            expert_rule = f"expert_group_count {groups} is not below expert_count {n_expert}"
        elif groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            expert_rule = (f"expert groups do not fit: {n_expert} experts, {groups} groups, "
                           f"{group_used} groups used")
    elif groups:
        expert_rule = f"expert_group_count is {groups} in a model without experts"
    if expert_rule:
        return f"{arch}: {expert_rule}; llama.cpp aborts on that"

    rope = get("rope.scaling.type", None)
    if rope is not None and rope not in ROPE_SCALING_TYPES:
        return (f"{arch}.rope.scaling.type is {str(rope)[:40]!r}; llama.cpp knows {', '.join(ROPE_SCALING_TYPES)} "
                "and aborts on anything else")
    return None


def run_problem(kvs: Mapping[str, Any], arch: str) -> str | None:
    """`load_problem`, plus the head geometry the architecture's graph asserts when it runs."""
    problem = load_problem(kvs, arch)
    if problem or arch not in _HEAD_V_IS_K:
        return problem
    n_embd = max(_ints(kvs.get(f"{arch}.embedding_length")), default=0)
    heads = _ints(kvs.get(f"{arch}.attention.head_count"))
    n_head = heads[0] if heads else 0
    if n_head <= 0 or n_embd <= 0:
        return None  # llama.cpp itself refuses the model later with an exception
    head_k = max(_ints(kvs.get(f"{arch}.attention.key_length", n_embd // n_head)), default=0)
    head_v = max(_ints(kvs.get(f"{arch}.attention.value_length", n_embd // n_head)), default=0)
    n_rot = max(_ints(kvs.get(f"{arch}.rope.dimension_count", head_k)), default=0)
    if head_v != head_k:
        return (f"{arch}: attention value length {head_v} differs from key length {head_k}; llama.cpp's {arch} "
                "graph asserts they are equal")
    if arch in _ROT_IS_K and n_rot != head_k:
        return (f"{arch}: rope.dimension_count {n_rot} differs from the head size {head_k}; llama.cpp's {arch} "
                "graph asserts they are equal")
    return None
