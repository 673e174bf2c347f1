"""Routing latency: p50/p99 of one decision with the shipped experts and with N synthetic experts."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from expertserve.registry import Registry
from expertserve.routing.router import Router
from expertserve.stats import percentile

TARGETS_MS = {"shipped": 10.0, "synthetic": 25.0}


def _time(router: Router, prompts: list[str], n: int) -> dict[str, float]:
    for p in prompts[:10]:  # warm-up
        router.route(p)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        router.route(prompts[i % len(prompts)])
        samples.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(percentile(samples, 99), 2),
        "n": n,
    }


def synthetic_registry(source: Registry, count: int, root: Path) -> Registry:
    """`count` experts cloned from the source experts under new names and topics (same data files)."""
    records = list(source)
    for i in range(count):
        record = records[i % len(records)]
        raw = json.loads(record.loaded.path.read_text())
        raw["name"] = f"expert-synthetic-{i:03d}"
        topic = f"topic{i}"
        raw.setdefault("routing", {"keywords": [topic]})
        raw["routing"]["examples"] = [f"{e} ({topic})" for e in raw["routing"].get("examples", [])]
        dataset = raw["training"]["dataset"]
        dataset["path"] = str(record.root / dataset["path"])
        target = root / raw["name"]
        target.mkdir(parents=True)
        (target / "manifest.json").write_text(json.dumps(raw))
    return Registry.scan([root])


def run_bench(
    embedder: Any,
    shipped: Registry,
    base_model: str,
    prompts: list[str],
    *,
    n: int = 300,
    synthetic: int = 100,
) -> dict[str, Any]:
    """Both measurements, with the targets and whether they were met."""
    results: dict[str, Any] = {}
    router = Router(shipped, embedder, base_model=base_model)
    results["shipped"] = {"experts": len(router.profiles), **_time(router, prompts, n)}
    tmp = Path(tempfile.mkdtemp(prefix="expertserve-route-bench-"))
    try:
        built = time.perf_counter()
        many = Router(synthetic_registry(shipped, synthetic, tmp), embedder, base_model=base_model)
        results["synthetic"] = {
            "experts": len(many.profiles),
            "build_s": round(time.perf_counter() - built, 1),
            **_time(many, prompts, n),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for key, target in TARGETS_MS.items():
        results[key]["target_p99_ms"] = target
        results[key]["pass"] = results[key]["p99_ms"] <= target
    return results
