"""The one place vLLM's engine arguments and environment are set, for the server's engine and for the batch
engine that evaluation and the parity tests use: both must apply an expert exactly alike."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from expertserve.engine.config import EngineConfig
from expertserve.engine.hardware import choose_dtype, has_gpu

# With vLLM's default `auto` backend small models emit whitespace until max_tokens; xgrammar without any
# whitespace keeps them on the grammar (the per-request whitespace flag is ignored by vLLM 0.32). Which
# separators JSON then gets is `engine.json_whitespace` (expertserve's vLLM plugin, vllm_patches/json_whitespace.py).
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
# vLLM accepts only these values of max_lora_rank; a smaller adapter fits in a larger slot.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def engine_environment(config: EngineConfig) -> None:
    """Process environment vLLM reads at engine start (set before vLLM is imported)."""
    os.environ["EXPERTSERVE_VLLM_PATCHES"] = "1"  # see expertserve/engine/vllm_patches/
    os.environ["EXPERTSERVE_JSON_WHITESPACE"] = config.json_whitespace
    # Without a bound the CPU KV cache takes most of the RAM; an explicit environment value wins.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    if config.in_process:
        # Both or neither: in-process without one OpenMP thread drops a tiny model from ~500 to ~16 tok/s.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["OMP_NUM_THREADS"] = "1"


def engine_kwargs(
    config: EngineConfig,
    *,
    model_dir: Path,
    max_lora_rank: int,
    prefix_caching: bool | None,
    reserved_loras: int = 0,
    batch: bool = False,
    seed: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `AsyncEngineArgs` (server) or `vllm.LLM` (batch).

    Args:
        config: The user's engine config.
        model_dir: The base model.
        max_lora_rank: The largest rank among the experts to serve.
        prefix_caching: vLLM prefix caching; None keeps vLLM's default.
        reserved_loras: Adapter slots the engine keeps for itself (the server's all-zero adapter).
        batch: For `vllm.LLM`: batch size and host adapter cache stay vLLM's defaults (evaluation fills
            larger batches than a server's step).
        seed: The engine's seed (batch evaluation is reproducible with it).
    """
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": choose_dtype(config.dtype)[0],
        "enable_lora": True,
        "max_loras": config.max_loras + reserved_loras,
        "max_lora_rank": lora_rank_slot(max_lora_rank),
        "enable_prompt_embeds": True,
        "enforce_eager": config.enforce_eager,
        "structured_outputs_config": dict(STRUCTURED_OUTPUTS),
    }
    if not batch:
        kwargs["max_cpu_loras"] = config.max_cpu_loras + reserved_loras
        kwargs["max_num_seqs"] = config.max_num_seqs
        # Waiting requests by priority, then arrival: the ingress gives each request its tenant's fair-queueing tag
        # (all 0 without tenants: first come, first served as before), so a tenant that floods one engine replica
        # (an expert's requests go where it is loaded) does not queue another tenant's requests behind its own.
        kwargs["scheduling_policy"] = "priority"
    if prefix_caching is not None:
        kwargs["enable_prefix_caching"] = prefix_caching
    block_size = kv_block_size(config.block_size, prefix_caching)
    if block_size:
        kwargs["block_size"] = block_size
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    if seed is not None:
        kwargs["seed"] = seed
    return kwargs


# Soft prompt (16 positions here) + the chat template's opening fill one 32-position block: a soft-prompt request
# reuses it. CPU attention wants multiples of 32; measured here, 32-position blocks cost no throughput against 128.
CPU_PREFIX_BLOCK = 32


def kv_block_size(requested: int | None, prefix_caching: bool | None) -> int | None:
    """The KV block size the engine gets: `requested` (`engine.block_size`), else 32 positions on CPU with prefix
    caching (None: vLLM's default)."""
    return requested or (CPU_PREFIX_BLOCK if prefix_caching and not has_gpu() else None)


def lora_rank_slot(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank` (the largest one if `rank` is above every slot, for vLLM
    to refuse with its own message)."""
    return next((slot for slot in LORA_RANKS if slot >= rank), rank)
