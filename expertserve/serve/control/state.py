"""One source of truth for the expert state of an app's ingress replicas: a small Ray actor holding the registry
generation and which generation each ingress replica serves.

A reload on any replica raises the generation here; every replica polls it (every `POLL_S`), rescans its expert
roots when it moved, and acknowledges. `/admin/experts/reload` answers with the new generation once every live
ingress replica serves it (live: acknowledged within `LIVE_S`), so after its answer every replica lists the same
experts. The expert files themselves are the snapshot: replicas read the same roots (shared storage on a cluster).

The actor restarts when its process dies (`max_restarts=-1`) and is created again when it was killed for good
(`StateHandle` looks it up again); either way it starts empty and recovers from what the replicas report: the
generation and shape version only rise to what a replica acknowledges. Every input is checked (replica ids, numbers,
shapes): only members of the Ray cluster can call it (Ray token auth), but a malformed call must not break the
replicas that read what it stored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from expertserve.engine.args import LORA_RANKS

logger = logging.getLogger("ray.serve")

POLL_S = 0.5  # how often a replica reads the generation
LIVE_S = 5.0  # a replica that has not acknowledged for this long is gone (scaled down or dead)
# An engine replica restarting its engine for a new shape blocks its event loop while vLLM starts (no
# acknowledgements then, 20-60 s on CPU): its claim holds while it was heard from within this long, then lapses (a
# replica that died mid-restart must not hold the others up).
CLAIM_S = 180.0
MAX_REPLICAS = 1024  # replica records kept (stale ones are dropped first)
MAX_ID = 256  # characters in a replica id
MAX_COUNTER = 2**53  # generations and shape versions


def _replica(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID or not value.isprintable():
        raise ValueError(f"a replica id is printable text of 1-{MAX_ID} characters")
    return value


def _counter(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"a generation or shape version is an integer from 0 to {MAX_COUNTER}")
    return value


def checked_shape(shape: Any) -> dict[str, Any]:
    """An engine shape as the actor stores it.

    Raises:
        ValueError: Not `{"max_lora_rank": <a rank slot>, "prefix_caching": <bool>}`.
    """
    if (
        not isinstance(shape, dict)
        or set(shape) != {"max_lora_rank", "prefix_caching"}
        or shape["max_lora_rank"] not in LORA_RANKS
        or not isinstance(shape["max_lora_rank"], int)
        or not isinstance(shape["prefix_caching"], bool)
    ):
        raise ValueError(f"an engine shape is {{max_lora_rank: one of {LORA_RANKS}, prefix_caching: bool}}")
    return {"max_lora_rank": shape["max_lora_rank"], "prefix_caching": shape["prefix_caching"]}


class ExpertState:
    """The Ray actor (created with `state_actor`)."""

    def __init__(self) -> None:
        self.generation = 0
        self.seen: dict[str, tuple[int, float]] = {}  # replica id -> (generation it serves, when it said so)
        # The engine shape (serve/control/shape.py): the target, its version, the shape every engine runs.
        self.shape: dict[str, Any] | None = None
        self.shape_version = 0
        self.applied: dict[str, Any] | None = None
        self.engines: dict[str, tuple[int, float]] = {}  # engine replica -> (shape version it runs, when)
        self.restarting: tuple[str, float] | None = None  # the engine replica restarting now, since when
        self.failed: dict[str, Any] | None = None  # the last shape engines could not start with, and why
        self.config: str | None = None  # digest of the server config whose replicas use this actor

    def adopt(self, config: str) -> bool:
        """An ingress replica of a server config joins; a different config than before (a redeploy) drops the
        engine shape a restart raised for the old one (new engines start from the new config). True if dropped."""
        if not isinstance(config, str) or len(config) > MAX_ID:
            raise ValueError("a config digest is text")
        changed = self.config is not None and config != self.config
        self.config = config
        if changed and self.shape is not None:
            self.shape, self.applied, self.failed = None, None, None
            self.shape_version += 1
        return changed

    def bump(self, at_least: int = 0) -> int:
        """A new generation (a reload was asked for), above `at_least` (what the asking replica serves: a replaced
        actor starts from 0)."""
        self.generation = max(self.generation, _counter(at_least)) + 1
        return self.generation

    def current(self) -> int:
        """The generation every replica must serve."""
        return self.generation

    def ack(self, replica: str, generation: int) -> int:
        """`replica` serves `generation`; returns the current one (never below what a replica serves)."""
        self.seen[_replica(replica)] = (_counter(generation), time.monotonic())
        self.generation = max(self.generation, generation)
        _prune(self.seen)
        return self.generation

    def leave(self, replica: str) -> None:
        """`replica` is shutting down."""
        self.seen.pop(_replica(replica), None)

    def lagging(self, generation: int) -> list[str]:
        """Live replicas that do not serve `generation` yet."""
        now = time.monotonic()
        return sorted(r for r, (g, at) in self.seen.items() if now - at <= LIVE_S and g < generation)

    def replicas(self) -> dict[str, int]:
        """Live replicas and the generation each serves."""
        now = time.monotonic()
        return {r: g for r, (g, at) in self.seen.items() if now - at <= LIVE_S}

    # ---- engine shape (POST /admin/engines/restart; serve/replica.py follows it) ----------------------------

    def set_shape(self, shape: dict[str, Any]) -> int:
        """A new target shape for every engine replica; returns its version.

        Raises:
            ValueError: Not a shape (`checked_shape`).
        """
        self.shape = checked_shape(shape)
        self.shape_version += 1
        self.failed = None
        return self.shape_version

    def shape_failed(self, replica: str, version: int, reason: str) -> None:
        """`replica` could not start an engine of shape `version`: the target goes back to the shape every engine
        ran before (a new version of it, so no replica tries the failed one again), and the reason is kept for
        `engine_status`."""
        _replica(replica)
        if _counter(version) != self.shape_version or self.shape is None:
            return
        self.failed = {
            "shape": self.shape,
            "version": version,
            "replica": replica,
            "reason": str(reason)[:500],
        }
        self.shape = self.applied
        self.shape_version += 1

    def target_shape(self) -> tuple[int, dict[str, Any] | None]:
        """(version, shape) every engine replica must run; (0, None) before any restart was asked for."""
        return self.shape_version, self.shape

    def engine_ack(self, replica: str, version: int) -> tuple[int, dict[str, Any] | None]:
        """`replica` runs shape `version`; returns the target (`target_shape`). A replaced actor's version rises to
        what the engines report, so the next target is newer than anything they ran."""
        self.engines[_replica(replica)] = (_counter(version), time.monotonic())
        self.shape_version = max(self.shape_version, version)
        _prune(self.engines)
        return self.shape_version, self.shape

    def engine_leave(self, replica: str) -> None:
        """`replica` is shutting down."""
        self.engines.pop(_replica(replica), None)
        self.release_restart(replica)

    def claim_restart(self, replica: str) -> bool:
        """Whether `replica` may restart its engine now: one engine replica at a time, so the others serve. Only
        an engine replica heard from within `LIVE_S` may claim (a caller that is not one cannot hold the claim)."""
        heard = self.engines.get(_replica(replica))
        if heard is None or time.monotonic() - heard[1] > LIVE_S:
            return False
        if self.restarting and self.restarting[0] != replica and self._claim_holds():
            return False
        self.restarting = (replica, time.monotonic())
        return True

    def _claim_holds(self) -> bool:
        """The restarting replica was heard from (claim or acknowledgement) within `CLAIM_S`."""
        if self.restarting is None:
            return False
        holder, claimed = self.restarting
        heard = max(claimed, self.engines.get(holder, (0, 0.0))[1])
        return time.monotonic() - heard < CLAIM_S

    def release_restart(self, replica: str) -> None:
        """`replica` finished (or gave up) its restart."""
        if self.restarting and self.restarting[0] == replica:
            self.restarting = None

    def engines_behind(self, version: int) -> list[str]:
        """Engine replicas that do not run shape `version` yet: the live ones behind, and the one restarting."""
        now = time.monotonic()
        behind = {r for r, (v, at) in self.engines.items() if now - at <= LIVE_S and v < version}
        if self.restarting and self._claim_holds():
            behind.add(self.restarting[0])
        return sorted(behind)

    def shape_applied(self, version: int) -> None:
        """Every engine replica runs shape `version`: ingress replicas check experts against it from now on."""
        if _counter(version) == self.shape_version:
            self.applied = self.shape

    def applied_shape(self) -> dict[str, Any] | None:
        """The shape every engine replica runs, once a restart finished (None before)."""
        return self.applied

    def engine_status(self) -> dict[str, Any]:
        """`GET /admin/engines`: the target and applied shapes, and the shape version of each live engine replica."""
        now = time.monotonic()
        return {
            "target": self.shape,
            "version": self.shape_version,
            "applied": self.applied,
            "engine_replicas": {r: v for r, (v, at) in self.engines.items() if now - at <= LIVE_S},
            "restarting": self.restarting[0] if self.restarting else None,
            "failed": self.failed,
        }


def _prune(records: dict[str, tuple[int, float]]) -> None:
    """At most `MAX_REPLICAS` records, the stalest dropped first."""
    while len(records) > MAX_REPLICAS:
        del records[min(records, key=lambda r: records[r][1])]


def actor_name(app_name: str | None) -> str:
    """The state actor's name (namespace `expertserve`)."""
    return f"expertserve-expert-state-{app_name or 'default'}"


