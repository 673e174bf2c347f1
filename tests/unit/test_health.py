"""Engine readiness (serve/health.py) without Ray: the controller read is stubbed."""

from __future__ import annotations

import asyncio
import time

import pytest

from expertserve.serve import health
from expertserve.serve.health import EngineHealth, Readiness


def test_the_first_probe_does_not_queue_behind_the_request_paths_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a probe (tenancy issue, "Also"): with 300 requests arriving at once the first /healthz took over
    3 s: its controller read waited on the default executor, busy with the request path."""
    probe = EngineHealth("app")
    monkeypatch.setattr(
        probe, "_read", lambda: Readiness(True, 2, "ExpertEngine HEALTHY: 2 replica(s) running")
    )

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        busy = [loop.run_in_executor(None, time.sleep, 2) for _ in range(64)]  # every default thread taken
        began = time.monotonic()
        answer = await probe.readiness()
        took = time.monotonic() - began
        assert answer.ready and answer.running == 2
        for task in busy:
            task.cancel()
        return took

    assert asyncio.run(scenario()) < 0.5


def test_a_known_answer_is_returned_at_once_while_a_fresh_one_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = EngineHealth("app")
    answers = iter([Readiness(True, 1, "first"), Readiness(False, 0, "second")])

    def slow_read() -> Readiness:
        time.sleep(0.3)
        return next(answers)

    monkeypatch.setattr(probe, "_read", slow_read)
    monkeypatch.setattr(health, "CACHE_SECONDS", 0.0)

    async def scenario() -> None:
        assert (await probe.readiness()).detail == "first"
        began = time.monotonic()
        assert (await probe.readiness()).detail == "first"  # stale, but at once
        assert time.monotonic() - began < 0.1
        await asyncio.sleep(0.5)
        assert (await probe.readiness()).detail == "second"

    asyncio.run(scenario())
