"""A soft prompt's positions computed once and reused (prefix caching over prompt embeddings, 32-position blocks on
CPU): on the real engine with the shipped JSON expert's adapter and soft prompt, requests that reuse them answer
token for token as the same requests computed from scratch (the engine's prefix cache emptied before each: one engine
start instead of a second engine without prefix caching)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["Ana Lopez is 41.", "Bo Chen, aged 29, lives in Oslo.", "Ines is 35 and works as a pilot."]


def _answers(engine: Any, *, from_scratch: bool) -> list[tuple[list[int], int]]:
    """(token ids, cached prompt positions) per request, one request at a time, then the first one again; with
    `from_scratch` the prefix cache is emptied before each request."""
    from safetensors.torch import load_file
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from expertserve.engine.batch import GenerationRequest

    soft = next(iter(load_file(REPO / "experts/expert-json/soft_prompts/json_strict.safetensors").values()))
    adapter = ("expert-json", 3, str(REPO / "experts/expert-json/adapter"))
    greedy = SamplingParams(temperature=0, max_tokens=12)
    llm = engine.llm
    out = []
    for text in [*TEXTS, TEXTS[0]]:
        if from_scratch:
            assert llm.reset_prefix_cache()
        messages = [{"role": "user", "content": f"Extract name and age as JSON: {text}"}]
        prompt = engine.prompt(GenerationRequest(messages, greedy, adapter, soft))
        result = llm.generate(prompt, greedy, lora_request=LoRARequest(*adapter), use_tqdm=False)[0]
        out.append((list(result.outputs[0].token_ids), result.num_cached_tokens or 0))
    return out


def test_requests_reusing_the_soft_prompts_positions_answer_as_computed_from_scratch() -> None:
    from expertserve.engine.batch import BatchEngine
    from expertserve.models import offline

    engine = BatchEngine(offline.prepared_model_dir(), prefix_caching=True)
    try:
        reused = _answers(engine, from_scratch=False)
        scratch = _answers(engine, from_scratch=True)
    finally:
        engine.close()
    assert reused[0][1] == 0, "nothing is cached before the first request"
    # Later prompts differ from the first after the chat template's opening: the soft prompt's block is reused.
    assert all(cached >= 32 for _, cached in reused[1:]), reused
    assert all(cached == 0 for _, cached in scratch)
    assert [tokens for tokens, _ in reused] == [tokens for tokens, _ in scratch]
    assert reused[-1][0] == reused[0][0]
