"""Weighted-fair admission to the engines (start-time fair queueing by tenant). Pure (asyncio only).

While fewer than `capacity` requests run, a request goes through at once. Beyond that it waits in its tenant's
queue, and each freed place goes to the waiting request with the smallest virtual finish time: a tenant's requests
advance its virtual time by 1/weight each, so under contention tenants get places in proportion to their weights
whatever they send, and a tenant that floods only queues behind itself. Work-conserving: a lone tenant may use every
place.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(order=True)
class _Waiter:
    finish: float
    order: int
    tenant: str = field(compare=False)
    start: float = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairGate:
    """Admission by weighted fair queueing among tenants.

    Args:
        capacity: Requests that may run at once through this gate (the engines' batch, per ingress replica).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.running = 0
        self.virtual = 0.0  # the start tag of the last request admitted from the queue
        self.last_finish: dict[str, float] = {}
        self.queue: list[_Waiter] = []
        self.order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self.queue if not w.future.done())

    async def enter(self, tenant: str, weight: float) -> None:
        """Waits for this request's place (at once while the engines have room)."""
        start = max(self.virtual, self.last_finish.get(tenant, 0.0))
        finish = start + 1.0 / weight
        self.last_finish[tenant] = finish
        if self.running < self.capacity and not self.waiting:
            self.running += 1
            return
        waiter = _Waiter(finish, next(self.order), tenant, start, asyncio.get_running_loop().create_future())
        heapq.heappush(self.queue, waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.leave()  # given a place just as the client went away: pass it on
            raise

    def leave(self) -> None:
        """A request that entered ended; its place goes to the next waiter in fair order."""
        self.running -= 1
        while self.queue and self.running < self.capacity:
            waiter = heapq.heappop(self.queue)
            if waiter.future.done():  # its client went away while it waited
                continue
            self.virtual = max(self.virtual, waiter.start)
            self.running += 1
            waiter.future.set_result(None)
        if not self.queue and self.running == 0:
            self.last_finish.clear()  # idle: no tenant carries credit or debt into the next busy period
            self.virtual = 0.0
