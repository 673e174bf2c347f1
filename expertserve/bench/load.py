"""The load generator: streams chat completions at a fixed concurrency and times each one (time to first
token, end to end, output tokens from the final usage chunk). Works against any OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from expertserve.bench.stats import Timed


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Timed:
    started = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Timed(0.0, time.perf_counter() - started, 0, f"HTTP {r.status_code}: {text[:300]}")
            replica = r.headers.get("x-expertserve-replica", "")
            loaded = "x-expertserve-expert-load-ms" in r.headers
            finished = False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # a failure after the 200 was sent: the request failed
                    message = str(chunk["error"].get("message", chunk["error"]))[:300]
                    return Timed(
                        0.0, time.perf_counter() - started, 0, f"error event in the stream: {message}"
                    )
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                # The first chunk that carries text: a role-only opening chunk is not a token.
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter()
            if not finished:
                return Timed(0.0, time.perf_counter() - started, 0, "the stream ended without data: [DONE]")
    except (httpx.HTTPError, ValueError, KeyError, AttributeError) as e:
        return Timed(0.0, time.perf_counter() - started, 0, f"{type(e).__name__}: {e}")
    done = time.perf_counter()
    return Timed((first or done) - started, done - started, tokens, replica=replica, loaded=loaded)


async def _run(
    url: str, bodies: list[dict[str, Any]], concurrency: int, headers: dict[str, str] | None
) -> tuple[list[Timed], float]:
    queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    results: list[Timed | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:

        async def worker() -> None:
            while not queue.empty():
                i, body = queue.get_nowait()
                results[i] = await _one(client, url, body)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
        wall = time.perf_counter() - started
    return [r for r in results if r is not None], wall


def run_load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, headers: dict[str, str] | None = None
) -> tuple[list[Timed], float]:
    """Sends `bodies` with `concurrency` requests in flight; returns each request's timing (in order) and the
    wall time of the whole run."""
    return asyncio.run(_run(url, bodies, concurrency, headers))


def run_sequential(url: str, bodies: list[dict[str, Any]]) -> list[Timed]:
    """One request at a time, for latency figures that must not include queueing."""
    return run_load(url, bodies, 1)[0]
