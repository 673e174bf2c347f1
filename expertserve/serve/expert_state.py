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


class ExpertState:
    """The Ray actor (created with `state_actor`)."""

    def __init__(self) -> None:
        self.generation = 0
        self.seen: dict[str, tuple[int, float]] = {}  # replica id -> (generation it serves, when it said so)

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


def state_actor(app_name: str | None, resources: dict[str, float] | None = None) -> Any:
    """The app's state actor, created by whichever ingress replica asks first. Detached, so it outlives the
    replica that created it (a replaced replica must not take the generation with it); placed with the ingress's
    `resources`, so it lives where the ingress replicas do (not on a node whose loss would take it along)."""
    import ray

    return (
        ray.remote(ExpertState)
        .options(
            name=f"expertserve-expert-state-{app_name or 'default'}",
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

    def _run(self) -> None:
        import ray

        while not self.stop.wait(POLL_S):
            try:
                current = ray.get(self.actor.ack.remote(self.replica, self.generation), timeout=10)
                if current > self.generation:
                    self.catch_up(current)
                    ray.get(self.actor.ack.remote(self.replica, self.generation), timeout=10)
            except Exception as e:  # the actor restarting, a slow scan: try again next tick
                logger.warning("expert state: %s: %s", type(e).__name__, e)
