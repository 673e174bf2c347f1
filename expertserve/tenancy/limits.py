"""Rate limits and usage, counted: the book every ingress replica asks before a request goes to an engine. Pure
(no ray, vllm or torch): the server keeps one book in a Ray actor (serve/control/quota.py), so every ingress replica
counts against the same numbers; tests and a server outside Serve keep it in-process.

Windows slide: a request counts for 60 seconds from its admission (a log of admissions per counter, not fixed
minute buckets, so no burst of twice the limit across a minute boundary). Tokens count at admission as the caller's
estimate (prompt estimate + max_tokens x n) and are corrected to the request's real usage when it ends; concurrency
counts tickets from admission to end. A ticket an ingress replica stops renewing (it died mid-request) lapses after
`TICKET_TTL_S`, so a lost replica cannot hold a tenant's concurrency forever.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WINDOW_S = 60.0
TICKET_TTL_S = 30.0  # a running request's ticket lapses when its replica has not renewed it for this long
MAX_TICKETS = 1_000_000
MAX_SCOPES = 100_000


@dataclass
class _Counter:
    """One scope's sliding window (admissions and their tokens) and its running tickets."""

    log: deque[list[Any]] = field(default_factory=deque)  # [admitted_at, tokens, ticket]
    tokens: int = 0
    running: set[str] = field(default_factory=set)

    def expire(self, now: float) -> None:
        while self.log and now - self.log[0][0] >= WINDOW_S:
            self.tokens -= self.log.popleft()[1]

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest admission leaves the window."""
        return max(0.0, WINDOW_S - (now - self.log[0][0])) if self.log else 0.0

    def tokens_free_in(self, now: float, needed: int, limit: int) -> float:
        """Seconds until `needed` more tokens fit under `limit`."""
        excess = self.tokens + needed - limit
        for at, tokens, _ in self.log:
            excess -= tokens
            if excess <= 0:
                return max(0.0, WINDOW_S - (now - at))
        return WINDOW_S


def reset_text(seconds: float) -> str:
    """A reset time as OpenAI writes it in `x-ratelimit-reset-*`: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class LimitBook:
    """The counters of every (tenant) and (tenant, expert) scope that has a limit.

    Args:
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.counters: dict[tuple[str, ...], _Counter] = {}
        self.tickets: dict[
            str, tuple[list[tuple[str, ...]], list[list[Any]], float]
        ] = {}  # id -> scopes, entries, renewed

    def admit(
        self, ticket: str, scopes: list[tuple[tuple[str, ...], dict[str, Any]]], tokens: int
    ) -> dict[str, Any]:
        """Admits one request under every scope's limits, or refuses it naming the first limit it is over.

        Args:
            ticket: The request's id (ends with `finish`).
            scopes: (scope key, limits as a dict) per scope that applies: `("tenant", NAME)` and
                `("expert", NAME, EXPERT)`, with `requests_per_minute`, `tokens_per_minute`, `max_concurrent`.
            tokens: The request's token estimate.

        Returns:
            `{"admitted": bool, "limit": str|None, "scope": str|None, "retry_after": s, "headers": {...}}`;
            `headers` are OpenAI's `x-ratelimit-*` for the scope with the fewest requests (and tokens) left.
        """
        now = self.clock()
        self._lapse(now)
        counters = []
        for key, limits in scopes:
            counter = self.counters.setdefault(key, _Counter())
            counter.expire(now)
            counters.append((key, limits, counter))
        for key, limits, counter in counters:
            refusal = _over(limits, counter, tokens, now)
            if refusal is not None:
                name, retry = refusal
                return {
                    "admitted": False,
                    "limit": name,
                    "value": limits[name],
                    "scope": _scope_text(key),
                    "retry_after": max(1, math.ceil(retry)),
                    "headers": _headers(counters, now, extra=0),
                }
        entries = []
        for _key, _, counter in counters:
            entry = [now, tokens, ticket]
            counter.log.append(entry)
            counter.tokens += tokens
            counter.running.add(ticket)
            entries.append(entry)
        if len(self.tickets) < MAX_TICKETS:
            self.tickets[ticket] = ([k for k, _, _ in counters], entries, now)
        return {
            "admitted": True,
            "limit": None,
            "value": None,
            "scope": None,
            "retry_after": 0,
            "headers": _headers(counters, now),
        }

    def finish(self, ticket: str, tokens: int | None) -> None:
        """The request ended: its concurrency is freed and its tokens become what it used (None: keep the
        estimate, e.g. the usage is unknown)."""
        held = self.tickets.pop(ticket, None)
        if held is None:
            return
        keys, entries, _ = held
        for key, entry in zip(keys, entries, strict=True):
            counter = self.counters.get(key)
            if counter is None:
                continue
            counter.running.discard(ticket)
            if tokens is not None and entry in counter.log:
                counter.tokens += tokens - entry[1]
                entry[1] = tokens

    def cancel(self, ticket: str) -> None:
        """The request was admitted here and then refused elsewhere (the server's queue was full): it counts for
        nothing."""
        held = self.tickets.pop(ticket, None)
        if held is None:
            return
        for key, entry in zip(held[0], held[1], strict=True):
            counter = self.counters.get(key)
            if counter is not None:
                counter.running.discard(ticket)
                if entry in counter.log:
                    counter.log.remove(entry)
                    counter.tokens -= entry[1]

    def renew(self, tickets: list[str]) -> None:
        """The caller still runs these requests."""
        now = self.clock()
        for ticket in tickets:
            held = self.tickets.get(ticket)
            if held is not None:
                self.tickets[ticket] = (held[0], held[1], now)

    def _lapse(self, now: float) -> None:
        stale = [t for t, (_, _, renewed) in self.tickets.items() if now - renewed > TICKET_TTL_S]
        for ticket in stale:
            self.finish(ticket, None)
        if len(self.counters) > MAX_SCOPES:  # idle scopes go (a fresh counter is the same as an idle one)
            for key in [k for k, c in self.counters.items() if not c.running and not c.log]:
                del self.counters[key]


def _over(limits: dict[str, Any], counter: _Counter, tokens: int, now: float) -> tuple[str, float] | None:
    """The first limit `counter` is over with one more request of `tokens`, and when to retry."""
    rpm, tpm, concurrent = (
        limits.get("requests_per_minute"),
        limits.get("tokens_per_minute"),
        limits.get("max_concurrent"),
    )
    if concurrent is not None and len(counter.running) >= concurrent:
        return "max_concurrent", 1.0
    if rpm is not None and len(counter.log) >= rpm:
        return "requests_per_minute", counter.reset_in(now)
    if tpm is not None and counter.tokens + tokens > tpm:
        return "tokens_per_minute", WINDOW_S if tokens > tpm else counter.tokens_free_in(now, tokens, tpm)
    return None


def _scope_text(key: tuple[str, ...]) -> str:
    return f"tenant '{key[1]}'" if key[0] == "tenant" else f"tenant '{key[1]}' on expert '{key[2]}'"


def _headers(
    counters: list[tuple[tuple[str, ...], dict[str, Any], _Counter]], now: float, extra: int = 0
) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers from the scope with the fewest requests left, and the one with the fewest
    tokens left (none for a kind no scope limits)."""
    headers: dict[str, str] = {}
    requests = [
        (limits["requests_per_minute"] - len(c.log), limits["requests_per_minute"], c.reset_in(now))
        for _, limits, c in counters
        if limits.get("requests_per_minute") is not None
    ]
    if requests:
        left, limit, reset = min(requests)
        headers["x-ratelimit-limit-requests"] = str(limit)
        headers["x-ratelimit-remaining-requests"] = str(max(0, left - extra))
        headers["x-ratelimit-reset-requests"] = reset_text(reset)
    tokens = [
        (limits["tokens_per_minute"] - c.tokens, limits["tokens_per_minute"], c.reset_in(now))
        for _, limits, c in counters
        if limits.get("tokens_per_minute") is not None
    ]
    if tokens:
        left, limit, reset = min(tokens)
        headers["x-ratelimit-limit-tokens"] = str(limit)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, left))
        headers["x-ratelimit-reset-tokens"] = reset_text(reset)
    return headers


