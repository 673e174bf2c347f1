"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve's proxy): the routes, and the wiring of the rooms they
delegate to.

- HTTP concerns (serve/http/): authentication as middleware, body reading, the generation header, error bodies.
- The completion pipeline (serve/pipeline.py): choose the expert (serve/choose.py), resolve decoding, build the
  typed engine requests, answer (serve/respond.py).
- The expert catalog (serve/catalog.py) and its listings (serve/listings.py).
- The control plane (serve/control/plane.py): reloads everywhere, engine restarts, the loops that follow them.

Every client mistake becomes an OpenAI error body with a 4xx status.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from expertserve.engine.config import EngineSettings
from expertserve.serve import listings
from expertserve.serve.catalog import ExpertCatalog
from expertserve.serve.choose import Chooser
from expertserve.serve.config import ServeConfig
from expertserve.serve.control.identity import app_name, replica_id
from expertserve.serve.control.plane import ControlPlane
from expertserve.serve.engine_metrics import EngineMetrics
from expertserve.serve.expert_checks import ServingContext
from expertserve.serve.health import EngineHealth
from expertserve.serve.http import auth, handlers
from expertserve.serve.http.body import read_body
from expertserve.serve.http.headers import GenerationHeader
from expertserve.serve.metrics import Metrics
from expertserve.serve.pipeline import Completions
from expertserve.serve.protocol import parse_engine_restart
from expertserve.serve.quota import Quota
from expertserve.serve.respond import Responder
from expertserve.serve.tenants import TenantsSource
from expertserve.serve.transport import by_reference

# Serve configures this logger in replicas (stderr and log files); a logger of our own would print nothing.
logger = logging.getLogger("ray.serve")
app = FastAPI(title="expertserve", docs_url=None, redoc_url=None)
# Outermost last: the generation header is on every answer, the auth refusals included.
app.add_middleware(auth.AuthMiddleware)
app.add_middleware(GenerationHeader)
handlers.install(app)


def serving_context(config: ServeConfig, settings: EngineSettings | None) -> ServingContext:
    """The engines' limits experts are checked against (unlimited without engine settings: unit tests)."""
    if settings is None:
        return ServingContext(config.model_id, max_lora_rank=2**31)
    return ServingContext.of(
        Path(settings.model_dir),
        config.model_id,
        settings.max_lora_rank,
        prefix_caching=settings.prefix_caching,
    )


