"""The ingress replica's side of the control plane; runs in each ingress replica.

It joins the app's state actor (control/state.py), reads the generation before the first scan (a reload asked for
while this replica scans raises it, and this replica then catches up, rather than claiming a generation its scan
may predate), starts the generation follower (a thread) and the warmer (a thread, control/warm.py). Admin calls
land here: a reload everywhere, an engine restart for a bigger shape. Outside Serve (unit tests) it only rescans.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from expertserve.packaging.store import local_roots
from expertserve.registry import Registry
from expertserve.serve.catalog import ExpertCatalog
from expertserve.serve.control.shape import EngineShape, experts_need
from expertserve.serve.control.state import StateFollower, StateHandle, state_actor
from expertserve.serve.control.warm import Warmer, warm_targets
from expertserve.serve.errors import RequestError
from expertserve.serve.expert_checks import trust_problems
from expertserve.serve.http.headers import serve_generation
from expertserve.serve.protocol import EngineRestartRequest

logger = logging.getLogger("ray.serve")

# How long a reload waits for every ingress replica to serve the new generation before answering 503.
RELOAD_WAIT_S = 30.0
# How long `POST /admin/engines/restart` waits for every engine replica to run the new shape before answering 503
# (vLLM starts in 20-60 s on CPU; the replicas restart one after another).
ENGINE_RESTART_WAIT_S = 540.0


class ControlPlane:
    """Keeps this ingress replica's catalog on the app's generation and engine shape.

    Args:
        catalog: The experts this replica serves.
        engine: Handle of the engine deployment (the warmer calls it).
        app_name: The Serve app (None outside Serve).
        replica: This replica's id.
        resources: The ingress's custom resources (the state actor is placed with them).
        expert_min_replicas: Per-expert replica minimums from the server config.
        config_digest: Identifies the server config: a redeploy with another one drops the engine shape a restart
            raised for the old one (control/state.py `adopt`).
        also_reload: What else a reload reads again, by the key its answer goes under (the tenants).
    """

    def __init__(
        self,
        catalog: ExpertCatalog,
        engine: Any,
        *,
        app_name: str | None,
        replica: str,
        resources: dict[str, float] | None = None,
        expert_min_replicas: dict[str, int] | None = None,
        config_digest: str | None = None,
        also_reload: dict[str, Callable[[], Any]] | None = None,
    ) -> None:
        self.catalog = catalog
        self.also_reload = dict(also_reload or {})
        self.engine = engine
        self.app_name = app_name
        self.replica = replica
        self.expert_min_replicas = dict(expert_min_replicas or {})
        self.config_digest = config_digest
        # Before the first scan: the actor holds the engines' shape the scan checks experts against.
        self.state = StateHandle(lambda: state_actor(app_name, resources)) if app_name else None
        self.follower: StateFollower | None = None
        self.warmer: Warmer | None = None
        catalog.applied_shape = self.applied_shape

    def start(self) -> None:
        """The first scan, then the follower and the warmer."""
        if self.state is not None and self.config_digest:
            self.state.get("adopt", self.config_digest)
        generation = self._current_generation()
        self.reload()
        if self.state is None:
            return
        follower = StateFollower(self.state, self.replica, self.reload, generation, on_serve=serve_generation)
        serve_generation(generation)
        self.state.get("ack", follower.replica, generation)
        follower.start()
        self.follower = follower
        self.warmer = Warmer(
            self.engine,
            lambda: warm_targets(
                self.catalog.registry,
                self.catalog.model_id,
                self.expert_min_replicas,
                self.catalog.with_store,
            ),
        )
        self.warmer.start()

    def reload(self) -> dict[str, Any]:
        """Rescans this replica's catalog (see `ExpertCatalog.reload`), reads again what `also_reload` names, and
        warms what it now holds."""
        answer: dict[str, Any] = self.catalog.reload()
        for key, reload in self.also_reload.items():
            answer[key] = reload()
        if self.warmer is not None:
            self.warmer.poke()
        return answer

    def _current_generation(self) -> int:
        if self.state is None:
            return 0
        return int(self.state.get("current"))

    def applied_shape(self) -> EngineShape | None:
        """The shape every engine replica runs once a restart applied one (None before, and outside Serve)."""
        if self.state is None:
            return None
        return EngineShape.from_dict(self.state.get("applied_shape", timeout=30))

    async def reload_everywhere(self) -> dict[str, Any]:
        """Rescans here, then makes every ingress replica serve the new generation; answers with it once they all
        do (503 naming the replicas that lag, after `RELOAD_WAIT_S`)."""
        follower = self.follower
        if follower is None:  # outside Serve (unit tests): one replica, nothing to agree with
            return await asyncio.to_thread(self.reload)
        generation = await follower.actor.call("bump", follower.generation)
        # Off the event loop: scanning reads files and the router embeds every expert's examples.
        answer: dict[str, Any] = await asyncio.to_thread(follower.reload_to, generation)
        await follower.actor.call("ack", follower.replica, generation)
        deadline = time.monotonic() + RELOAD_WAIT_S
        while lagging := await follower.actor.call("lagging", generation):
            if time.monotonic() > deadline:
                raise RequestError(
                    503,
                    f"generation {generation} is not served by every ingress replica yet (lagging: "
                    f"{', '.join(lagging)}); they pick it up on their own, retry to check",
                    retry_after=2,
                    code="reload_pending",
                )
            await asyncio.sleep(0.1)
        replicas = await follower.actor.call("replicas")
        return {**answer, "generation": generation, "ingress_replicas": len(replicas)}

    async def engines(self) -> dict[str, Any]:
        """The shape experts are checked against here, the target and applied shapes, and each live engine
        replica's shape version."""
        status = await self.state.call("engine_status") if self.state is not None else {}
        return {"serving": self.catalog.engine_shape().to_dict(), **status}

    async def restart_engines(self, asked: EngineRestartRequest) -> dict[str, Any]:
        """Restarts the engine replicas, one at a time, with the shape the experts need (the largest adapter rank,
        prefix caching), or the one asked for (never smaller than the running one); requests keep being served.
        Answers once every engine replica runs it and the experts were checked again (`restarted`: false when
        the running shape already serves every expert)."""
        if self.state is None:
            raise RequestError(
                409, "engine restarts need the Serve app (this ingress runs outside Ray Serve)"
            )
        started = time.monotonic()
        running = self.catalog.engine_shape()
        target = await self._target_shape(running, asked)
        version, current = await self.state.call("target_shape")
        if target == running and (current is None or EngineShape.from_dict(current) == running):
            status = await self.state.call("engine_status")
            return {
                "restarted": False,
                "shape": running.to_dict(),
                "engine_replicas": status["engine_replicas"],
            }
        if current is None or EngineShape.from_dict(current) != target:
            version = await self.state.call("set_shape", target.to_dict())
        logger.info("engine restart asked: %s (running %s), shape version %d", target, running, version)
        status = await self._wait_for_engines(version, target)
        await self.state.call("shape_applied", version)
        reloaded = await self.reload_everywhere()
        return {
            "restarted": True,
            "shape": target.to_dict(),
            "engine_replicas": status["engine_replicas"],
            "seconds": round(time.monotonic() - started, 1),
            **reloaded,
        }

    async def _target_shape(self, running: EngineShape, asked: EngineRestartRequest) -> EngineShape:
        """What the experts in the roots need now, and what was asked for, never below `running`."""
        roots, trust = self.catalog.roots, self.catalog.trust
        limit = self.catalog.config.engine.lora_rank_limit
        if asked.max_lora_rank is not None and asked.max_lora_rank > max(limit, running.max_lora_rank):
            raise RequestError(
                400,
                f"max_lora_rank: {asked.max_lora_rank} is above engine.lora_rank_limit {limit} (raise it in the server "
                "config to let the engines hold bigger adapters)",
                param="max_lora_rank",
            )
        registry = await asyncio.to_thread(
            lambda: Registry.scan(
                local_roots(roots)[0], check=lambda r: trust_problems(r, trust, self.catalog.install_root)
            )
        )
        target = running.grown(experts_need(registry, self.catalog.model_id, limit))
        return target.grown(
            EngineShape(asked.max_lora_rank or target.max_lora_rank, bool(asked.prefix_caching))
        )

    async def _wait_for_engines(self, version: int, target: EngineShape) -> dict[str, Any]:
        """The engine status once every engine replica runs shape `version`; 503 after `ENGINE_RESTART_WAIT_S`
        naming the replicas still restarting (they go on: call again to wait for them)."""
        state: Any = self.state
        deadline = time.monotonic() + ENGINE_RESTART_WAIT_S
        while True:
            behind = await state.call("engines_behind", version)
            status: dict[str, Any] = await state.call("engine_status")
            failed = status.get("failed")
            if failed and failed["version"] == version:
                raise RequestError(
                    503,
                    f"an engine could not start with {failed['shape']} ({failed['reason']}); the engines went back "
                    f"to {status['target']}",
                    retry_after=30,
                    code="restart_failed",
                )
            if not behind and status["engine_replicas"]:
                return status
            if time.monotonic() > deadline:
                raise RequestError(
                    503,
                    f"the engines are restarting for {target.to_dict()} (not yet: {', '.join(behind) or 'none'}); "
                    "they go on, call again to wait for them",
                    retry_after=10,
                    code="restart_pending",
                )
            await asyncio.sleep(0.5)
