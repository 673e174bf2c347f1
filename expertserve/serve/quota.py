"""Admission of a request for its tenant: its limits (counted in one book shared by every ingress replica), its
place in the weighted-fair queue, and its usage. Runs in each ingress replica.

The book (tenancy/limits.py) lives in a small Ray actor per app (`QuotaActor`), so a limit holds across ingress
replicas exactly: every admission of a limited tenant is one call to it (about a millisecond), and tenants without
limits never call it. Usage is counted here and flushed to the actor every `FLUSH_S` with the tickets still
running (their renewal), so `GET /admin/usage` is at most `FLUSH_S` behind for other replicas. Outside Serve (unit
tests) the book is in-process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from expertserve.serve.errors import RequestError
from expertserve.serve.metrics import Metrics
from expertserve.tenancy.config import Tenant
from expertserve.tenancy.fair import FairGate, GateFull
from expertserve.tenancy.limits import LimitBook, UsageBook

logger = logging.getLogger("ray.serve")

FLUSH_S = 1.0
CHARS_PER_TOKEN = 4  # the prompt's estimate at admission (corrected to the engine's count at the end)
DEFAULT_COMPLETION = 256  # a request whose max_tokens nothing set
PRIORITY_SCALE = 1000  # the fair tag (in requests / weight) to the engine's integer priority
MAX_PRIORITY = 2**62


class QuotaActor:
    """The shared book (a Ray actor; `quota_actor` creates it): limits and usage of every ingress replica."""

    def __init__(self) -> None:
        self.limits = LimitBook()
        self.usage = UsageBook()

    def admit(self, ticket: str, scopes: list[Any], tokens: int) -> dict[str, Any]:
        return self.limits.admit(str(ticket), [(tuple(map(str, k)), dict(v)) for k, v in scopes], int(tokens))

    def finish(self, ticket: str, tokens: int | None) -> None:
        self.limits.finish(str(ticket), None if tokens is None else int(tokens))

    def cancel(self, ticket: str) -> None:
        self.limits.cancel(str(ticket))

    def flush(self, rows: list[Any], running: list[str]) -> None:
        """An ingress replica's usage since its last flush, and the tickets it still runs."""
        self.usage.merge([(str(t), str(e), {str(k): int(v) for k, v in c.items()}) for t, e, c in rows])
        self.limits.renew([str(t) for t in running])

    def report(self) -> dict[str, Any]:
        return self.usage.report()


def quota_actor(app_name: str | None, resources: dict[str, float] | None = None) -> Any:
    """The app's quota actor (control/state.py `app_actor`; after a restart it starts empty, so the last minute's
    counts are forgotten once; docs/tenancy.md)."""
    from expertserve.serve.control.state import app_actor

    return app_actor(QuotaActor, f"expertserve-quota-{app_name or 'default'}", resources)


class LocalBook:
    """The book in-process (outside Serve), with the actor's calls."""

    def __init__(self) -> None:
        self.actor = QuotaActor()

    async def call(self, method: str, *args: Any) -> Any:
        return getattr(self.actor, method)(*args)

    def get(self, method: str, *args: Any, timeout: float = 30) -> Any:
        return getattr(self.actor, method)(*args)

    def send(self, method: str, *args: Any) -> None:
        getattr(self.actor, method)(*args)


class ActorBook:
    """The shared book in the app's quota actor (looked up again if it is gone for good)."""

    def __init__(self, app_name: str | None, resources: dict[str, float] | None) -> None:
        from expertserve.serve.control.state import StateHandle

        self.handle = StateHandle(lambda: quota_actor(app_name, resources))

    async def call(self, method: str, *args: Any) -> Any:
        return await self.handle.call(method, *args)

    def get(self, method: str, *args: Any, timeout: float = 30) -> Any:
        return self.handle.get(method, *args, timeout=timeout)

    def send(self, method: str, *args: Any) -> None:
        """Submits without waiting (calls from one replica run in order, so its next admission sees this)."""
        try:
            getattr(self.handle.actor, method).remote(*args)
        except Exception as e:  # the actor restarting: it starts empty anyway
            logger.warning("quota: %s not sent: %s: %s", method, type(e).__name__, e)


@dataclass
class Ticket:
    """One admitted request, from admission to its end (exactly once: `end`)."""

    quota: Quota
    id: str
    tenant: str
    expert: str
    limited: bool
    queued: bool
    headers: dict[str, str] = field(default_factory=dict)
    open: bool = True
    priority: int = 0  # the engine's scheduling priority: the fair gate's tag (lower first)

    def end(self, outcome: str, usage: dict[str, int] | None) -> None:
        """The request ended (`ok`, `error` or `abandoned`) with `usage` (None: unknown)."""
        if not self.open:
            return
        self.open = False
        self.quota.ended(self, outcome, usage)


