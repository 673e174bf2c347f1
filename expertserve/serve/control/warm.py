"""Experts kept loaded on several engine replicas (`runtime.min_replicas`, or the server config's
`replicas.expert_min_replicas`), so a popular expert is never pinned to the one replica that loaded it first.

Serve's multiplexing sends an expert's requests to the replicas that hold it. A replica holds an expert after its
first request there, so without help a popular expert's traffic stays on one replica. A thread in each ingress
replica asks the engine deployment to warm each such expert (`EngineReplica.warm`) until that many distinct replicas
say they hold it; calls without a multiplexed id go to any replica, so it asks a few times per missing replica. It
runs after every reload and every `INTERVAL_S` (a replica restarted or evicted the expert). The plan is pure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from expertserve.engine.request import ExpertSpec
from expertserve.registry import Registry

logger = logging.getLogger("ray.serve")

INTERVAL_S = 30.0
TRIES_PER_REPLICA = (
    4  # calls that land on a random replica: a missing one is reached with probability 1 - 2^-4 each
)


@dataclass(frozen=True)
class WarmTarget:
    """One expert to keep loaded on `replicas` engine replicas."""

    spec: ExpertSpec
    replicas: int


def warm_targets(
    registry: Registry,
    base_model: str,
    overrides: Mapping[str, int],
    decorate: Callable[[Any, ExpertSpec], ExpertSpec],
) -> list[WarmTarget]:
    """The servable experts whose replica minimum (config over manifest; default 1) is above 1, latest versions.

    `decorate` completes an expert's spec as the request path does (its store)."""
    targets = []
    for record in registry.servable(base_model):
        runtime = record.manifest.runtime
        wanted = overrides.get(record.name, runtime.min_replicas if runtime and runtime.min_replicas else 1)
        if wanted > 1:
            targets.append(WarmTarget(decorate(record, record.engine_spec(base_model)), wanted))
    return targets


class Warmer:
    """The thread that keeps `targets()` warm through the engine deployment's handle."""

    def __init__(
        self, engine: Any, targets: Callable[[], list[WarmTarget]], *, timeout_s: float = 300
    ) -> None:
        self.engine, self.targets, self.timeout_s = engine, targets, timeout_s
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="expert-warmer", daemon=True)

    def start(self) -> None:
        """Starts the thread; it warms at once, then after each `poke` and every `INTERVAL_S`."""
        self.thread.start()

    def poke(self) -> None:
        """Warm now (the experts changed)."""
        self.wake.set()

    def ensure(self, target: WarmTarget) -> set[str]:
        """Asks replicas to load the expert until `target.replicas` distinct ones hold it, or the tries run out;
        returns the replicas that hold it."""
        holding: set[str] = set()
        for _ in range(target.replicas * TRIES_PER_REPLICA):
            replica, held = self.engine.warm.remote(target.spec).result(timeout_s=self.timeout_s)
            if held:
                holding.add(replica)
            if len(holding) >= target.replicas:
                break
        return holding

    def _run(self) -> None:
        while not self.stop.is_set():
            for target in self.targets():
                try:
                    holding = self.ensure(target)
                except Exception as e:  # a replica restarting, a load that failed: the next round tries again
                    logger.warning("warming %s: %s: %s", target.spec.key, type(e).__name__, e)
                    continue
                if len(holding) < target.replicas:
                    logger.info(
                        "expert %s is loaded on %d of the %d engine replicas it asks for (fewer are running, or "
                        "they were not reached yet)",
                        target.spec.key,
                        len(holding),
                        target.replicas,
                    )
            self.wake.wait(INTERVAL_S)
            self.wake.clear()
