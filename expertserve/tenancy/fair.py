"""Weighted-fair admission to the engines by tenant. Pure (asyncio only).

A gate of `capacity` places (requests running at once). Two rules:

- **Shares.** While several tenants are active (running or waiting), each may hold at most its weighted share of
  the places, `capacity x weight / sum of the active tenants' weights`; a lone tenant may hold them all. A tenant
  that floods therefore cannot fill the engines' batch while another tenant is sending: the other's requests find
  a place at once, in a batch that is not full of the flood (on CPU a step's time grows with the batch, so this is
  what keeps the light tenant's first token fast; docs/tenancy.md has the figures).
- **Order.** Beyond its share or the capacity a request waits; each freed place goes to the waiting request with the
  smallest virtual finish time (start-time fair queueing) among tenants under their share: a tenant's requests
  advance its virtual time by 1/weight, so tenants are served in proportion to their weights whatever they send.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


class GateFull(Exception):
    """Every place is taken and the queue is full: the request is refused (the server answers 503)."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests wait already")
        self.waiting = waiting


@dataclass(order=True)
class _Waiter:
    finish: float
    order: int
    tenant: str = field(compare=False)
    start: float = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairGate:
    """Admission by weighted fair shares and fair queueing among tenants.

    Args:
        capacity: Requests that may run at once through this gate (the engines' batch, per ingress replica).
        max_waiting: Requests that may wait beyond them (None: no bound); one more is refused (`GateFull`).
    """

    def __init__(self, capacity: int, max_waiting: int | None = None) -> None:
        self.capacity = max(1, capacity)
        self.max_waiting = max_waiting
        self.waiting = 0
        self.running = 0
        self.running_by: dict[str, int] = {}
        self.waiting_by: dict[str, int] = {}
        self.weights: dict[str, float] = {}
        self.virtual = 0.0  # the start tag of the last request admitted from the queue
        self.last_finish: dict[str, float] = {}
        self.queue: list[_Waiter] = []
        self.order = itertools.count()

    def share(self, tenant: str) -> float:
        """The places `tenant` may hold now: all of them alone, its weighted part among the active tenants."""
        active = {t for t, n in self.running_by.items() if n} | {t for t, n in self.waiting_by.items() if n}
        active.add(tenant)
        total = sum(self.weights.get(t, 1.0) for t in active)
        return max(1.0, self.capacity * self.weights.get(tenant, 1.0) / total)

    def _may_run(self, tenant: str) -> bool:
        return self.running < self.capacity and self.running_by.get(tenant, 0) < self.share(tenant)

    async def enter(self, tenant: str, weight: float) -> float:
        """Waits for this request's place (at once while the engines have room and the tenant is within its
        share); returns its virtual finish tag (lower: its turn comes sooner), which the engine schedules by too."""
        self.weights[tenant] = weight
        start = max(self.virtual, self.last_finish.get(tenant, 0.0))
        finish = start + 1.0 / weight
        self.last_finish[tenant] = finish
        if not self.waiting_by.get(tenant) and self._may_run(tenant):
            self._take(tenant)
            return finish
        if self.max_waiting is not None and self.waiting >= self.max_waiting:
            self.last_finish[tenant] = finish - 1.0 / weight  # refused: it took nothing
            raise GateFull(self.waiting)
        waiter = _Waiter(finish, next(self.order), tenant, start, asyncio.get_running_loop().create_future())
        heapq.heappush(self.queue, waiter)
        self.waiting_by[tenant] = self.waiting_by.get(tenant, 0) + 1
        self.waiting += 1
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.leave(tenant)  # given a place just as the client went away: pass it on
            else:
                self.waiting_by[tenant] -= 1
                self.waiting -= 1
                self._dispatch()  # its leaving may lower the others' shares' sum: someone may go now
            raise
        return finish

    def leave(self, tenant: str) -> None:
        """A request of `tenant` that entered ended; its place goes to the next waiter in fair order."""
        self.running -= 1
        self.running_by[tenant] = self.running_by.get(tenant, 1) - 1
        self._dispatch()
        if not self.queue and self.running == 0:
            # Idle: no tenant carries credit or debt into the next busy period.
            self.last_finish.clear()
            self.running_by.clear()
            self.waiting_by.clear()
            self.virtual = 0.0

    def _take(self, tenant: str) -> None:
        self.running += 1
        self.running_by[tenant] = self.running_by.get(tenant, 0) + 1

    def _dispatch(self) -> None:
        """Places go to the waiters with the smallest finish times among tenants under their share."""
        skipped: list[_Waiter] = []
        while self.queue and self.running < self.capacity:
            waiter = heapq.heappop(self.queue)
            if waiter.future.done():  # its client went away while it waited (counted off already)
                continue
            if not self._may_run(waiter.tenant):
                skipped.append(waiter)
                continue
            self.waiting_by[waiter.tenant] -= 1
            self.waiting -= 1
            self.virtual = max(self.virtual, waiter.start)
            self._take(waiter.tenant)
            waiter.future.set_result(None)
        for waiter in skipped:
            heapq.heappush(self.queue, waiter)
