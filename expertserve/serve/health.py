"""Readiness of the engine deployment, read from Serve's controller.

Asking an engine replica (a call through its handle) queues behind inference: under 300 concurrent requests such
a probe did not answer within 3 s, and a readiness probe would pull the pod exactly when it is busy. Serve's
controller already health-checks every replica (`EngineReplica.check_health`, outside the request queue) and
knows how many run; that answer is cached for a second so probes cost nothing. The read runs on a thread of its
own: on the default executor it queued behind the request path's threads (the first probe under 300 concurrent
requests took over 3 s), and once a value is known a probe never waits for a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger("ray.serve")
ENGINE_DEPLOYMENT = "ExpertEngine"
CACHE_SECONDS = 1.0
TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Readiness:
    """Whether an engine replica can take work, and what Serve says about the engine deployment."""

    ready: bool
    running: int
    detail: str


class EngineHealth:
    """Cached readiness of one app's engine deployment."""

    def __init__(self, app_name: str | None, deployment: str = ENGINE_DEPLOYMENT):
        self.app_name, self.deployment = app_name, deployment
        self._last: Readiness | None = None
        self._at = 0.0
        self._reading: asyncio.Future[Readiness] | None = None  # one controller call at a time
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="engine-readiness")

    async def readiness(self) -> Readiness:
        """At most a second old once known (an older answer is returned at once while a fresh one is read); the
        first read never waits more than `TIMEOUT_SECONDS`."""
        if self._last is not None and time.monotonic() - self._at < CACHE_SECONDS:
            return self._last
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._refresh())
        if self._last is not None:
            return self._last
        return await asyncio.shield(self._reading)

    async def _refresh(self) -> Readiness:
        loop = asyncio.get_running_loop()
        try:
            fresh = await asyncio.wait_for(loop.run_in_executor(self._thread, self._read), TIMEOUT_SECONDS)
        except Exception as e:  # the controller is busy or restarting: say so, do not hang
            fresh = Readiness(False, 0, f"cannot read Serve's status: {type(e).__name__}")
        if self._last is None or fresh.ready != self._last.ready:  # transitions only, not every probe
            logger.log(
                logging.INFO if fresh.ready else logging.WARNING,
                "engine readiness: %s (%s)",
                "ready" if fresh.ready else "NOT ready",
                fresh.detail,
            )
        self._last, self._at = fresh, time.monotonic()
        return fresh

    def _read(self) -> Readiness:
        from ray import serve

        status = serve.status()
        app = status.applications.get(self.app_name or "") if self.app_name else None
        if app is None:
            app = next((a for a in status.applications.values() if self.deployment in a.deployments), None)
        if app is None or self.deployment not in app.deployments:
            return Readiness(False, 0, f"no {self.deployment} deployment")
        overview = app.deployments[self.deployment]
        running = int(overview.replica_states.get("RUNNING", 0))
        state = getattr(overview.status, "value", overview.status)
        detail = f"{self.deployment} {state}: {running} replica(s) running"
        if overview.message:
            detail += f" ({overview.message[:200]})"
        return Readiness(running > 0, running, detail)
