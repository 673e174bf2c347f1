"""Expert loads on an engine replica: one per expert however many requests wait, different experts at once (Serve's
own loader runs one at a time), a failed load tried again by the next request."""

from __future__ import annotations

import asyncio

import pytest

from expertserve.engine.protocol import LoadedExpert
from expertserve.engine.request import ExpertSpec
from expertserve.errors import ExpertLoadError
from expertserve.serve.replica import Resident


class Loads:
    """A loader that holds each load until the test releases it, and records what ran at the same time."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()
        self.fail: set[str] = set()

    async def __call__(self, spec: ExpertSpec) -> LoadedExpert:
        self.started.append(spec.key)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        if spec.name in self.fail:
            raise ExpertLoadError(spec.name, "broken adapter")
        return LoadedExpert(spec, load_seconds=0.0, soft_prompt_tokens=0)


def spec(name: str) -> ExpertSpec:
    return ExpertSpec(name, "1.0.0", f"content-{name}", f"/experts/{name}/adapter")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_different_experts_load_at_the_same_time_and_one_load_serves_every_waiting_request() -> None:
    async def scenario() -> None:
        loads = Loads()
        a, b = Resident(spec("a"), loads), Resident(spec("b"), loads)
        waiting = [asyncio.ensure_future(r.ready()) for r in (a, a, b, a, b)]
        await settle()
        assert loads.most_running == 2  # a and b together
        assert sorted(loads.started) == sorted([spec("a").key, spec("b").key])  # once each
        assert a.loaded is None and b.loaded is None
        loads.release.set()
        done = await asyncio.gather(*waiting)
        assert [d.spec.name for d in done] == ["a", "a", "b", "a", "b"]
        assert done[0] is done[1] is done[3]
        # A request that joined the load waited for it; a later one finds it loaded: no new load, no wait.
        assert a.waited(a.loaded_at - 0.5) == pytest.approx(0.5)
        await a.ready()
        assert len(loads.started) == 2
        assert a.waited(a.loaded_at + 1.0) == 0.0

    asyncio.run(scenario())


def test_a_failed_load_fails_its_waiting_requests_and_the_next_request_tries_again() -> None:
    async def scenario() -> None:
        loads = Loads()
        loads.fail.add("a")
        a = Resident(spec("a"), loads)
        waiting = [asyncio.ensure_future(a.ready()) for _ in range(3)]
        await settle()
        loads.release.set()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, ExpertLoadError) for r in results)
        assert len(loads.started) == 1
        loads.fail.clear()
        loaded = await a.ready()
        assert loaded.spec.name == "a"
        assert len(loads.started) == 2

    asyncio.run(scenario())


def test_a_request_that_goes_away_does_not_cancel_the_load_others_wait_for() -> None:
    async def scenario() -> None:
        loads = Loads()
        a = Resident(spec("a"), loads)
        leaving = asyncio.ensure_future(a.ready())
        staying = asyncio.ensure_future(a.ready())
        await settle()
        leaving.cancel()
        await settle()
        loads.release.set()
        assert (await staying).spec.name == "a"
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert len(loads.started) == 1

    asyncio.run(scenario())


def test_an_expert_released_while_loading_still_reaches_its_waiting_requests() -> None:
    async def scenario() -> None:
        loads = Loads()
        a = Resident(spec("a"), loads)
        waiting = asyncio.ensure_future(a.ready())
        await settle()
        a.__del__()  # Serve evicts it (least recently used) while it loads
        loads.release.set()
        assert (await waiting).spec.name == "a"

    asyncio.run(scenario())
