"""The engine deployment: one engine per Serve replica, experts loaded per replica on first use.

Serve model multiplexing sends an expert's requests to replicas that already hold it (the multiplexed id is the
expert's `ExpertSpec.key`) and evicts the least recently used. Serve runs its loader under one lock for all keys, so
the loader only registers the expert (`Resident`) and its load runs outside it: one load per key however many
requests wait, loads of different experts at the same time.
The engine class is a keyword argument (`engine_cls=`): vLLM in production, a fake in CPU tests.

Each replica follows the app's engine shape (serve/engine_shape.py, held by the expert-state actor): when
`POST /admin/engines/restart` raises it, the replicas restart their engines one at a time (a claim in the actor), so
the others keep serving; a replica starting later starts with the raised shape.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from expertserve.serve.engine_shape import EngineShape
from expertserve.serve.expert_state import find_state_actor

logger = logging.getLogger("ray.serve")
# Experts a replica keeps loaded; Serve routes an expert's requests to replicas that already hold it.
MAX_EXPERTS_PER_REPLICA = 16
SHAPE_POLL_S = 1.0  # how often a replica reads the target engine shape
RESTART_BACKOFF_S = 30.0  # after an engine that would not start, before trying again


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
    """Ray Serve deployment class (the app builder wraps it with `serve.deployment`)."""

    # Serve awaits an async constructor; the engine starts before the replica takes requests.
    async def __init__(  # type: ignore[misc]
        self, settings: EngineSettings, *, engine_cls: type[ExpertEngine] | None = None
    ) -> None:
        if engine_cls is None:
            from expertserve.engine.vllm_engine import VLLMExpertEngine

            engine_cls = VLLMExpertEngine
        self.engine_cls = engine_cls
        self.replica_id = replica_id()
        self.app_name = app_name()
        self.state = find_state_actor(self.app_name) if self.app_name else None
        # A replica started after a restart raised the shape (autoscaling, a replaced replica) starts with it.
        self.shape_version, target = (0, None)
        if self.state is not None:
            self.shape_version, shape = await self.state.target_shape.remote()
            target = EngineShape.from_dict(shape)
        self.settings = _shaped(settings, _shape(settings).grown(target))
        self.engine = engine_cls(self.settings)
        self.interval_s = settings.engine.stream_interval_ms / 1000
        self._busy: dict[int, int] = {}  # id(engine) -> requests running on it
        self._ready = asyncio.Event()  # cleared while a drain-then-start restart has no engine
        self._ready.set()
        await self.engine.start()
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
        # Two tasks: the heartbeat goes on while the follower restarts the engine (draining can take minutes).
        self._target: tuple[int, dict[str, Any] | None] = (self.shape_version, None)
        self._target_seen = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat()), loop.create_task(self._follow_shape())]

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
        loaded = await self.engine.load_expert(spec)
        self._loads.inc()
        logger.info("expert %s loaded on this replica in %.3f s", spec.key, loaded.load_seconds)
        return loaded

    async def warm(self, spec: ExpertSpec) -> tuple[str, bool]:
        """Loads the expert here if this replica does not hold it (serve/warm.py); returns this replica's id and
        whether it holds the expert now. Serve learns that this replica holds it, and routes its requests here too."""
        self._specs[spec.key] = spec
        await self._ready.wait()
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
        await self._ready.wait()
        engine = self.engine  # a restart may replace self.engine while this request runs on this one
        self._busy[id(engine)] = self._busy.get(id(engine), 0) + 1
        try:
            async for chunk in self._generate(engine, request):
                yield chunk
        finally:
            self._busy[id(engine)] -= 1

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
            async for chunk in self._coalesced(source, whole=request.extras.whole):
                yield dataclasses.replace(
                    chunk, load_seconds=chunk.load_seconds + load_seconds, replica=replica
                )
                load_seconds, replica = 0.0, ""
        except asyncio.CancelledError:  # the client went away
            await engine.abort(request.request_id)
            raise

    async def _coalesced(self, source: AsyncIterator[Chunk], *, whole: bool) -> AsyncIterator[Chunk]:
        """Fewer, larger messages: every generated token used to cross Ray as its own message. The first chunk goes
        at once (time to first token does not grow); after it, what arrives within `stream_interval_ms` goes
        together; a non-streamed request (`whole`) goes as one message at the end."""
        interval = self.interval_s
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

    async def check_health(self) -> None:
        """Serve's health check: the engine must be alive (a replica restarting its engine is healthy)."""
        if self._ready.is_set():
            await self.engine.check_health()

    # ---- engine shape ----------------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Tells the state actor which shape version this replica's engine runs, and reads the target."""
        while True:
            await asyncio.sleep(SHAPE_POLL_S)
            try:
                if self.state is None:
                    self.state = await asyncio.to_thread(find_state_actor, self.app_name)
                    if self.state is None:
                        continue
                self._target = await self.state.engine_ack.remote(self.replica_id, self.shape_version)
                self._target_seen.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the actor restarting: try again next tick
                logger.warning("engine shape: %s: %s", type(e).__name__, e)

    async def _follow_shape(self) -> None:
        """Restarts the engine when the target grows past the shape it runs, after claiming the restart (one
        replica at a time)."""
        while True:
            await self._target_seen.wait()
            self._target_seen.clear()
            version, shape = self._target
            target = EngineShape.from_dict(shape)
            if version <= self.shape_version or target is None or self.state is None:
                continue
            if _shape(self.settings).covers(target):
                self.shape_version = version
                continue
            try:
                if not await self.state.claim_restart.remote(self.replica_id):
                    continue  # another replica is restarting: this one serves meanwhile, and asks again
                try:
                    await self._restart(_shape(self.settings).grown(target))
                    self.shape_version = version
                    await self.state.engine_ack.remote(self.replica_id, version)
                finally:
                    await self.state.release_restart.remote(self.replica_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # an engine that would not start: this replica keeps its shape for now
                logger.error("engine restart for %s failed: %s: %s", target, type(e).__name__, e)
                await asyncio.sleep(RESTART_BACKOFF_S)

    async def _restart(self, shape: EngineShape) -> None:
        """Replaces the engine with one of `shape`; no request is dropped: requests running on the old engine
        finish there, new ones go to the new engine (or wait for it, when the old one must stop first)."""
        settings = _shaped(self.settings, shape)
        overlap = self.settings.engine.restart_overlap
        if overlap is None:
            import ray

            overlap = not ray.get_gpu_ids()
        logger.info("engine restart for %s (%s)", shape, "overlapping" if overlap else "drain, then start")
        started = time.monotonic()
        old = self.engine
        if overlap:
            new = self.engine_cls(settings)
            await new.start()
            self.engine, self.settings = new, settings
            await self._drained(old)
            await old.shutdown()
        else:
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
        logger.info("engine restarted for %s in %.1f s", shape, time.monotonic() - started)

    async def _drained(self, engine: ExpertEngine) -> None:
        """Returns once no request runs on `engine` (each ends: they are bounded by their max_tokens)."""
        while self._busy.get(id(engine), 0) > 0:
            await asyncio.sleep(0.1)
        self._busy.pop(id(engine), None)

    async def shape(self) -> dict[str, Any]:
        """This replica's id, the shape its engine runs and that shape's version (tests, diagnostics)."""
        return {
            "replica": self.replica_id,
            "version": self.shape_version,
            **_shape(self.settings).to_dict(),
        }

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is not None:
            # Ray going down with the replica may refuse the call: the actor forgets it after LIVE_S anyway.
            with contextlib.suppress(Exception):
                state.engine_leave.remote(self.replica_id)


def _shape(settings: EngineSettings) -> EngineShape:
    return EngineShape(settings.max_lora_rank, settings.prefix_caching)


def _shaped(settings: EngineSettings, shape: EngineShape) -> EngineSettings:
    return settings.model_copy(
        update={"max_lora_rank": shape.max_lora_rank, "prefix_caching": shape.prefix_caching}
    )


def app_name() -> str | None:
    """The Serve application this replica belongs to (None outside Serve: unit tests build the classes directly)."""
    try:
        return serve.get_replica_context().app_name
    except Exception:  # outside a Serve replica
        return None


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


def replica_id() -> str:
    """This Serve replica's id (an engine replica's is `x-expertserve-replica`), or the process id outside one."""
    import os

    try:
        replica = serve.get_replica_context().replica_id
        return str(getattr(replica, "unique_id", replica))
    except Exception:
        return f"pid-{os.getpid()}"