class Ingress:
    """Ray Serve ingress deployment class (the app builder applies `serve.deployment` and `serve.ingress`).

    Args:
        engine: Handle of the engine deployment.
        config: The server config.
        roots: Expert roots, scanned on start and on reload.
        settings: What the engines were started with (their limits decide which experts are servable).
        embedder_cls: The router's text embedder (default: the offline MiniLM); tests pass a fake.
        compile_grammars: Compile every expert's grammar with the engine's backend on each scan.
    """

    def __init__(
        self,
        engine: Any,
        config: ServeConfig,
        roots: list[str],
        *,
        settings: EngineSettings | None = None,
        embedder_cls: Any = None,
        compile_grammars: bool = True,
    ):
        # Serve's direct gRPC channel or a Ray actor call, per the config, whatever Ray's nodes default to.
        engine = engine.options(_by_reference=by_reference(config.grpc_data_plane))
        self.config = config
        self.tenants = TenantsSource(config)  # installs the key check the auth middleware applies
        self.metrics = Metrics()
        self.catalog = ExpertCatalog(
            config,
            roots,
            serving=serving_context(config, settings),
            metrics=self.metrics,
            embedder=_embedder(config, embedder_cls),
            compile_grammars=compile_grammars,
        )
        application = app_name()  # None outside Serve
        self.quota = Quota(
            self.metrics,
            app_name=application,
            resources=config.replicas.ingress_resources,
            places=fair_places(config),
        )
        self.completions = Completions(
            catalog=self.catalog,
            chooser=Chooser(self.catalog, self.metrics),
            responder=Responder(engine=engine, config=config, metrics=self.metrics),
            quota=self.quota,
        )
        self.health = EngineHealth(application)
        self.engine_metrics = EngineMetrics()
        self.control = ControlPlane(
            self.catalog,
            engine,
            app_name=application,
            replica=replica_id(),
            resources=config.replicas.ingress_resources,
            expert_min_replicas=config.replicas.expert_min_replicas,
            config_digest=hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:32],
            also_reload={"tenants": self.tenants.reload},
        )
        self.control.start()

    # ---- probes and metrics (open) ---------------------------------------------------------------------------

    @app.get("/livez")
    async def route_livez(self) -> Response:
        """Liveness: this ingress answers (nothing else is asked)."""
        return JSONResponse({"status": "ok"})

    @app.get("/healthz")
    @app.get("/readyz")
    async def route_readyz(self) -> Response:
        """Readiness: an engine replica can take work (from Serve's controller, never queued behind inference)."""
        readiness = await self.health.readiness()
        body = {
            "status": "ok" if readiness.ready else "unavailable",
            "engine": readiness.detail,
            "engine_replicas": readiness.running,
            "experts": len(self.catalog.registry),
        }
        if not readiness.ready:
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(body)

    @app.get("/metrics")
    async def route_metrics(self) -> PlainTextResponse:
        """Ours, then vLLM's engine series from Ray's metrics (see serve/engine_metrics.py)."""
        text = self.metrics.render().decode() + await self.engine_metrics.text()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ---- the catalog (inference keys) ------------------------------------------------------------------------

    # Each lists what the caller's tenant may use only (serve/tenants.py, docs/tenancy.md).

    @app.get("/v1/models")
    async def route_models(self, request: Request) -> dict[str, Any]:
        return listings.models(self.catalog, self.tenants.caller(request.scope).tenant)

    @app.get("/v1/models/{model_id:path}")
    async def route_model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model object, as `GET /v1/models` lists it; 404 when there is none by that id."""
        return listings.model(self.catalog, model_id, self.tenants.caller(request.scope).tenant)

    @app.get("/v1/experts")
    async def route_experts(self, request: Request) -> dict[str, Any]:
        return listings.experts(self.catalog, self.tenants.caller(request.scope).tenant)

    # ---- completions (inference keys) ------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def route_chat(self, request: Request) -> Response:
        caller = self.tenants.caller(request.scope)
        return await self.completions.complete(
            "chat", await read_body(request, self.config.max_body_bytes), caller
        )

    @app.post("/v1/completions")
    async def route_completions(self, request: Request) -> Response:
        caller = self.tenants.caller(request.scope)
        return await self.completions.complete(
            "completion", await read_body(request, self.config.max_body_bytes), caller
        )

    # ---- admin (the admin key, or loopback) ------------------------------------------------------------------

    @app.post("/admin/experts/reload")
    async def route_reload(self) -> dict[str, Any]:
        """Rescans the roots here, then makes every ingress replica serve the new generation (control/plane.py)."""
        return await self.control.reload_everywhere()

    @app.post("/admin/engines/restart")
    async def route_engines_restart(self, request: Request) -> dict[str, Any]:
        """Restarts the engine replicas, one at a time, for the shape the experts need or the one asked for
        (control/plane.py); requests keep being served."""
        body = await read_body(request, self.config.max_body_bytes, empty_ok=True)
        return await self.control.restart_engines(parse_engine_restart(body))

    @app.get("/admin/usage")
    async def route_usage(self) -> dict[str, Any]:
        """Usage per tenant and expert across every ingress replica (serve/quota.py; tenant names, never keys)."""
        return await self.quota.report()

    @app.get("/admin/engines")
    async def route_engines(self) -> dict[str, Any]:
        """The shape experts are checked against here, the target and applied shapes, each engine's version."""
        return await self.control.engines()

    @property
    def registry(self) -> Any:
        """The experts served now (tests, diagnostics)."""
        return self.catalog.registry

    def reload(self) -> dict[str, Any]:
        """Rescans this replica's expert roots now (tests; admin calls go through the control plane)."""
        return self.control.reload()


def fair_places(config: ServeConfig) -> tuple[int, int] | None:
    """(places, waiting) of one ingress replica's fair gate: the requests it lets run at once (the engines' batch,
    `min(max_num_seqs, max_ongoing_requests)` per engine replica, or `fairness.max_in_flight`) and how many may wait
    beyond them (what the engines would have queued); None when fairness is off. Shared among the ingress replicas."""
    fairness, rep = config.fairness, config.replicas
    if not fairness.enabled:
        return None
    engines = rep.max_replicas if rep.autoscaling else rep.num_replicas
    share = rep.ingress_replicas
    places = fairness.max_in_flight or -(
        -engines * min(config.engine.max_num_seqs, rep.max_ongoing_requests) // share
    )
    admitted = -(-engines * (rep.max_ongoing_requests + rep.max_queued_requests) // share)
    return places, max(0, admitted - places)


def _embedder(config: ServeConfig, embedder_cls: Any) -> Any:
    """The router's text embedder; None when routing is off."""
    if not config.routing.enabled:
        return None
    if embedder_cls is None:
        from expertserve.routing.embedder import Embedder as embedder_cls
    return embedder_cls()
