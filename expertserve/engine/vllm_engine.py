"""The vLLM engine: one `AsyncLLM` with multi-LoRA, prompt embeddings (soft prompts) and xgrammar structured
outputs, applying fully resolved requests as given.

Base-model requests run without an adapter: expertserve's vLLM plugin (engine/vllm_patches/) gives their rows no
LoRA term in mixed CPU batches. Only base requests with prompt log probabilities go through an all-zero adapter, which
vLLM's CPU LoRA logits processor needs (see `EngineConfig.zero_adapter_for_base`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertserve.decoding import PARAMETERS, Resolved
from expertserve.engine.args import engine_environment, engine_kwargs
from expertserve.engine.config import EngineSettings
from expertserve.engine.protocol import ExpertEngine, LoadedExpert
from expertserve.engine.request import Chunk, EngineRequest, ExpertSpec, Extras, Sampling, TokenLogprob
from expertserve.errors import ExpertLoadError, InvalidSampling, PromptTooLong

ZERO_ADAPTER = "expertserve-zero-adapter"
# Adapter ids per process, not per engine: after an engine restart (a new shape) the replica still holds experts the
# old engine loaded, whose LoRARequests the new engine loads by id on first use; a fresh count would give another
# adapter the same id.
_LORA_IDS: dict[str, int] = {}
_NEXT_ID = itertools.count(2)  # 1 is the zero adapter


@dataclass(frozen=True)
class VLLMExpert(LoadedExpert):
    """An expert as vLLM applies it."""

    lora: Any = None  # vllm LoRARequest
    soft_prompt: Any = None  # torch.Tensor [tokens, hidden]


class VLLMExpertEngine(ExpertEngine):
    """`ExpertEngine` on vLLM's `AsyncLLM`."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.model_dir = Path(settings.model_dir)

    async def start(self) -> None:
        """Builds the engine (vLLM reads its environment at import, so that is set first)."""
        config = self.settings.engine
        engine_environment(config)
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from expertserve.engine.embeddings import PromptEmbedder, load_input_embeddings

        use_zero = config.zero_adapter_for_base
        if use_zero is None:
            use_zero = not torch.cuda.is_available()
        args = AsyncEngineArgs(
            **engine_kwargs(
                config,
                model_dir=self.model_dir,
                max_lora_rank=self.settings.max_lora_rank,
                prefix_caching=self.settings.prefix_caching,
                reserved_loras=1 if use_zero else 0,
            )
        )
        loggers = []
        if config.engine_metrics:
            # vLLM's engine metrics (KV cache, queue, TTFT, TPOT, prefix cache, LoRA) as Ray metrics, the way Ray
            # Serve LLM exports them: the ingress's /metrics gathers them from Ray's metrics endpoints.
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers.append(RayPrometheusStatLogger)
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=loggers or None)
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.model_config.max_model_len
        self.vocab_size = self.llm.model_config.get_vocab_size()
        self.embedder = PromptEmbedder(load_input_embeddings(self.model_dir), self.llm.model_config.dtype)
        self.zero_lora = self._make_zero_adapter() if use_zero else None

    def _base_lora(self, request: EngineRequest) -> Any:
        """The adapter a request without one runs with: none (expertserve's vLLM plugin gives base rows of a mixed
        CPU batch no LoRA term), except the all-zero adapter where vLLM 0.32's CPU LoRA logits processor fails
        without one (two base rows with prompt log probabilities in one step), or where the config asks for it
        for every base request (`zero_adapter_for_base: true`)."""
        if self.zero_lora is None:
            return None
        if self.settings.engine.zero_adapter_for_base or request.extras.prompt_logprobs is not None:
            return self.zero_lora
        return None

    def _make_zero_adapter(self) -> Any:
        """An adapter whose weights are all zero: base-model output, but a real LoRA slot index."""
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
        (out / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": r,
                    "lora_alpha": r,
                    "target_modules": ["q_proj"],
                    "bias": "none",
                    "base_model_name_or_path": str(self.model_dir),
                    "task_type": "CAUSAL_LM",
                }
            )
        )
        return LoRARequest(ZERO_ADAPTER, 1, str(out))

    async def load_expert(self, spec: ExpertSpec) -> VLLMExpert:
        """Registers the adapter with vLLM and reads the soft prompts."""
        from vllm.lora.request import LoRARequest

        from expertserve.engine.soft_prompts import load_soft_prompts

        start = time.monotonic()
        lora = None
        try:
            if spec.adapter_dir:
                lora = LoRARequest(spec.key, _lora_id(spec.key), spec.adapter_dir)
                await self.llm.add_lora(lora)
            soft = load_soft_prompts([Path(p) for p in spec.soft_prompt_files], self.embedder.hidden_size)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ExpertLoadError(spec.name, str(e).splitlines()[0][:500]) from None
        tokens = 0 if soft is None else int(soft.shape[0])
        return VLLMExpert(spec, time.monotonic() - start, tokens, lora=lora, soft_prompt=soft)

    async def generate(self, request: EngineRequest, expert: LoadedExpert | None) -> AsyncIterator[Chunk]:
        """Streams chunks; vLLM aborts the request itself when this generator is cancelled."""
        from vllm.exceptions import VLLMClientError

        loaded = expert if isinstance(expert, VLLMExpert) else None
        if (
            request.extras.prompt_logprobs is not None
            and loaded is not None
            and loaded.soft_prompt is not None
        ):
            raise InvalidSampling(
                f"echo: prompt log probabilities are not available for {loaded.spec.name}: its soft prompt goes to "
                "the engine as embeddings, for which vLLM computes none",
                param="echo",
            )
        ids = self._prompt_ids(request)
        prompt_tokens = len(ids) + (loaded.soft_prompt_tokens if loaded else 0)
        params = self._sampling_params(request, prompt_tokens)
        prompt = self.embedder.prompt(ids, loaded.soft_prompt if loaded else None)
        lora = loaded.lora if loaded is not None and loaded.lora is not None else self._base_lora(request)
        completion_tokens = [0] * params.n
        prompt_sent = [False] * params.n
        try:
            async for out in self.llm.generate(
                prompt, params, request.request_id, lora_request=lora, priority=request.priority
            ):
                for choice in out.outputs:
                    first = not prompt_sent[choice.index]
                    prompt_sent[choice.index] = True
                    prompt_lp = (
                        self._prompt_logprobs(ids, out.prompt_logprobs, request.extras.prompt_logprobs)
                        if first
                        else ()
                    )
                    if (
                        request.extras.score_only
                    ):  # scoring: the prompt's log probabilities, no generated text
                        if first:
                            yield Chunk(
                                choice.index, "", (), "length", prompt_tokens, 0, prompt_logprobs=prompt_lp
                            )
                        continue
                    completion_tokens[choice.index] += len(choice.token_ids)
                    yield Chunk(
                        choice.index,
                        choice.text,
                        tuple(choice.token_ids),
                        choice.finish_reason,
                        prompt_tokens,
                        completion_tokens[choice.index],
                        logprobs=_sample_logprobs(choice.token_ids, choice.logprobs, request.extras.logprobs),
                        prompt_logprobs=prompt_lp,
                    )
        except (ValueError, RuntimeError, VLLMClientError) as e:
            # vLLM rejects a grammar or schema that does not compile at admission (VLLMValidationError).
            raise _rejected(e, request) from None

    def _sampling_params(self, request: EngineRequest, prompt_tokens: int) -> Any:
        """vLLM SamplingParams; max_tokens is what the request resolved, lowered to fit the context (or, when
        nothing set it, the whole remaining context, as vLLM's own server does)."""
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        from expertserve.engine.sampling import sampling_params

        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise PromptTooLong(prompt_tokens, self.max_model_len, request.prompt_param)
        sampling: Sampling = request.sampling
        if request.extras.score_only:  # vLLM needs one token to run; it is not sent to the client
            sampling = sampling.with_max_tokens(1)
        elif sampling.max_tokens is None or sampling.max_tokens.value > room:
            sampling = sampling.with_max_tokens(room)
        extras = request.extras
        top_k = sampling.top_k
        if top_k is not None and top_k.value > self.vocab_size:  # every token: the same as no limit
            sampling = dataclasses.replace(sampling, top_k=Resolved(-1, top_k.source))
        try:
            return sampling_params(
                sampling.values(),
                request.constraint,
                n=extras.n,
                seed=extras.seed,
                ignore_eos=extras.ignore_eos,
                # A whole (non-streamed) answer needs only the final output: no per-step work in this process.
                output_kind=RequestOutputKind.FINAL_ONLY if extras.whole else RequestOutputKind.DELTA,
                logprobs=extras.logprobs,
                prompt_logprobs=extras.prompt_logprobs,
                **({"min_tokens": extras.min_tokens} if extras.min_tokens is not None else {}),
            )
        except (ValueError, VLLMClientError) as e:
            raise _rejected(e, request) from None

    def _prompt_logprobs(self, ids: list[int], positions: Any, k: int | None) -> tuple[TokenLogprob, ...]:
        """vLLM's prompt logprobs (None at the first position, which nothing precedes) for the prompt's tokens."""
        if not positions or k is None:
            return ()
        out = [TokenLogprob(self.tokenizer.decode([ids[0]]), ids[0], None)]
        out += [
            _entry(tid, alternatives, k) for tid, alternatives in zip(ids[1:], positions[1:], strict=False)
        ]
        return tuple(out)

    def _prompt_ids(self, request: EngineRequest) -> list[int]:
        from expertserve.engine.embeddings import chat_token_ids

        if request.kind == "chat":
            messages = [
                {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                for m in request.messages
            ]
            return chat_token_ids(self.tokenizer, messages)
        return list(self.tokenizer(request.prompt)["input_ids"])

    async def abort(self, request_id: str) -> None:
        """Aborts a request in vLLM (unknown ids are ignored by vLLM)."""
        await self.llm.abort(request_id)

    async def check_health(self) -> None:
        """Raises when vLLM's engine core is dead."""
        await self.llm.check_health()

    async def shutdown(self) -> None:
        """Stops vLLM's engine core (its process and memory)."""
        self.llm.shutdown()


def _lora_id(key: str) -> int:
    """The expert's adapter id in this process (the same for every engine it runs)."""
    if key not in _LORA_IDS:
        _LORA_IDS[key] = next(_NEXT_ID)
    return _LORA_IDS[key]


# Request fields vLLM's validation messages start with ("min_tokens must be ...") when they name no parameter.
_FIELDS = {*PARAMETERS, *(f.name for f in dataclasses.fields(Extras))}


def _rejected(error: Exception, request: EngineRequest) -> InvalidSampling:
    """vLLM's refusal as a domain error naming the request field: vLLM's `parameter` when it gives one, else the
    field its message starts with, else the output constraint when the request has one."""
    message = str(error).splitlines()[0][:500]
    first = message.split(" ", 1)[0].strip("`'\":")
    param = getattr(error, "parameter", None) or (first if first in _FIELDS else None)
    if param is None and request.constraint.kind != "none":
        param = "response_format"
    return InvalidSampling(f"the engine refused the request: {message}", param=param)


def _entry(token_id: int, alternatives: Any, k: int) -> TokenLogprob:
    """One position of vLLM's logprobs ({token id: Logprob}, the `k` most likely plus the token taken when it is
    not among them): the token taken, and the `k` most likely as alternatives."""
    chosen = alternatives[token_id]
    ranked = sorted(alternatives.items(), key=lambda item: item[1].rank or 0)[:k]
    top = tuple((lp.decoded_token or "", tid, float(lp.logprob)) for tid, lp in ranked)
    return TokenLogprob(chosen.decoded_token or "", token_id, float(chosen.logprob), top)


def _sample_logprobs(token_ids: Any, logprobs: Any, k: int | None) -> tuple[TokenLogprob, ...]:
    if not logprobs or k is None:
        return ()
    return tuple(_entry(tid, alternatives, k) for tid, alternatives in zip(token_ids, logprobs, strict=False))