class Quota:
    """Limits, fair queueing and usage of one ingress replica.

    Args:
        metrics: Where the per-tenant series go.
        app_name: The Serve app (None outside Serve: the book is in-process).
        resources: The ingress's custom resources (the actor is placed with them).
        places: (running, waiting) of this replica's fair gate (None: no fair queue).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        app_name: str | None,
        resources: dict[str, float] | None = None,
        places: tuple[int, int] | None = None,
    ) -> None:
        self.metrics = metrics
        self.book: Any = ActorBook(app_name, resources) if app_name else LocalBook()
        self.gate = FairGate(*places) if places else None
        self.usage = UsageBook()
        self.running: dict[str, Ticket] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if app_name:
            self.thread = threading.Thread(target=self._flush_loop, name="quota-flush", daemon=True)
            self.thread.start()

    async def admit(self, tenant_name: str, tenant: Tenant, expert: str, estimate: int) -> Ticket:
        """Admits one request of `tenant` to `expert` (its name, or the base model's id) with `estimate` tokens:
        its limits first (429 over one), then its fair place (waits while the engines are saturated).

        Raises:
            RequestError: 429 with `Retry-After` and the `x-ratelimit-*` headers, naming the limit.
        """
        ticket = Ticket(self, uuid.uuid4().hex, tenant_name, expert, False, False)
        scopes = _scopes(tenant_name, tenant, expert)
        if scopes:
            ticket.limited = True
            try:
                answer = await self.book.call("admit", ticket.id, scopes, estimate)
            except Exception as e:  # the shared book unreachable: a limited tenant is not admitted unmetered
                logger.warning("quota: admission of tenant %s: %s: %s", tenant_name, type(e).__name__, e)
                raise RequestError(
                    503,
                    "the rate-limit book is restarting; retry shortly",
                    retry_after=1,
                    code="quota_unavailable",
                ) from None
            ticket.headers = dict(answer["headers"])
            if not answer["admitted"]:
                self._count(tenant_name, expert, rejected=1, **{f"rejected_{answer['limit']}": 1})
                self.metrics.tenant_requests.labels(tenant_name, expert, "rejected").inc()
                self.metrics.tenant_rejections.labels(tenant_name, expert, answer["limit"]).inc()
                raise RequestError(
                    429,
                    f"rate limit reached for {answer['scope']}: {answer['limit']} "
                    f"(limit {answer['value']}); retry after {answer['retry_after']} s",
                    code="rate_limit_exceeded",
                    retry_after=int(answer["retry_after"]),
                    headers=ticket.headers,
                )
        with self.lock:
            self.running[ticket.id] = ticket
        if self.gate is not None:
            try:
                tag = await self.gate.enter(tenant_name, tenant.weight)
            except GateFull:
                self._refused(ticket)
                raise RequestError(
                    503, "the server is overloaded; retry shortly", retry_after=1, code="overloaded"
                ) from None
            except BaseException:
                ticket.end("abandoned", None)
                raise
            ticket.queued = True
            ticket.priority = min(int(tag * PRIORITY_SCALE), MAX_PRIORITY)
        return ticket

    def _refused(self, ticket: Ticket) -> None:
        """A ticket the full queue refused: out of the book (it counts for no limit) and counted as overloaded."""
        ticket.open = False
        with self.lock:
            self.running.pop(ticket.id, None)
        if ticket.limited:
            self.book.send("cancel", ticket.id)
        self._count(ticket.tenant, ticket.expert, overloaded=1)
        self.metrics.tenant_requests.labels(ticket.tenant, ticket.expert, "overloaded").inc()
        self.metrics.errors.labels("503").inc()

    def ended(self, ticket: Ticket, outcome: str, usage: dict[str, int] | None) -> None:
        """A ticket's end: its place, its concurrency and tokens in the book, its usage."""
        if ticket.queued and self.gate is not None:
            self.gate.leave(ticket.tenant)
        with self.lock:
            self.running.pop(ticket.id, None)
        tokens = usage["prompt_tokens"] + usage["completion_tokens"] if usage else None
        if ticket.limited:
            self.book.send("finish", ticket.id, tokens)
        prompt = usage["prompt_tokens"] if usage else 0
        completion = usage["completion_tokens"] if usage else 0
        self._count(
            ticket.tenant,
            ticket.expert,
            requests=1,
            prompt_tokens=prompt,
            completion_tokens=completion,
            **{outcome: 1},
        )
        self.metrics.tenant_requests.labels(ticket.tenant, ticket.expert, outcome).inc()
        if usage:
            self.metrics.tenant_tokens.labels(ticket.tenant, ticket.expert, "prompt").inc(prompt)
            self.metrics.tenant_tokens.labels(ticket.tenant, ticket.expert, "completion").inc(completion)

    def _count(self, tenant: str, expert: str, **counts: int) -> None:
        with self.lock:
            self.usage.add(tenant, expert, **counts)

    def flush(self) -> None:
        """Sends this replica's usage since the last flush and renews its running tickets."""
        with self.lock:
            rows = self.usage.take()
            running = [t.id for t in self.running.values() if t.limited]
        if rows or running:
            try:
                self.book.get("flush", rows, running, timeout=10)
            except Exception:
                with self.lock:  # kept for the next flush
                    self.usage.merge(rows)
                raise

    async def report(self) -> dict[str, Any]:
        """`GET /admin/usage`: every replica's usage (this one's up to now, the others' up to their last flush)."""
        await asyncio.to_thread(self.flush)
        report: dict[str, Any] = await self.book.call("report")
        return report

    def _flush_loop(self) -> None:
        while not self.stop.wait(FLUSH_S):
            try:
                self.flush()
            except Exception as e:
                logger.warning("quota: flush: %s: %s", type(e).__name__, e)


def _scopes(tenant_name: str, tenant: Tenant, expert: str) -> list[Any]:
    """The limit scopes a request of `tenant` to `expert` counts in (only those with a limit)."""
    scopes: list[Any] = []
    if tenant.limits.is_set():
        scopes.append((("tenant", tenant_name), tenant.limits.model_dump(exclude_none=True)))
    limits = tenant.expert_limits.get(expert)
    if limits is not None and limits.is_set():
        scopes.append((("expert", tenant_name, expert), limits.model_dump(exclude_none=True)))
    return scopes


def estimate(prompt_chars: int, prompts: int, n: int, max_tokens: int | None) -> int:
    """A request's tokens at admission: its prompt text's estimate plus `max_tokens` for every choice."""
    return prompt_chars // CHARS_PER_TOKEN + prompts * n * (max_tokens or DEFAULT_COMPLETION)
