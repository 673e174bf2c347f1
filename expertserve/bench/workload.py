"""Seeded request workloads. Pure Python: the same seed gives the same prompts, models and lengths, so the
baseline server and ours answer exactly the same requests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

# Topic words and sentence frames: prompts of varied length and content without shipping a corpus.
_TOPICS = [
    "rivers",
    "databases",
    "compilers",
    "gardens",
    "satellites",
    "bridges",
    "violins",
    "volcanoes",
    "markets",
    "glaciers",
    "printers",
    "harbours",
    "forests",
    "engines",
    "libraries",
    "deserts",
]
_FRAMES = [
    "Write a short note about {a} and {b}.",
    "Explain how {a} differ from {b}.",
    "List three facts about {a}.",
    "Describe a day spent near {a} and {b}.",
    "Why do people care about {a}?",
    "Compare {a}, {b} and {c} in a few sentences.",
]


@dataclass(frozen=True)
class Shape:
    """How much work one run of a scenario is."""

    requests: int
    concurrency: int
    max_tokens: int


def prompts(n: int, seed: int) -> list[str]:
    """`n` prompts of 1 to 3 sentences, fixed by `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            a, b, c = rng.sample(_TOPICS, 3)
            sentences.append(rng.choice(_FRAMES).format(a=a, b=b, c=c))
        out.append(" ".join(sentences))
    return out


def zipf_order(models: list[str], n: int, seed: int, s: float = 1.1) -> list[str]:
    """`n` models drawn independently with Zipf weights (rank k has weight 1/k^s, ranks in `models` order)."""
    if not models:
        raise ValueError("models: at least one model is needed")
    weights = [1 / (k**s) for k in range(1, len(models) + 1)]
    return random.Random(seed).choices(models, weights=weights, k=n)


def requests(
    models: list[str], shape: Shape, seed: int, order: list[str] | None = None
) -> list[dict[str, Any]]:
    """Chat completion bodies spread round-robin over `models` (shuffled by `seed`), or in the given `order`, each
    generating exactly `shape.max_tokens` tokens (`ignore_eos`), greedy, streamed with usage."""
    if not models:
        raise ValueError("models: at least one model is needed")
    if order is None:
        rng = random.Random(seed)
        order = [models[i % len(models)] for i in range(shape.requests)]
        rng.shuffle(order)
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": shape.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for model, text in zip(order, prompts(shape.requests, seed), strict=True)
    ]
