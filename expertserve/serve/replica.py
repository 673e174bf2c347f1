"""The engine deployment: one engine per Serve replica, experts loaded per replica on first use.

Serve model multiplexing sends an expert's requests to replicas that already hold it (the multiplexed id is the
expert's `ExpertSpec.key`) and evicts the least recently used. Serve runs its loader under one lock for all keys, so
the loader only registers the expert (`Resident`) and its load runs outside it: one load per key however many
requests wait, loads of different experts at the same time.
The engine class is a keyword argument (`engine_cls=`): vLLM in production, a fake in CPU tests.

Each replica follows the app's engine shape (serve/control/engine_follower.py): when `POST /admin/engines/restart`
raises it, the replicas restart their engines one at a time, so the others keep serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from ray import serve

from expertserve.engine.config import EngineSettings
from expertserve.engine.protocol import ExpertEngine, LoadedExpert
from expertserve.engine.request import Chunk, EngineRequest, ExpertSpec, coalesce
from expertserve.errors import ExpertLoadError
from expertserve.serve.control.engine_follower import ShapeFollower, initial_target
from expertserve.serve.control.engine_slot import EngineSlot, shape_of, shaped
from expertserve.serve.control.identity import app_name, replica_id
from expertserve.serve.control.state import find_state_actor

logger = logging.getLogger("ray.serve")
# Experts a replica keeps loaded; Serve routes an expert's requests to replicas that already hold it.
MAX_EXPERTS_PER_REPLICA = 16


class Resident:
    """An expert held by this replica, as Serve's multiplexing keeps it (Serve calls `__del__` when it evicts).

    Serve's multiplexing loads one model at a time, under one lock for every key; an engine takes an adapter between
    two steps, so a burst of first requests for different experts waited one engine step per expert ahead of it in
    that queue (1,000 experts with Zipf traffic: cold time to first token 2.5x warm at p99). Serve's loader now only
    makes a Resident; its load starts with the first request that needs it (`ready`) and runs beside other experts'
    loads, which the engine takes in the same gap between steps.
    """

    def __init__(
        self, spec: ExpertSpec, load: Callable[[ExpertSpec], Awaitable[LoadedExpert]], evictions: Any = None
    ):
        self.spec = spec
        self.loaded: LoadedExpert | None = None
        self.loaded_at = math.inf
        self._load = load
        self._task: asyncio.Future[LoadedExpert] | None = None
        self._evictions = evictions

    async def ready(self) -> LoadedExpert:
        """The loaded expert, loading it first if no request has (one load however many requests wait for it; a load
        that failed is tried again by the next request, as before).

        Raises:
            ExpertLoadError: The engine could not load it.
        """
        if self.loaded is not None:
            return self.loaded
        if self._task is None or (self._task.done() and (self._task.cancelled() or self._task.exception())):
            self._task = asyncio.ensure_future(self._load(self.spec))
        # Shielded: a client that goes away does not cancel the load the other waiting requests share.
        loaded = await asyncio.shield(self._task)
        if self.loaded is None:
            self.loaded, self.loaded_at = loaded, time.monotonic()
        return self.loaded

    def waited(self, since: float) -> float:
        """How long a request that asked for this expert at `since` waited for its load: the request that started
        the load and every one that joined it waited; one that found it loaded did not (0)."""
        return max(0.0, self.loaded_at - since)

    def __del__(self) -> None:  # Serve calls it on eviction; vLLM's own adapter LRU frees the weights
        # Serve calls it when it evicts, and Python again when it collects the object: count one release.
        if getattr(self, "_released", False) or not hasattr(self, "spec"):
            return
        self._released = True
        if self._task is not None and not self._task.done():
            # Its waiting requests still get it; the engine's own adapter LRU decides what stays loaded.
            logger.info("expert %s released by this replica while loading", self.spec.key)
        else:
            logger.info("expert %s released by this replica (evicted, least recently used)", self.spec.key)
        if self._evictions is not None:
            self._evictions.inc()


class EngineReplica:
    """Ray Serve deployment class (the app builder wraps it with `serve.deployment`): the replica's engine (in an
    `EngineSlot`, which a restart swaps), the experts it holds, and its stream of chunks. The shape it runs is the
    control plane's (control/engine_follower.py)."""

    # Serve awaits an async constructor; the engine starts before the replica takes requests.
    async def __init__(  # type: ignore[misc]
        self, settings: EngineSettings, *, engine_cls: type[ExpertEngine] | None = None
    ) -> None:
        if engine_cls is None:
            from expertserve.engine.vllm_engine import VLLMExpertEngine

            engine_cls = VLLMExpertEngine
        self.replica_id = replica_id()
        app = app_name()
        state = find_state_actor(app) if app else None
        # A replica started after a restart raised the shape (autoscaling, a replaced replica) starts with it.
        version, target = await initial_target(state)
        self.slot = EngineSlot(engine_cls, shaped(settings, shape_of(settings).grown(target)))
        self.interval_s = settings.engine.stream_interval_ms / 1000
        await self.slot.start()
        # The specs of the experts this replica was asked for: Serve's loader gets only the key.
        self._specs: dict[str, ExpertSpec] = {}
        from ray.util.metrics import Counter

        # In Ray's metrics, exported with the vLLM series in the ingress's /metrics (serve/engine_metrics.py).
        self._loads = Counter(
            "expertserve_engine_expert_loads", description="Experts loaded by engine replicas."
        )
        self._evictions = Counter(
            "expertserve_engine_expert_evictions",
            description="Experts released by engine replicas to make room (least recently used).",
        )
        self.follower = ShapeFollower(
            self.slot, state=state, app_name=app, replica=self.replica_id, version=version
        )
        self.follower.start()

    @serve.multiplexed(max_num_models_per_replica=MAX_EXPERTS_PER_REPLICA)
    async def _expert(self, key: str) -> Resident:
        # Registers only: Serve holds its lock for every key while this runs (see Resident).
        return Resident(self._specs[key], self._load, self._evictions)

    async def _held(self, key: str) -> Resident:
        """The expert `key`, loaded on this replica (its load shared with every request waiting for it).

        Raises:
            ExpertLoadError: The engine could not load it.
        """
        resident = await self._expert(key)
        await resident.ready()
        return resident

    async def _load(self, spec: ExpertSpec) -> LoadedExpert:
        if spec.store is not None:
            spec = await asyncio.to_thread(fetch_from_store, spec)
        loaded = await self.slot.engine.load_expert(spec)
        self._loads.inc()
        logger.info("expert %s loaded on this replica in %.3f s", spec.key, loaded.load_seconds)
        return loaded

    async def warm(self, spec: ExpertSpec) -> tuple[str, bool]:
        """Loads the expert here if this replica does not hold it (control/warm.py); returns this replica's id and
        whether it holds the expert now. Serve learns that this replica holds it, and routes its requests here too."""
        self._specs[spec.key] = spec
        await self.slot.wait_ready()
        try:
            await self._held(spec.key)
        except ExpertLoadError as e:
            logger.warning("warming %s: %s", spec.key, e)
            return self.replica_id, False
        return self.replica_id, True

    async def generate(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        """Streams the request's chunks, its expert loaded first (once per replica). The first chunk of a request
        that waited for its expert's load carries how long it waited (`load_seconds`; 0 when the expert was
        loaded already)."""
        async with self.slot.using() as engine:
            async for chunk in self._generate(engine, request):
                yield chunk

    async def _generate(self, engine: ExpertEngine, request: EngineRequest) -> AsyncIterator[Chunk]:
        resident = None
        load_seconds = 0.0
        if request.expert is not None:
            self._specs[request.expert.key] = request.expert
            asked = time.monotonic()
            resident = await self._held(request.expert.key)
            load_seconds = resident.waited(asked)
        source = engine.generate(request, resident.loaded if resident else None)
        try:
            replica = self.replica_id
            async for chunk in coalesced(source, self.interval_s, whole=request.extras.whole):
                yield dataclasses.replace(
                    chunk, load_seconds=chunk.load_seconds + load_seconds, replica=replica
                )
                load_seconds, replica = 0.0, ""
        except asyncio.CancelledError:  # the client went away
            await engine.abort(request.request_id)
            raise

    async def check_health(self) -> None:
        """Serve's health check: the engine must be alive (a replica restarting its engine is healthy)."""
        await self.slot.check_health()

    async def shape(self) -> dict[str, Any]:
        """This replica's id, the shape its engine runs and that shape's version (tests, diagnostics)."""
        return {"replica": self.replica_id, "version": self.follower.version, **self.slot.shape.to_dict()}

    def __del__(self) -> None:
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.leave()


async def coalesced(source: AsyncIterator[Chunk], interval: float, *, whole: bool) -> AsyncIterator[Chunk]:
    """Fewer, larger messages: every generated token used to cross Ray as its own message. The first chunk goes at
    once (time to first token does not grow); after it, what arrives within `interval` seconds goes together; a
    non-streamed request (`whole`) goes as one message at the end."""
    pending: list[Chunk] = []
    sent_first = whole  # a whole answer has no early first chunk
    last = time.monotonic()
    async for chunk in source:
        if not sent_first:
            sent_first, last = True, time.monotonic()
            yield chunk
            continue
        pending.append(chunk)
        if not whole and (chunk.finish_reason is not None or time.monotonic() - last >= interval):
            for joined in coalesce(pending):
                yield joined
            pending, last = [], time.monotonic()
    for joined in coalesce(pending):
        yield joined


def fetch_from_store(spec: ExpertSpec) -> ExpertSpec:
    """The spec with its paths in this node's mirror of the expert's store, the files there. A mirrored expert's
    directory names its package's hash, so files present at the path are the ones the ingress registered; absent
    ones come from a sync of the store.

    Raises:
        ExpertLoadError: The store no longer holds that package (replaced or removed since the ingress's scan), or
            cannot be reached while this node lacks the files.
    """
    from expertserve.packaging import store

    if spec.store is None or spec.mirror is None:
        return spec
    here = str(store.mirror_dir(spec.store))
    local = dataclasses.replace(
        spec,
        adapter_dir=_moved(spec.adapter_dir, spec.mirror, here) if spec.adapter_dir else None,
        soft_prompt_files=tuple(_moved(p, spec.mirror, here) for p in spec.soft_prompt_files),
        mirror=here,
    )
    files = [p for p in (local.adapter_dir, *local.soft_prompt_files) if p]
    if all(Path(p).exists() for p in files):
        return local
    try:
        # The expert's own packages first (a short hold of the node's mirror lock), the whole store only when the
        # package lies elsewhere in it.
        result = store.sync(spec.store, only=spec.name)
        if not all(Path(p).exists() for p in files):
            result = store.sync(spec.store)
    except store.StoreError as e:
        raise ExpertLoadError(spec.name, f"its files are not on this node and {e}") from None
    missing = [p for p in files if not Path(p).exists()]
    if missing:
        problems = "; ".join(result.problems)
        raise ExpertLoadError(
            spec.name,
            f"{spec.store} no longer holds the package this server registered ({missing[0]} is not in this node's "
            f"mirror after a sync{'; ' + problems if problems else ''}): reload the experts",
        )
    logger.info(
        "expert %s fetched from %s into this node's mirror (%d packages installed)",
        spec.key,
        spec.store,
        len(result.installed),
    )
    return local


def _moved(path: str, mirror: str, here: str) -> str:
    """`path` under the ingress node's mirror, as the same path under this node's."""
    return str(Path(here) / Path(path).relative_to(mirror))
