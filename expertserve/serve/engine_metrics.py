"""vLLM's engine metrics in the ingress's `/metrics`.

The engines report them through vLLM's Ray stat logger (`engine.engine_metrics`), so they live in Ray's metrics,
which every Ray node exports in Prometheus text on its metrics port. `/metrics` appends the `vllm` series of every
node, and the engine replicas' expert loads and evictions (`ray_expertserve_engine_expert_loads_total`,
`ray_expertserve_engine_expert_evictions_total`), (Ray labels each with the worker, that is the engine replica, that reported it), read at most once a second,
never waiting more than a second.
"""

from __future__ import annotations

import asyncio
import time

CACHE_SECONDS = 1.0
TIMEOUT_SECONDS = 1.0


class EngineMetrics:
    """The `vllm` series of the cluster's Ray metrics endpoints, cached."""

    def __init__(self) -> None:
        self._text = ""
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def text(self) -> str:
        """Prometheus text of every vLLM series ("" when none is reachable)."""
        async with self._lock:
            if time.monotonic() - self._at >= CACHE_SECONDS:
                try:
                    self._text = await asyncio.wait_for(asyncio.to_thread(_scrape), TIMEOUT_SECONDS + 1)
                except Exception:  # Ray's metrics are an extra: /metrics answers without them
                    self._text = ""
                self._at = time.monotonic()
            return self._text


def _scrape() -> str:
    import httpx
    import ray

    lines: list[str] = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        try:
            text = httpx.get(
                f"http://{node['NodeManagerAddress']}:{port}/metrics", timeout=TIMEOUT_SECONDS
            ).text
        except httpx.HTTPError:
            continue
        lines += [line for line in text.splitlines() if _ours(line.split("{", 1)[0])]
    return "\n".join(lines) + ("\n" if lines else "")


def _ours(name: str) -> bool:
    """vLLM's series, and the engine replicas' own (`ray_expertserve_engine_*`: expert loads and evictions)."""
    return "vllm" in name or "expertserve_engine_" in name
