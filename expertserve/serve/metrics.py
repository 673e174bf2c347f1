"""Prometheus metrics of the ingress (`GET /metrics`): requests, errors, TTFT, latency, tokens, adapter load
time per expert, and requests in flight."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from expertserve.engine.request import Chunk

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """One registry per ingress replica (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "expertserve_requests", "Finished requests", ["expert", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "expertserve_ttft_seconds", "Time to first token", ["expert"], registry=r, buckets=LATENCY_BUCKETS
        )
        self.latency = Histogram(
            "expertserve_latency_seconds",
            "End-to-end latency",
            ["expert"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.tokens = Counter("expertserve_tokens", "Tokens processed", ["expert", "kind"], registry=r)
        self.adapter_load = Gauge(
            "expertserve_adapter_load_seconds",
            "Last wait of a request for its expert's adapter + soft prompt load",
            ["expert"],
            registry=r,
        )
        self.ongoing = Gauge(
            "expertserve_requests_in_flight", "Requests being processed (queue depth)", registry=r
        )
        self.errors = Counter("expertserve_errors", "Requests refused or failed", ["status"], registry=r)
        self.lifecycle = Counter(
            "expertserve_expert_lifecycle",
            "Expert lifecycle events: discovered, invalid, kept (last valid version), broken, servable, "
            "not_servable, removed, loaded (on an engine replica)",
            ["event"],
            registry=r,
        )
        self.engine_lost = Counter(
            "expertserve_engine_lost",
            "Times a request found its engine replica dead or restarting before any output (then sent again)",
            registry=r,
        )
        self.routed = Counter(
            "expertserve_routed",
            "Routed requests by chosen expert ('base' on fallback)",
            ["expert"],
            registry=r,
        )
        self.fallbacks = Counter(
            "expertserve_route_fallbacks", "Routed requests the base model answered", registry=r
        )
        self.route_decision = Histogram(
            "expertserve_route_decision_seconds",
            "Routing decision time (in its thread)",
            registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
        )

        # Tenant names as labels, never keys (docs/tenancy.md).
        self.tenant_requests = Counter(
            "expertserve_tenant_requests",
            "Requests per tenant and expert by outcome (ok, error, abandoned, rejected: 429, overloaded: 503)",
            ["tenant", "expert", "outcome"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "expertserve_tenant_tokens",
            "Tokens per tenant and expert (kind: prompt, completion)",
            ["tenant", "expert", "kind"],
            registry=r,
        )
        self.tenant_rejections = Counter(
            "expertserve_tenant_rejections",
            "Requests refused with 429 per tenant and expert, by the limit they were over",
            ["tenant", "expert", "limit"],
            registry=r,
        )

    def track(
        self, expert: str, on_end: Callable[[str, dict[str, int] | None], None] | None = None
    ) -> RequestTracker:
        """Starts tracking one request sent to the engine (it counts as in flight until the tracker ends);
        `on_end(outcome, usage)` is told once how it ended (the tenant's ticket, serve/quota.py)."""
        return RequestTracker(self, expert, on_end)

    def render(self) -> bytes:
        """Prometheus text format."""
        return generate_latest(self.registry)


class RequestTracker:
    """One request's metrics from the moment it goes to the engine to its end: the only code that moves the
    in-flight gauge, so it goes down exactly once however the request ends (done, failed, client gone)."""

    def __init__(
        self,
        metrics: Metrics,
        expert: str,
        on_end: Callable[[str, dict[str, int] | None], None] | None = None,
    ):
        self._metrics, self.expert, self._on_end = metrics, expert, on_end
        self.started = time.monotonic()
        self._open = True
        metrics.ongoing.inc()

    def first(self, chunk: Chunk | None, *, streamed: bool = True) -> None:
        """The first chunk arrived (TTFT, for streamed requests: a non-streamed answer arrives whole; the expert's
        load time on its replica)."""
        if streamed:
            self._metrics.ttft.labels(self.expert).observe(time.monotonic() - self.started)
        if chunk is not None and chunk.load_seconds:
            self._metrics.adapter_load.labels(self.expert).set(chunk.load_seconds)
            self._metrics.lifecycle.labels("loaded").inc()

    def done(self, usage: dict[str, int]) -> None:
        """The request finished normally."""
        if self._end("ok", usage):
            self._metrics.tokens.labels(self.expert, "prompt").inc(usage["prompt_tokens"])
            self._metrics.tokens.labels(self.expert, "completion").inc(usage["completion_tokens"])

    def failed(self, status: int) -> None:
        """The engine refused or failed the request."""
        if self._end("error"):
            self._metrics.errors.labels(str(status)).inc()

    def close(self) -> None:
        """Ends the request as abandoned (the client went away) unless it ended already."""
        self._end("abandoned")

    def _end(self, outcome: str, usage: dict[str, int] | None = None) -> bool:
        if not self._open:
            return False
        self._open = False
        self._metrics.ongoing.dec()
        self._metrics.requests.labels(self.expert, outcome).inc()
        self._metrics.latency.labels(self.expert).observe(time.monotonic() - self.started)
        if self._on_end is not None:
            self._on_end(outcome, usage)
        return True
