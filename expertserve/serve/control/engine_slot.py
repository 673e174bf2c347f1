"""The engine an engine replica runs now, and its replacement by a restart without dropping a request.

Runs inside each engine replica (serve/replica.py); the restart is driven by that replica's shape follower
(control/engine_follower.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from expertserve.engine.config import EngineSettings
from expertserve.engine.protocol import ExpertEngine
from expertserve.errors import EngineRestarting
from expertserve.serve.control.shape import EngineShape

logger = logging.getLogger("ray.serve")


def shape_of(settings: EngineSettings) -> EngineShape:
    """The shape an engine started with `settings` runs."""
    return EngineShape(settings.max_lora_rank, settings.prefix_caching)


def shaped(settings: EngineSettings, shape: EngineShape) -> EngineSettings:
    """`settings` with `shape`'s LoRA rank and prefix caching."""
    return settings.model_copy(
        update={"max_lora_rank": shape.max_lora_rank, "prefix_caching": shape.prefix_caching}
    )


class EngineSlot:
    """Holds the replica's engine. Requests run on the engine that was current when they started (`using`); a
    restart puts a new engine in the slot and stops the old one once its requests ended."""

    def __init__(self, engine_cls: type[ExpertEngine], settings: EngineSettings) -> None:
        self.engine_cls = engine_cls
        self.settings = settings
        self.engine = engine_cls(settings)
        self._busy: dict[int, int] = {}  # id(engine) -> requests running on it
        self._ready = asyncio.Event()  # cleared while a drain-then-start restart has no engine
        self._ready.set()

    async def start(self) -> None:
        """Starts the first engine."""
        await self.engine.start()

    @property
    def shape(self) -> EngineShape:
        """The shape the current engine runs."""
        return shape_of(self.settings)

    @property
    def ready(self) -> bool:
        """Whether an engine is in the slot (false only during a drain-then-start restart)."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Returns once an engine is in the slot."""
        await self._ready.wait()

    @contextlib.asynccontextmanager
    async def using(self) -> AsyncIterator[ExpertEngine]:
        """The current engine, counted busy until the block ends (a restart may replace `self.engine` meanwhile:
        this request finishes on the engine it started on).

        Raises:
            EngineRestarting: A drain-then-start restart has no engine in the slot: the request is refused at once
                (the ingress sends it to another replica, or here again later) rather than held until this
                replica's longest stream ended and the new engine started.
        """
        if not self._ready.is_set():
            raise EngineRestarting("this replica's engine is restarting for a new shape")
        engine = self.engine
        self._busy[id(engine)] = self._busy.get(id(engine), 0) + 1
        try:
            yield engine
        finally:
            self._busy[id(engine)] -= 1

    async def check_health(self) -> None:
        """The engine must be alive (a slot restarting its engine is healthy)."""
        if self._ready.is_set():
            await self.engine.check_health()

    async def restart(self, shape: EngineShape) -> None:
        """Replaces the engine with one of `shape`; no request is dropped: requests running on the old engine
        finish there, new ones go to the new engine (or wait for it, when the old one must stop first)."""
        settings = shaped(self.settings, shape)
        overlap = self.settings.engine.restart_overlap
        if overlap is None:
            import ray

            overlap = not ray.get_gpu_ids()
        logger.info("engine restart for %s (%s)", shape, "overlapping" if overlap else "drain, then start")
        started = time.monotonic()
        if overlap:
            await self._overlapping(settings)
        else:
            await self._drain_then_start(settings)
        logger.info("engine restarted for %s in %.1f s", shape, time.monotonic() - started)

    async def _overlapping(self, settings: EngineSettings) -> None:
        old = self.engine
        new = self.engine_cls(settings)
        await new.start()
        self.engine, self.settings = new, settings
        await self._drained(old)
        await old.shutdown()

    async def _drain_then_start(self, settings: EngineSettings) -> None:
        old = self.engine
        self._ready.clear()
        try:
            await self._drained(old)
            await old.shutdown()
            new = self.engine_cls(settings)
            try:
                await new.start()
            except Exception:
                # Back to the shape it had: this replica keeps serving what it served.
                self.engine = self.engine_cls(self.settings)
                await self.engine.start()
                raise
            self.engine, self.settings = new, settings
        finally:
            self._ready.set()

    async def _drained(self, engine: ExpertEngine) -> None:
        """Returns once no request runs on `engine` (each ends: they are bounded by their max_tokens)."""
        while self._busy.get(id(engine), 0) > 0:
            await asyncio.sleep(0.1)
        self._busy.pop(id(engine), None)
