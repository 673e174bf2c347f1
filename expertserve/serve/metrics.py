"""Prometheus metrics of the ingress (`GET /metrics`): requests, errors, TTFT, latency, tokens, adapter load
time per expert, and requests in flight."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """One registry per ingress replica (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("expertserve_requests", "Finished requests", ["expert", "outcome"], registry=r)
        self.ttft = Histogram("expertserve_ttft_seconds", "Time to first token", ["expert"], registry=r,
                              buckets=LATENCY_BUCKETS)
        self.latency = Histogram("expertserve_latency_seconds", "End-to-end latency", ["expert"], registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.tokens = Counter("expertserve_tokens", "Tokens processed", ["expert", "kind"], registry=r)
        self.adapter_load = Gauge("expertserve_adapter_load_seconds", "Last adapter + soft prompt load time",
                                  ["expert"], registry=r)
        self.ongoing = Gauge("expertserve_requests_in_flight", "Requests being processed (queue depth)", registry=r)
        self.errors = Counter("expertserve_errors", "Requests refused or failed", ["status"], registry=r)
        self.routed = Counter("expertserve_routed", "Routed requests by chosen expert ('base' on fallback)",
                              ["expert"], registry=r)
        self.fallbacks = Counter("expertserve_route_fallbacks", "Routed requests the base model answered",
                                 registry=r)
        self.route_decision = Histogram("expertserve_route_decision_seconds", "Routing decision time (in its thread)",
                                        registry=r, buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))

    def observe_first(self, expert: str, started: float, chunk: dict[str, Any] | None) -> None:
        """First chunk arrived."""
        self.ttft.labels(expert).observe(time.monotonic() - started)
        if chunk and chunk.get("load_seconds"):
            self.adapter_load.labels(expert).set(chunk["load_seconds"])

    def finish(self, expert: str, started: float, usage: dict[str, int] | None, ok: bool) -> None:
        """A request ended."""
        self.requests.labels(expert, "ok" if ok else "error").inc()
        self.latency.labels(expert).observe(time.monotonic() - started)
        if usage:
            self.tokens.labels(expert, "prompt").inc(usage["prompt_tokens"])
            self.tokens.labels(expert, "completion").inc(usage["completion_tokens"])

    def render(self) -> bytes:
        """Prometheus text format."""
        return generate_latest(self.registry)
