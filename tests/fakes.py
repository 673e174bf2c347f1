"""Test doubles for the layers above the engine: `FakeEngine` (an `ExpertEngine` with no model) and
`FakeEmbedder` (a deterministic bag-of-words embedder for the router). Pure Python plus numpy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from expertserve.engine.config import EngineSettings
from expertserve.engine.protocol import ExpertEngine, LoadedExpert
from expertserve.engine.request import Chunk, EngineRequest, ExpertSpec, TokenLogprob
from expertserve.errors import ExpertLoadError, PromptTooLong

FAKE_CONTEXT = 256


class FakeEngine(ExpertEngine):
    """Answers with one word per token: `[expert@version replica=R loads=N t=T] echo of the prompt ...`.

    The bracket names the expert and version it applied (`base` for the base model), the replica that answered
    and how often that replica loaded the expert, and the temperature it was given, so tests over HTTP can see
    what reached the engine. A prompt word `slow:S` makes every token take S seconds. A prompt is one token per whitespace-separated word (plus one per soft-prompt file);
    the context is `engine.max_model_len` or 256. An expert whose adapter_config.json is missing or holds
    `"fake_fail_load": true` fails to load, as a broken adapter does in vLLM.
    """

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.replica = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.loads: Counter[str] = Counter()
        self.aborted: list[str] = []
        self.context = settings.engine.max_model_len or FAKE_CONTEXT
        self.stopped = False

    async def start(self) -> None:
        await asyncio.sleep(0.5)  # long enough for a restart's overlap to show (a real engine takes 20-60 s)

    async def load_expert(self, spec: ExpertSpec) -> LoadedExpert:
        config = Path(spec.adapter_dir or "") / "adapter_config.json"
        if not config.is_file() or json.loads(config.read_text()).get("fake_fail_load"):
            raise ExpertLoadError(spec.name, f"{config}: the engine could not load it")
        rank = json.loads(config.read_text()).get("r") or 0
        if rank > self.settings.max_lora_rank:  # as vLLM refuses it
            raise ExpertLoadError(
                spec.name, f"rank {rank} is above max_lora_rank {self.settings.max_lora_rank}"
            )
        self.loads[spec.key] += 1
        return LoadedExpert(spec, load_seconds=0.001, soft_prompt_tokens=len(spec.soft_prompt_files))

    async def generate(self, request: EngineRequest, expert: LoadedExpert | None) -> AsyncIterator[Chunk]:
        if request.kind == "chat":
            prompt_words = [w for m in request.messages for w in m.content.split()]
            words = request.messages[-1].content.split()
        else:
            prompt_words = words = (request.prompt or "").split()
        prompt_tokens = len(prompt_words) + (expert.soft_prompt_tokens if expert else 0)
        if self.stopped:  # a replica must not send requests to an engine it shut down
            raise RuntimeError("FakeEngine was shut down")
        if "fake:crash" in words:  # a bug in the engine, for tests of what a client sees then
            raise RuntimeError("FakeEngine crashed as asked")
        if prompt_tokens + 1 > self.context:
            raise PromptTooLong(prompt_tokens, self.context, request.prompt_param)
        name = f"{expert.spec.name}@{expert.spec.version}" if expert else "base"
        temperature = request.sampling.temperature.value if request.sampling.temperature else None
        loads = self.loads[expert.spec.key] if expert else 0
        reply = [f"[{name}", f"replica={self.replica}", f"loads={loads}", f"t={temperature}]", *words]
        # `slow:S` in the prompt: S seconds per token, to keep the engine busy.
        delay = next(
            (float(w[5:]) for w in words if w.startswith("slow:") and w[5:].replace(".", "").isdigit()), 0
        )
        limit = (
            request.sampling.max_tokens.value if request.sampling.max_tokens else self.context - prompt_tokens
        )
        extras = request.extras
        prompt_lp = _fake_logprobs(prompt_words, extras.prompt_logprobs, first_none=True)
        for index in range(extras.n):
            if extras.score_only:
                yield Chunk(index, "", (), "length", prompt_tokens, 0, prompt_logprobs=prompt_lp)
                continue
            out = reply[:limit]
            for i, word in enumerate(out):
                await asyncio.sleep(delay)
                if self.stopped:
                    raise RuntimeError("FakeEngine was shut down while a request ran on it")
                last = i == len(out) - 1
                text = word if i == 0 else " " + word
                yield Chunk(
                    index,
                    text,
                    (i,),
                    ("length" if len(reply) > limit else "stop") if last else None,
                    prompt_tokens,
                    i + 1,
                    logprobs=_fake_logprobs([text], extras.logprobs),
                    prompt_logprobs=prompt_lp if i == 0 else (),
                )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        await asyncio.sleep(0)

    async def shutdown(self) -> None:
        self.stopped = True


def _fake_logprobs(tokens: list[str], k: int | None, first_none: bool = False) -> tuple[TokenLogprob, ...]:
    """-1 per token, alternatives `alt0`..`alt{k-1}` at -2, -3, ... (prompt tokens: the first has none)."""
    if k is None:
        return ()
    out = []
    for i, token in enumerate(tokens):
        top = tuple((f"alt{j}", 1000 + j, -2.0 - j) for j in range(k))
        out.append(TokenLogprob(token, i, None if first_none and i == 0 else -1.0, top))
    return tuple(out)


class FakeEmbedder:
    """Hashed word counts, normalised: similarity = shared words."""

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 256), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % 256] += 1
            norm = np.linalg.norm(out[i])
            out[i] /= norm if norm else 1
        return out