class UsageBook:
    """Usage per tenant and expert: requests by outcome, tokens, rejections by limit (`GET /admin/usage`)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, int]] = {}

    def add(self, tenant: str, expert: str, **counts: int) -> None:
        row = self.rows.setdefault((tenant, expert), {})
        for name, value in counts.items():
            row[name] = row.get(name, 0) + int(value)

    def merge(self, rows: list[tuple[str, str, dict[str, int]]]) -> None:
        """Adds another book's rows (an ingress replica's since its last flush)."""
        for tenant, expert, counts in rows:
            self.add(tenant, expert, **counts)

    def take(self) -> list[tuple[str, str, dict[str, int]]]:
        """The rows, emptied (what a replica flushes)."""
        rows, self.rows = self.rows, {}
        return [(t, e, c) for (t, e), c in rows.items()]

    def report(self) -> dict[str, Any]:
        """`{"tenants": {NAME: {"experts": {EXPERT: {"requests": N, "prompt_tokens": N, "completion_tokens": N,
        "rejected": N, ...}}}}}`; `requests` counts every request that reached an engine, by outcome beside it."""
        out: dict[str, Any] = {"tenants": {}}
        for (tenant, expert), counts in sorted(self.rows.items()):
            row = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "rejected": 0}
            row.update(counts)
            out["tenants"].setdefault(tenant, {"experts": {}})["experts"][expert] = row
        return out
