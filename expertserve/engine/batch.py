"""An in-process vLLM engine for batch generation (evaluation, parity checks), with the expert's adapter,
soft prompt and decoding applied exactly as serving applies them (the same engine arguments, expertserve.engine.args,
and the same prompt builder, expertserve.engine.embeddings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertserve.engine.args import engine_environment, engine_kwargs
from expertserve.engine.config import EngineConfig


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete.

    Attributes:
        messages: Chat messages, formatted with the base model's chat template.
        sampling: vLLM SamplingParams.
        lora: (name, int id, adapter dir) or None for the base model.
        soft_prompt: [tokens, hidden] tensor prepended as embeddings, or None.
    """

    messages: list[dict[str, str]]
    sampling: Any
    lora: tuple[str, int, str] | None = None
    soft_prompt: Any = None


class BatchEngine:
    """vllm.LLM with multi-LoRA, prompt embeddings and xgrammar structured outputs."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        prefix_caching: bool | None = None,
    ):
        config = EngineConfig.model_validate(
            {"dtype": dtype, "max_loras": max_loras, "max_model_len": max_model_len, "enforce_eager": True}
        )
        engine_environment(config)
        from vllm import LLM

        from expertserve.engine.embeddings import PromptEmbedder, load_input_embeddings

        self.model_dir = model_dir
        self.llm = LLM(
            **engine_kwargs(
                config,
                model_dir=model_dir,
                max_lora_rank=max_lora_rank,
                prefix_caching=prefix_caching,
                batch=True,
                seed=seed,
            )
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.embedder = PromptEmbedder(
            load_input_embeddings(model_dir), self.llm.llm_engine.model_config.dtype
        )

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        """Completions in order. Callers keep base-model and adapter requests in separate calls (the CPU
        LoRA kernels apply the last adapter to base rows of a mixed batch; see the platform notes)."""
        from vllm.lora.request import LoRARequest

        prompts = [self.prompt(r) for r in requests]
        loras = [LoRARequest(*r.lora) if r.lora else None for r in requests]
        outputs = self.llm.generate(
            prompts, [r.sampling for r in requests], lora_request=loras, use_tqdm=False
        )
        return [o.outputs[0].text for o in outputs]

    def prompt(self, request: GenerationRequest) -> dict[str, Any]:
        """The vLLM prompt of one request (chat template, then token ids or soft prompt + embeddings)."""
        from expertserve.engine.embeddings import chat_token_ids

        return self.embedder.prompt(chat_token_ids(self.tokenizer, request.messages), request.soft_prompt)

    def close(self) -> None:
        """Stops the engine's processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()