def find_state_actor(app_name: str | None) -> Any:
    """The app's state actor if an ingress replica created it already, else None (engine replicas only look it
    up: creating it is the ingress's, which places it)."""
    import ray

    try:
        return ray.get_actor(actor_name(app_name), namespace="expertserve")
    except ValueError:
        return None


def state_actor(app_name: str | None, resources: dict[str, float] | None = None) -> Any:
    """The app's state actor, created by whichever ingress replica asks first (see `app_actor`)."""
    return app_actor(ExpertState, actor_name(app_name), resources)


def app_actor(cls: type, name: str, resources: dict[str, float] | None = None) -> Any:
    """The app's actor of `cls` by `name` (namespace `expertserve`), created by whichever ingress replica asks
    first. Detached, so it outlives the replica that created it (a replaced replica must not take the app's state
    with it); restarted when its process dies (it then starts empty and recovers from what the replicas report);
    placed with the ingress's `resources`, so it lives where the ingress replicas do (not on a node whose loss would
    take it along)."""
    import ray

    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace="expertserve",
            get_if_exists=True,
            lifetime="detached",
            max_restarts=-1,
            max_task_retries=-1,  # calls in flight wait for it
            num_cpus=0,
            resources=dict(resources or {}),
        )
        .remote()
    )


