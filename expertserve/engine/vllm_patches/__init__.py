"""expertserve's workarounds for upstream vLLM bugs, one module each, installed by a vLLM general plugin (entry
point group `vllm.general_plugins`, so they also run inside engine-core processes). They act only where
expertserve's engines set EXPERTSERVE_VLLM_PATCHES=1, so a plain vLLM server in the same environment is untouched.

| module | works around | upstream |
| --- | --- | --- |
| `cpu_generator` | seeded sampling crashes the CPU engine (generator rewind) | vllm-project/vllm#10097 |
| `lora_embedding` | soft-prompt rows next to token rows kill a LoRA engine | vllm-project/vllm#51122, #51123 |
| `cpu_lora` | CPU LoRA kernels give base rows the last adapter, and are slow | vllm-project/vllm#48421 |
| `json_whitespace` | JSON under a grammar in a style the experts were not trained on | mlc-ai/xgrammar#945 |

Each names the vLLM versions it was verified on and refuses to start on another one (`guard.py`): a patch that
silently no longer matches vLLM's code would serve wrong tokens.
"""

from __future__ import annotations

import os

from expertserve.engine.vllm_patches import cpu_generator, cpu_lora, json_whitespace, lora_embedding
from expertserve.engine.vllm_patches.json_whitespace import JSON_WHITESPACE, JSON_WHITESPACE_ENV

ENV = "EXPERTSERVE_VLLM_PATCHES"
__all__ = ["ENV", "JSON_WHITESPACE", "JSON_WHITESPACE_ENV", "register"]


def register() -> None:
    """Entry point: patch when asked to."""
    if os.environ.get(ENV) != "1":
        return
    cpu_generator.apply()
    lora_embedding.apply()
    cpu_lora.apply()
    json_whitespace.apply(os.environ.get(JSON_WHITESPACE_ENV, "spaced"))
