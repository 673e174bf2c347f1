"""An engine replica's side of the engine shape: two asyncio tasks in each engine replica.

The heartbeat tells the state actor (control/state.py) which shape version this replica's engine runs and reads the
target; the follower restarts the engine (control/engine_slot.py) when the target grows past what it runs, after
claiming the restart in the actor, so one replica restarts at a time and the others keep serving. A replica started
after a restart raised the shape starts with it (`initial_target`). `POST /admin/engines/restart` (serve/admin.py)
sets the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from expertserve.serve.control.engine_slot import EngineSlot
from expertserve.serve.control.shape import EngineShape
from expertserve.serve.control.state import checked_shape, find_state_actor

logger = logging.getLogger("ray.serve")

SHAPE_POLL_S = 1.0  # how often a replica reads the target engine shape
RESTART_BACKOFF_S = 30.0  # after an engine that would not start, before trying again


async def initial_target(state: Any) -> tuple[int, EngineShape | None]:
    """(version, shape) a replica starting now must run; (0, None) outside Serve or before any restart."""
    if state is None:
        return 0, None
    try:
        version, shape = await state.target_shape.remote()
        return version, EngineShape.from_dict(checked_shape(shape) if shape is not None else None)
    except Exception as e:  # an unreachable actor or a malformed shape must not keep every new replica down
        logger.error(
            "engine shape: ignoring the target (%s: %s); starting with the configured shape",
            type(e).__name__,
            e,
        )
        return 0, None


def _actor_gone(error: Exception) -> bool:
    import ray

    return isinstance(error, ray.exceptions.RayActorError)


class ShapeFollower:
    """Follows the app's target engine shape for one engine replica."""

    def __init__(
        self, slot: EngineSlot, *, state: Any, app_name: str | None, replica: str, version: int
    ) -> None:
        self.slot = slot
        self.state = state
        self.app_name = app_name
        self.replica = replica
        self.version = version  # the shape version the slot's engine runs
        self._target: tuple[int, dict[str, Any] | None] = (version, None)
        self._target_seen = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Starts both tasks on the running loop: the heartbeat goes on while the follower restarts the engine
        (draining can take minutes)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat()), loop.create_task(self._follow())]

    def leave(self) -> None:
        """Tells the actor this replica is going (Ray going down with it may refuse: the actor forgets it after
        LIVE_S anyway)."""
        if self.state is not None:
            with contextlib.suppress(Exception):
                self.state.engine_leave.remote(self.replica)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(SHAPE_POLL_S)
            try:
                if self.state is None:
                    self.state = await asyncio.to_thread(find_state_actor, self.app_name)
                    if self.state is None:
                        continue
                self._target = await self.state.engine_ack.remote(self.replica, self.version)
                self._target_seen.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the actor restarting, or gone for good: look it up again next tick
                logger.warning("engine shape: %s: %s", type(e).__name__, e)
                if _actor_gone(e):
                    self.state = None

    async def _follow(self) -> None:
        while True:
            await self._target_seen.wait()
            self._target_seen.clear()
            version, shape = self._target
            target = EngineShape.from_dict(shape)
            if version <= self.version or target is None or self.state is None:
                continue
            if self.slot.shape.covers(target):
                self.version = version
                continue
            try:
                await self._restart_claimed(version, target)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # an engine that would not start: this replica keeps its shape, and the
                # target goes back for every replica (a shape that cannot start is not retried forever)
                logger.error("engine restart for %s failed: %s: %s", target, type(e).__name__, e)
                with contextlib.suppress(Exception):
                    await self.state.shape_failed.remote(self.replica, version, f"{type(e).__name__}: {e}")
                await asyncio.sleep(RESTART_BACKOFF_S)

    async def _restart_claimed(self, version: int, target: EngineShape) -> None:
        """Restarts the engine for `target` once this replica holds the restart claim (one replica at a time)."""
        if not await self.state.claim_restart.remote(self.replica):
            return  # another replica is restarting: this one serves meanwhile, and asks again
        try:
            await self.slot.restart(self.slot.shape.grown(target))
            self.version = version
            await self.state.engine_ack.remote(self.replica, version)
        finally:
            await self.state.release_restart.remote(self.replica)
