"""One source of truth for the expert state of an app's ingress replicas: a small Ray actor holding the registry
generation and which generation each ingress replica serves.

A reload on any replica raises the generation here; every replica polls it (every `POLL_S`), rescans its expert
roots when it moved, and acknowledges. `/admin/experts/reload` answers with the new generation once every live
ingress replica serves it (live: acknowledged within `LIVE_S`), so after its answer every replica lists the same
experts. The expert files themselves are the snapshot: replicas read the same roots (shared storage on a cluster).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger("ray.serve")

POLL_S = 0.5  # how often a replica reads the generation
LIVE_S = 5.0  # a replica that has not acknowledged for this long is gone (scaled down or dead)
# An engine replica restarting its engine for a new shape blocks its event loop while vLLM starts (no
# acknowledgements then, 20-60 s on CPU): its claim holds while it was heard from within this long, then lapses (a
# replica that died mid-restart must not hold the others up).
CLAIM_S = 180.0


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

    def bump(self) -> int:
        """A new generation (a reload was asked for)."""
        self.generation += 1
        return self.generation

    def current(self) -> int:
        """The generation every replica must serve."""
        return self.generation

    def ack(self, replica: str, generation: int) -> int:
        """`replica` serves `generation`; returns the current one."""
        self.seen[replica] = (generation, time.monotonic())
        return self.generation

    def leave(self, replica: str) -> None:
        """`replica` is shutting down."""
        self.seen.pop(replica, None)

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
        """A new target shape for every engine replica; returns its version."""
        self.shape = shape
        self.shape_version += 1
        return self.shape_version

    def target_shape(self) -> tuple[int, dict[str, Any] | None]:
        """(version, shape) every engine replica must run; (0, None) before any restart was asked for."""
        return self.shape_version, self.shape

    def engine_ack(self, replica: str, version: int) -> tuple[int, dict[str, Any] | None]:
        """`replica` runs shape `version`; returns the target (`target_shape`)."""
        self.engines[replica] = (version, time.monotonic())
        return self.shape_version, self.shape

    def engine_leave(self, replica: str) -> None:
        """`replica` is shutting down."""
        self.engines.pop(replica, None)
        self.release_restart(replica)

    def claim_restart(self, replica: str) -> bool:
        """Whether `replica` may restart its engine now: one engine replica at a time, so the others serve."""
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
        if version == self.shape_version:
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
        }


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
    """The app's state actor, created by whichever ingress replica asks first. Detached, so it outlives the
    replica that created it (a replaced replica must not take the generation with it); placed with the ingress's
    `resources`, so it lives where the ingress replicas do (not on a node whose loss would take it along)."""
    import ray

    return (
        ray.remote(ExpertState)
        .options(
            name=actor_name(app_name),
            namespace="expertserve",
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            resources=dict(resources or {}),
        )
        .remote()
    )


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
        import ray

        return int(ray.get(self.actor.ack.remote(self.replica, self.generation), timeout=10))

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
