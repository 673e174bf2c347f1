"""Which expert answers a request: the one it names, or the router's choice for a routed name (`model: "auto"`).

This is the step a version choice (rollouts) or a caller's rights (tenancy) narrow: both see the request and the
catalog before the pipeline resolves decoding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from expertserve.engine.request import Kind
from expertserve.errors import ExpertNotFound
from expertserve.registry import ExpertRecord
from expertserve.serve.catalog import ExpertCatalog
from expertserve.serve.metrics import Metrics
from expertserve.serve.protocol import ChatCompletionRequest, CompletionRequest
from expertserve.tenancy.config import Tenant

logger = logging.getLogger("ray.serve")
AnyRequest = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class Choice:
    """The expert chosen for one request (None: the base model) and, when routed, the route header."""

    record: ExpertRecord | None
    route: str | None = None


class Chooser:
    """Chooses the expert for each request from the catalog's current registry and router."""

    def __init__(self, catalog: ExpertCatalog, metrics: Metrics) -> None:
        self.catalog = catalog
        self.metrics = metrics

    async def choose(self, req: AnyRequest, kind: Kind, tenant: Tenant | None = None) -> Choice:
        """The router's choice for a routed model name; otherwise the expert (or base model) named. With a
        `tenant`, only what it may use: a model outside its scope is not found, exactly like one that does not
        exist, and the router chooses among its experts only.

        Raises:
            ExpertNotFound: No such model (or none the tenant may use).
            ExpertNotServable: The expert is registered but this server cannot serve it.
        """
        experts = self.catalog.experts  # one snapshot: the router and the registry it was built from
        if experts.router is not None and req.model in self.catalog.config.routing.routed_names:
            return await self._route(req, experts, tenant)
        if tenant is not None and not tenant.permits(None if self.catalog.is_base(req.model) else req.model):
            raise self.catalog.not_found(req.model)
        return Choice(self.catalog.resolve(req.model))

    async def _route(self, req: AnyRequest, experts: Any, tenant: Tenant | None) -> Choice:
        """The router's decision, with the x-expertserve-route header."""
        router = experts.router
        allowed = tenant.permits if tenant is not None else None
        # In a thread: an embedding takes milliseconds of CPU that other requests' streams must not wait for.
        if isinstance(req, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            decision, seconds = await asyncio.to_thread(_timed, router.route_messages, messages, allowed)
        else:
            decision, seconds = await asyncio.to_thread(_timed, router.route, req.prompt_text(), allowed)
        if decision.expert is None and tenant is not None and not tenant.permits(None):
            raise ExpertNotFound(
                f"model {req.model!r}: no expert you may use fits this request, and your key may not use the base "
                f"model ({decision.method}); name an expert from GET /v1/models"
            )
        self.metrics.routed.labels(decision.expert or "base").inc()
        self.metrics.route_decision.observe(seconds)
        if decision.expert is None:
            self.metrics.fallbacks.inc()
        header = (
            f"method={decision.method}; confidence={decision.confidence:.3f}; ms={1000 * seconds:.1f}; "
            f"expert={decision.expert or self.catalog.model_id}"
        )
        logger.info("route model=%s -> %s", req.model, header)
        return Choice(experts.registry.get(decision.expert) if decision.expert else None, header)


def _timed(func: Any, *args: Any) -> tuple[Any, float]:
    """func(*args) and the seconds it took."""
    started = time.perf_counter()
    return func(*args), time.perf_counter() - started
