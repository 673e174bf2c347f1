"""The engine deployment: one engine per Serve replica, experts loaded per replica on first use.

Serve model multiplexing sends an expert's requests to replicas that already hold it (the multiplexed id is the
expert's `ExpertSpec.key`), evicts the least recently used, and runs one load per key however many requests wait.
The engine class is a keyword argument (`engine_cls=`): vLLM in production, a fake in CPU tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve

from expertserve.engine.config import EngineSettings
from expertserve.engine.protocol import ExpertEngine, LoadedExpert
from expertserve.engine.request import Chunk, EngineRequest, ExpertSpec

# Experts a replica keeps loaded; Serve routes an expert's requests to replicas that already hold it.
MAX_EXPERTS_PER_REPLICA = 16


class EngineReplica:
    """Ray Serve deployment class (the app builder wraps it with `serve.deployment`)."""

    # Serve awaits an async constructor; the engine starts before the replica takes requests.
    async def __init__(  # type: ignore[misc]
        self, settings: EngineSettings, *, engine_cls: type[ExpertEngine] | None = None
    ) -> None:
        if engine_cls is None:
            from expertserve.engine.vllm_engine import VLLMExpertEngine

            engine_cls = VLLMExpertEngine
        self.engine = engine_cls(settings)
        await self.engine.start()
        # The specs of the experts this replica was asked for: Serve's loader gets only the key.
        self._specs: dict[str, ExpertSpec] = {}

    @serve.multiplexed(max_num_models_per_replica=MAX_EXPERTS_PER_REPLICA)
    async def _expert(self, key: str) -> LoadedExpert:
        return await self.engine.load_expert(self._specs[key])

    async def generate(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        """Streams the request's chunks, its expert loaded first (once per replica)."""
        expert = None
        if request.expert is not None:
            self._specs[request.expert.key] = request.expert
            expert = await self._expert(request.expert.key)
        try:
            async for chunk in self.engine.generate(request, expert):
                yield chunk
        except asyncio.CancelledError:  # the client went away
            await self.engine.abort(request.request_id)
            raise

    async def ping(self) -> bool:
        """The ingress's /healthz probe."""
        await self.engine.check_health()
        return True

    async def check_health(self) -> None:
        """Serve's health check: the engine must be alive."""
        await self.engine.check_health()
