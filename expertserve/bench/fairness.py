"""The fairness scenario: tenant B's time to first token while tenant A floods the server, against B alone.

B sends its requests at 2 in flight, first alone, then while A keeps 64 streams in flight (A goes on until B's last
request has ended). The figure is B's TTFT p50 under the flood over B's alone (the goal: within 2x,
docs/tenancy.md). `expertserve bench` runs it on its two-engine server; `python -m expertserve.bench.fairness`
runs it on one engine replica with fair admission on and off, and prints both (about 5 minutes here).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from expertserve.bench import workload
from expertserve.bench.load import run_load
from expertserve.bench.stats import Timed, ratio, summarize
from expertserve.bench.workload import Shape

# The two tenants the benchmark's server is configured with (weights 1 and 1).
KEYS = {"flood": "bench-tenant-flood", "light": "bench-tenant-light"}
TENANTS = {name: {"keys": [key], "weight": 1} for name, key in KEYS.items()}
FLOOD_CONCURRENCY = 64
LIGHT_CONCURRENCY = 2


def _headers(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def fairness(url: str, model: str, light: Shape, flood_tokens: int, seed: int) -> dict[str, Any]:
    """B alone, then B under A's flood of `FLOOD_CONCURRENCY` streams; the TTFT ratio."""
    light_bodies = workload.requests(
        [model], Shape(light.requests, LIGHT_CONCURRENCY, light.max_tokens), seed
    )
    run_load(url, light_bodies[:LIGHT_CONCURRENCY], LIGHT_CONCURRENCY, _headers("light"))  # warm
    alone, alone_wall = run_load(url, light_bodies, LIGHT_CONCURRENCY, _headers("light"))

    stop = threading.Event()
    flood_timed: list[Timed] = []
    flood_wall: list[float] = []

    def flood() -> None:
        timed, wall = asyncio.run(_until(url, model, flood_tokens, seed + 1, stop))
        flood_timed.extend(timed)
        flood_wall.append(wall)

    thread = threading.Thread(target=flood, name="bench-flood", daemon=True)
    thread.start()
    time.sleep(3.0)  # A's streams fill the engines first
    contended, contended_wall = run_load(url, light_bodies, LIGHT_CONCURRENCY, _headers("light"))
    stop.set()
    thread.join(timeout=600)
    b_alone, b_flood = summarize(alone, alone_wall), summarize(contended, contended_wall)
    a = summarize(flood_timed, flood_wall[0] if flood_wall else 0.0)
    return {
        "light_alone": b_alone,
        "light_under_flood": b_flood,
        "flood": a,
        "ttft_p50_ratio": ratio(b_flood["ttft_ms_p50"], b_alone["ttft_ms_p50"]),
        "flood_concurrency": FLOOD_CONCURRENCY,
        "light_concurrency": LIGHT_CONCURRENCY,
    }


async def _until(
    url: str, model: str, tokens: int, seed: int, stop: threading.Event
) -> tuple[list[Timed], float]:
    """A's flood: `FLOOD_CONCURRENCY` streams in flight until `stop` (each worker starts a new one as one ends)."""
    import httpx

    from expertserve.bench.load import _one

    bodies = workload.requests([model], Shape(4096, FLOOD_CONCURRENCY, tokens), seed)
    limits = httpx.Limits(max_connections=FLOOD_CONCURRENCY, max_keepalive_connections=FLOOD_CONCURRENCY)
    timed: list[Timed] = []
    counter = iter(range(len(bodies)))
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(600.0), limits=limits, headers=_headers("flood")
    ) as client:

        async def worker() -> None:
            for i in counter:
                if stop.is_set():
                    return
                timed.append(await _one(client, url, bodies[i]))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(FLOOD_CONCURRENCY)))
        return timed, time.perf_counter() - started


def main() -> None:
    """One engine replica (the offline model, expert-sql), fairness on then off; prints the figures and the CPU."""
    import json
    import tempfile
    from pathlib import Path

    from expertserve.bench.run import machine
    from expertserve.bench.servers import expertserve_server, free_port
    from expertserve.models import offline

    repo = Path(__file__).resolve().parents[2]
    work = Path(tempfile.mkdtemp(prefix="expertserve-fairness-"))
    print(json.dumps(machine()["cpu_info"], default=str)[:400])
    for label, fair in (("on", {}), ("off", {"enabled": False})):
        config = {
            "model_dir": str(offline.prepared_model_dir()),
            "model_id": offline.DEFAULT_MODEL.model_id,
            "experts_dirs": [str(repo / "experts")],
            "port": free_port(),
            "ray_dashboard": False,
            "tenants": TENANTS,
            "fairness": fair,
        }
        (work / f"{label}.json").write_text(json.dumps(config))
        with expertserve_server(work / f"{label}.json", work / f"{label}.log", 1) as url:
            found = fairness(url, "expert-sql", Shape(16, LIGHT_CONCURRENCY, 16), 32, 7)
        print(
            f"fairness {label}: B TTFT p50 alone {found['light_alone']['ttft_ms_p50']:.0f} ms, under the flood "
            f"{found['light_under_flood']['ttft_ms_p50']:.0f} ms, ratio {found['ttft_p50_ratio']:.2f} (goal <= 2); "
            f"A {found['flood']['output_tokens_per_s']:.0f} tok/s meanwhile",
            flush=True,
        )


if __name__ == "__main__":
    main()
