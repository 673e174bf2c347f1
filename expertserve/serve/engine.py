"""The engine deployment: one vLLM AsyncLLM per replica with multi-LoRA, prompt embeddings (soft prompts) and
xgrammar structured outputs. It receives fully resolved requests from the ingress and streams chunks back.

Experts are loaded per replica on first use (Serve model multiplexing sends an expert's requests to replicas
that already hold it). Base-model requests go through an all-zero adapter where vLLM's CPU LoRA kernels would
otherwise compute them with the last adapter slot (see `EngineConfig.zero_adapter_for_base`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from expertserve.decoding import Constraint, Resolved
from expertserve.serve.errors import RequestError

ZERO_ADAPTER = "expertserve-zero-adapter"
# Experts a replica keeps loaded; Serve routes an expert's requests to replicas that already hold it.
MAX_EXPERTS_PER_REPLICA = 16


@dataclass
class ExpertRuntime:
    """An expert as a replica serves it."""

    lora: Any  # LoRARequest
    soft_prompt: Any  # torch.Tensor [tokens, hidden] or None
    load_seconds: float


class ExpertEngine:
    """Ray Serve deployment class (the app builder wraps it with `serve.deployment`)."""

    def __init__(self, settings: dict[str, Any]):
        engine = settings["engine"]
        os.environ["EXPERTSERVE_VLLM_PATCHES"] = "1"  # see expertserve/engine/vllm_patches.py
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine["kv_cache_gib"]))
        if engine["in_process"]:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from expertserve.engine.embeddings import PromptEmbedder, load_input_embeddings

        self.model_dir = Path(settings["model_dir"])
        self.max_lora_rank = max(8, settings["max_lora_rank"])
        args = AsyncEngineArgs(
            model=str(self.model_dir), dtype=engine["dtype"], enable_lora=True, max_loras=engine["max_loras"] + 1,
            max_cpu_loras=engine["max_cpu_loras"] + 1, max_lora_rank=self.max_lora_rank,
            enable_prompt_embeds=True, enforce_eager=engine["enforce_eager"], max_num_seqs=engine["max_num_seqs"],
            enable_prefix_caching=bool(settings["prefix_caching"]),
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            **({"max_model_len": engine["max_model_len"]} if engine["max_model_len"] else {}),
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.model_config.max_model_len
        self.embedder = PromptEmbedder(load_input_embeddings(self.model_dir), self.llm.model_config.dtype)
        self._ids = itertools.count(2)
        self._lora_ids: dict[str, int] = {}
        self._specs: dict[str, dict[str, Any]] = {}
        use_zero = engine["zero_adapter_for_base"]
        if use_zero is None:
            use_zero = not torch.cuda.is_available()
        self.zero_lora = self._make_zero_adapter() if use_zero else None

    def _make_zero_adapter(self) -> Any:
        """An adapter whose weights are all zero: base-model output, but a real LoRA slot index."""
        import json

        import torch
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        config = json.loads((self.model_dir / "config.json").read_text())
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        out = Path(tempfile.mkdtemp(prefix="expertserve-zero-lora-"))
        r = 8
        tensors = {}
        for i in range(layers):
            prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(r, hidden)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(hidden, r)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj"], "bias": "none",
            "base_model_name_or_path": str(self.model_dir), "task_type": "CAUSAL_LM"}))
        return LoRARequest(ZERO_ADAPTER, 1, str(out))

    @serve.multiplexed(max_num_models_per_replica=MAX_EXPERTS_PER_REPLICA)
    async def _expert(self, key: str) -> ExpertRuntime:
        """Loads the adapter and soft prompt of an expert version (`name@version`); Serve keeps the result per
        replica, evicts the least recently used, and runs one load per key however many requests wait."""
        from vllm.lora.request import LoRARequest

        from expertserve.train.modules import load_soft_prompt

        spec = self._specs[key]
        start = time.monotonic()
        lora = None
        if spec.get("adapter_dir"):
            lora = LoRARequest(key, self._lora_ids.setdefault(key, next(self._ids)), spec["adapter_dir"])
            await self.llm.add_lora(lora)
        soft = None
        if spec.get("soft_prompts"):
            import torch

            soft = torch.cat([load_soft_prompt(Path(p)) for p in spec["soft_prompts"]])
            if soft.shape[1] != self.embedder.hidden_size:
                raise RequestError(400, f"expert {spec['name']}: soft prompt is {soft.shape[1]} wide, the base "
                                   f"model's hidden size is {self.embedder.hidden_size}", param="model")
        return ExpertRuntime(lora, soft, time.monotonic() - start)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Streams {"index", "text", "finish_reason", "prompt_tokens", "completion_tokens"} chunks."""
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        from expertserve.engine.sampling import sampling_params

        runtime = None
        if request.get("expert"):
            key = f"{request['expert']['name']}@{request['expert']['version']}"
            self._specs[key] = request["expert"]
            runtime = await self._expert(key)
        ids = self._prompt_ids(request)
        soft_tokens = 0 if runtime is None or runtime.soft_prompt is None else runtime.soft_prompt.shape[0]
        resolved = {k: Resolved(v, "request") for k, v in request["sampling"].items()}
        max_tokens = resolved["max_tokens"].value if "max_tokens" in resolved else 16
        if len(ids) + soft_tokens + 1 > self.max_model_len:
            raise RequestError(400, f"the prompt is {len(ids) + soft_tokens} tokens; this model's context is "
                               f"{self.max_model_len}", param="messages" if request["kind"] == "chat" else "prompt",
                               code="context_length_exceeded")
        if len(ids) + soft_tokens + max_tokens > self.max_model_len:
            resolved["max_tokens"] = Resolved(self.max_model_len - len(ids) - soft_tokens, "request")
        constraint = Constraint(**request["constraint"])
        try:
            extras = {"min_tokens": request["min_tokens"]} if request.get("min_tokens") is not None else {}
            params = sampling_params(resolved, constraint, n=request.get("n", 1), seed=request.get("seed"),
                                     ignore_eos=bool(request.get("ignore_eos")), output_kind=RequestOutputKind.DELTA,
                                     **extras)
        except ValueError as e:
            raise RequestError(400, f"invalid sampling parameters: {e}") from None
        prompt = self.embedder.prompt(ids, runtime.soft_prompt if runtime is not None else None)
        lora = runtime.lora if runtime is not None and runtime.lora is not None else self.zero_lora
        request_id = request.get("request_id") or uuid.uuid4().hex
        completion_tokens = [0] * params.n
        try:
            async for out in self.llm.generate(prompt, params, request_id, lora_request=lora):
                for choice in out.outputs:
                    completion_tokens[choice.index] += len(choice.token_ids)
                    yield {"index": choice.index, "text": choice.text, "finish_reason": choice.finish_reason,
                           "token_ids": list(choice.token_ids),
                           "prompt_tokens": len(ids) + soft_tokens,
                           "completion_tokens": completion_tokens[choice.index],
                           "load_seconds": runtime.load_seconds if runtime else 0.0}
        except (ValueError, RuntimeError, VLLMClientError) as e:
            # vLLM rejects a grammar or schema that does not compile at admission (VLLMValidationError).
            message = str(e).splitlines()[0][:500]
            raise RequestError(400, f"the request's output constraint or parameters were rejected: {message}",
                               param="response_format" if constraint.kind != "none" else None) from None
        except asyncio.CancelledError:
            await self.llm.abort(request_id)
            raise

    def _prompt_ids(self, request: dict[str, Any]) -> list[int]:
        from expertserve.engine.embeddings import chat_token_ids

        if request["kind"] == "chat":
            return chat_token_ids(self.tokenizer, request["messages"])
        return self.tokenizer(request["prompt"])["input_ids"]

    async def ping(self) -> bool:
        """The ingress's /healthz probe."""
        await self.llm.check_health()
        return True

    async def check_health(self) -> None:
        """Serve's health check: the engine must be alive."""
        await self.llm.check_health()
