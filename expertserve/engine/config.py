"""The engine settings users write (`engine:` in the server config) and the settings a replica is built with.
Pure Python (pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from expertserve.manifest.base import StrictModel


class EngineConfig(StrictModel):
    """The vLLM engine each replica holds."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights and activations dtype; auto: bfloat16 on a GPU or a CPU with native bf16 (AVX-512 "
        "BF16, AMX), float32 on other CPUs, where it is faster (expertserve/engine/hardware.py).",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length; default: the model's."
    )
    max_loras: int = Field(default=4, ge=1, description="Adapters active in one batch (GPU/CPU LoRA slots).")
    max_cpu_loras: int = Field(default=16, ge=1, description="Adapters kept loaded in host memory.")
    max_lora_rank: int | None = Field(
        default=None, ge=1, description="Largest LoRA rank; default: derived from the registry's experts."
    )
    lora_rank_limit: int = Field(
        default=64,
        ge=8,
        le=512,
        description="Largest LoRA rank the experts may make the engines hold (at start and by a restart); an "
        "expert above it is not served. An explicit max_lora_rank is the operator's and may exceed it.",
    )
    max_num_seqs: int = Field(default=32, ge=1, description="Sequences per engine step.")
    kv_cache_gib: int = Field(
        default=1, ge=1, description="KV cache GiB on CPU (VLLM_CPU_KVCACHE_SPACE, whole GiB)."
    )
    enforce_eager: bool = Field(default=True, description="Skip torch.compile (faster start).")
    prefix_caching: bool | None = Field(
        default=None,
        description="Prefix caching; default: on when an expert sets runtime.requires_kv_cache_persistence.",
    )
    block_size: int | None = Field(
        default=None,
        ge=8,
        description="KV cache block size in positions; prefix caching reuses whole blocks only. Default: vLLM's, "
        "except on CPU with prefix caching on, where 32 (vLLM's CPU default, 128, is longer than a soft prompt and "
        "the chat template's opening together, so nothing of them would be reused).",
    )
    stream_interval_ms: float = Field(
        default=50.0,
        ge=0,
        description="Engine replica -> ingress: after a request's first chunk (sent at once), the chunks of this "
        "many milliseconds travel as one message (0: each engine step is a message). Non-streamed requests cross "
        "as one message.",
    )
    isolate_inference_cores: bool = Field(
        default=True,
        description="On CPU, with the Ray that `expertserve serve` starts: keep Ray's processes off the cores vLLM "
        "binds its inference threads to (see expertserve/serve/cpu_affinity.py). No effect on GPU or on a cluster.",
    )
    engine_metrics: bool = Field(
        default=True,
        description="Export vLLM's engine metrics (vllm:* series) through Ray's metrics; /metrics includes them.",
    )
    in_process: bool = Field(
        default=False,
        description="Run the engine core in the replica's process (starts in seconds; one CPU thread). For tests.",
    )
    restart_overlap: bool | None = Field(
        default=None,
        description="When an engine replica restarts its engine for a new shape (POST /admin/engines/restart): "
        "true starts the new engine while the old one still serves, then moves requests over (both in memory for "
        "a while); false drains the old engine, stops it, then starts the new one (requests arriving meanwhile "
        "wait). Default: true without a GPU, false on a GPU (two engines rarely fit in its memory).",
    )
    zero_adapter_for_base: bool | None = Field(
        default=None,
        description="true: every base-model request runs through an all-zero LoRA adapter (the old CPU "
        "workaround); default (on CPU): only base requests with prompt log probabilities do, which vLLM's CPU LoRA "
        "logits processor needs; the others run with no adapter, their rows masked by expertserve's vLLM plugin. "
        "false: never.",
    )
    json_whitespace: Literal["spaced", "bounded", "vllm"] = Field(
        default="spaced",
        description="Whitespace that JSON and JSON-schema constraints allow (a grammar stops small models padding "
        "with whitespace): spaced: one space after ':' and ',' as Python's json.dumps and most training data write "
        "JSON; bounded: at most one whitespace character at each place; vllm: vLLM's disable_any_whitespace as "
        'xgrammar 0.2.8 compiles it (\'{"a":"b", "c":1}\', a style few models were trained on). Read when '
        "vLLM loads expertserve's plugin: once per engine-core process, so with in_process the first engine of a "
        "process sets it.",
    )


class EngineSettings(StrictModel):
    """What one engine replica is built with: the user's engine config plus what the app derives from the
    registry (see `expertserve.serve.app.resolve_settings`)."""

    model_dir: str = Field(description="Base model directory (a transformers checkpoint).")
    max_lora_rank: int = Field(ge=1, description="Largest LoRA rank the engine must hold.")
    prefix_caching: bool = Field(description="vLLM prefix caching.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The user's engine config.")