class StateHandle:
    """The state actor, looked up (or created) again when the one held is gone for good (killed, its node lost):
    a dead handle would otherwise fail every reload until the replicas holding it were replaced.

    Args:
        resolve: Returns a live handle (`state_actor` in ingress replicas), or None when there is none yet.
    """

    def __init__(self, resolve: Callable[[], Any]) -> None:
        self._resolve = resolve
        self._lock = threading.Lock()
        self.actor = resolve()

    def get(self, method: str, *args: Any, timeout: float = 30) -> Any:
        """Calls `method` and waits for its answer (from a thread)."""
        import ray

        actor = self.actor
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=timeout)
        except ray.exceptions.RayActorError:
            return ray.get(getattr(self._renew(actor), method).remote(*args), timeout=timeout)

    async def call(self, method: str, *args: Any) -> Any:
        """Calls `method` and awaits its answer (from the event loop)."""
        import ray

        actor = self.actor
        try:
            return await getattr(actor, method).remote(*args)
        except ray.exceptions.RayActorError:
            renewed = await asyncio.to_thread(self._renew, actor)
            return await getattr(renewed, method).remote(*args)

    def _renew(self, dead: Any) -> Any:
        with self._lock:
            if self.actor is dead:
                logger.warning("expert state: the state actor is gone; looking it up again")
                self.actor = self._resolve()
            if self.actor is None:
                raise RuntimeError(
                    "the expert-state actor is gone and no ingress replica has created it again"
                )
            return self.actor


class StateFollower:
    """A thread in each ingress replica: follows the state actor's generation, reloading when it moves, and
    acknowledges what this replica serves."""

    def __init__(
        self, actor: Any, replica: str, reload: Any, generation: int = 0, *, on_serve: Any = None
    ) -> None:
        self.actor, self.replica, self.reload = actor, replica, reload
        self.generation = generation
        self.on_serve = on_serve or (lambda generation: None)
        self.lock = threading.Lock()  # one reload at a time in this replica (the poller or an admin call)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="expert-state", daemon=True)

    def start(self) -> None:
        """Starts following."""
        self.thread.start()

    def catch_up(self, generation: int) -> None:
        """Reloads (once) if this replica serves an older generation than `generation`."""
        with self.lock:
            if generation > self.generation:
                self.reload()
                self._serve(generation)

    def reload_to(self, generation: int) -> Any:
        """Reloads now (an admin call on this replica) and serves `generation`; returns what the reload found."""
        with self.lock:
            answer = self.reload()
            self._serve(max(generation, self.generation))
            return answer

    def _serve(self, generation: int) -> None:
        self.generation = generation
        self.on_serve(generation)
        logger.info("expert state: this replica serves generation %d", generation)

    def _ack(self) -> int:
        """Tells the actor which generation this replica serves; returns the current one."""
        return int(self.actor.get("ack", self.replica, self.generation, timeout=10))

    def _run(self) -> None:
        # Acknowledgements go on while a catch-up reload runs (in its own thread): a reload can take longer than
        # LIVE_S on a busy node (it rescans the roots and embeds every expert's examples), and a replica silent
        # that long would count as gone, so a reload elsewhere would answer without waiting for it.
        catching: threading.Thread | None = None
        while not self.stop.wait(POLL_S):
            try:
                current = self._ack()
            except Exception as e:  # the actor restarting: try again next tick
                logger.warning("expert state: %s: %s", type(e).__name__, e)
                continue
            if current > self.generation and (catching is None or not catching.is_alive()):
                catching = threading.Thread(
                    target=self._catch_up_logged, args=(current,), name="expert-state-reload", daemon=True
                )
                catching.start()

    def _catch_up_logged(self, generation: int) -> None:
        try:
            self.catch_up(generation)
        except Exception as e:  # a failing scan: the next tick tries again
            logger.warning("expert state: reload for generation %d: %s: %s", generation, type(e).__name__, e)
