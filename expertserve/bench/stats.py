"""Figures from timed requests, ratios, and the targets they are judged by. Pure Python."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from expertserve.stats import percentile


@dataclass(frozen=True)
class Timed:
    """One request as the load generator saw it (seconds; `error` set when it failed)."""

    ttft: float
    latency: float
    output_tokens: int
    error: str | None = None
    replica: str = ""  # the engine replica that answered (x-expertserve-replica), where the server says
    loaded: bool = (
        False  # the request waited for its expert to load on that replica (x-expertserve-expert-load-ms)
    )


def summarize(timed: list[Timed], wall: float) -> dict[str, Any]:
    """Throughput and latency of one scenario run that took `wall` seconds."""
    ok = [t for t in timed if t.error is None]
    ttft = [t.ttft for t in ok]
    latency = [t.latency for t in ok]
    tokens = sum(t.output_tokens for t in ok)
    return {
        "requests": len(timed),
        "errors": len(timed) - len(ok),
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "requests_per_s": len(ok) / wall if wall > 0 else math.nan,
        "ttft_ms_p50": 1000 * percentile(ttft, 50),
        "ttft_ms_p99": 1000 * percentile(ttft, 99),
        "latency_ms_p50": 1000 * percentile(latency, 50),
        "latency_ms_p99": 1000 * percentile(latency, 99),
        "first_error": next((t.error for t in timed if t.error), None),
    }


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; NaN when either is missing or theirs is zero."""
    if theirs == 0 or math.isnan(ours) or math.isnan(theirs):
        return math.nan
    return ours / theirs


@dataclass(frozen=True)
class Target:
    """A figure's goal: `at_least` or `at_most` `bound`."""

    bound: float
    at_least: bool

    def passes(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def describe(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:g}"


# The headline figures (the JSON's top-level keys) in the order they are printed.
FIGURES = {
    "stack_throughput_ratio": "stack output tok/s, ours / vLLM server",
    "stack_ttft_p50_ratio": "stack TTFT p50, ours / vLLM server",
    "stack_throughput_ratio_vllm_client": "same, measured by vllm bench serve: tok/s",
    "stack_ttft_p50_ratio_vllm_client": "same, measured by vllm bench serve: TTFT p50",
    "base_throughput_ratio": "base model only, ours / vLLM server, output tok/s",
    "mixed8_throughput_ratio": "8 experts mixed / base only, output tok/s",
    "mixed32_throughput_ratio": "32 experts mixed / base only, output tok/s",
    "cold_warm_ttft_ratio": "cold / warm TTFT p50",
    "routing_added_ms_p50": "routing added latency p50 (ms)",
    "softprompt_throughput_ratio": "with / without soft prompt, output tok/s",
    "many_throughput_ratio": "many experts (Zipf) / 8 experts mixed, output tok/s",
    "many_cold_warm_ttft_p99_ratio": "many experts: cold-load / warm TTFT p99",
    "placement_held_share": "2 engine replicas, 8 experts: share on a holder",
    "placement_throughput_ratio": "2 engine replicas / 1, 8 experts, output tok/s",
    "fairness_ttft_p50_ratio": "tenant B (2 streams) TTFT p50 under A's 64 / alone",
}
# The targets, printed next to each figure; tests never assert them. Figures without one print "-".
TARGETS = {
    "stack_throughput_ratio": Target(0.95, at_least=True),
    "mixed8_throughput_ratio": Target(0.85, at_least=True),
    "cold_warm_ttft_ratio": Target(2.0, at_least=False),
    "routing_added_ms_p50": Target(10.0, at_least=False),
    "many_throughput_ratio": Target(0.80, at_least=True),
    "base_throughput_ratio": Target(0.95, at_least=True),
    "many_cold_warm_ttft_p99_ratio": Target(2.0, at_least=False),
    "fairness_ttft_p50_ratio": Target(2.0, at_least=False),
}


def verdict(key: str, value: float | None) -> str:
    """'pass', 'FAIL', 'n/a' (not measured) or '-' (no target)."""
    if key not in TARGETS:
        return "-"
    if value is None or math.isnan(value):
        return "n/a"
    return "pass" if TARGETS[key].passes(value) else "FAIL"


def table(results: dict[str, Any]) -> str:
    """The headline figures, one line each, with target and verdict."""
    lines = [f"{'figure':<46} {'value':>9}  {'target':<8} verdict"]
    for key, label in FIGURES.items():
        value = results.get(key)
        shown = "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
        goal = TARGETS[key].describe() if key in TARGETS else "-"
        lines.append(f"{label:<46} {shown:>9}  {goal:<8} {verdict(key, value)}")
    return "\n".join(lines)
