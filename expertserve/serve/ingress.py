"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve's proxy).

A completion is a short pipeline: parse the body, choose the expert (by name or by the router), resolve decoding
(request > manifest > server defaults) and the output constraint, build the typed engine request, respond
(streamed or whole). The engine request goes to the engine deployment, routed to replicas that already hold the
expert (Serve model multiplexing). Every client mistake becomes an OpenAI error body with a 4xx status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertserve import __version__
from expertserve.decoding import Constraint, describe, load_defaults, resolve, resolve_constraint
from expertserve.engine.config import EngineSettings
from expertserve.engine.request import (
    Chunk,
    EngineRequest,
    ExpertSpec,
    Extras,
    Kind,
    Message,
    Role,
    Sampling,
    check_sampling,
)
from expertserve.errors import ExpertNotFound, ExpertNotServable, ExpertserveError
from expertserve.manifest.status import RuntimeContext, field_statuses
from expertserve.packaging.store import is_store, local_roots, mirror_dir, store_of
from expertserve.packaging.trust import TrustPolicy
from expertserve.registry import ExpertRecord, Registry
from expertserve.serve.body import parse_body
from expertserve.serve.config import ServeConfig
from expertserve.serve.engine_metrics import EngineMetrics
from expertserve.serve.engine_shape import EngineShape, experts_need
from expertserve.serve.errors import RequestError, client_error
from expertserve.serve.expert_checks import ServingContext, expert_problems, trust_problems, xgrammar_compiler
from expertserve.serve.expert_state import StateFollower, state_actor
from expertserve.serve.health import EngineHealth
from expertserve.serve.metrics import Metrics, RequestTracker
from expertserve.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_engine_restart,
    parse_request,
)
from expertserve.serve.replica import app_name, replica_id
from expertserve.serve.responses import (
    INTERNAL_ERROR,
    SSE_DONE,
    ResponseMeta,
    chunk_body,
    full_response,
    sse,
    tool_call_chunk,
    usage,
    usage_body,
)
from expertserve.serve.streams import merged
from expertserve.serve.tools import ToolPlan, render_tool_turn, with_manifest
from expertserve.serve.tools import plan as plan_tools
from expertserve.serve.transport import by_reference
from expertserve.serve.warm import Warmer, warm_targets

# Serve configures this logger in replicas (stderr and log files); a logger of our own would print nothing.
logger = logging.getLogger("ray.serve")
app = FastAPI(title="expertserve", docs_url=None, redoc_url=None)
LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}
AnyRequest = ChatCompletionRequest | CompletionRequest
# OpenAI's roles as the chat template sees them (tool turns are rendered by serve/tools.py).
_ROLES: dict[str, Role] = {
    "developer": "system",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
# Response headers stay small whatever a client sends (16 stop strings of 60 KB once stalled the response);
# the full values go to the log line and GET /v1/experts.
HEADER_VALUE_CHARS = 48


@dataclass(frozen=True)
class Experts:
    """The registry and the router built from it, swapped together on reload (a request never sees one without
    the other)."""

    registry: Registry
    router: Any  # expertserve.routing.router.Router, or None when routing is off


@dataclass(frozen=True)
class Choice:
    """The expert chosen for one request (None: the base model) and, when routed, the route header."""

    record: ExpertRecord | None
    route: str | None = None


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
        self.engine = engine.options(_by_reference=by_reference(config.grpc_data_plane))
        self.config = config
        self.roots = roots
        # Each store's mirror on this node, once: the request path asks which store an expert came from.
        self.mirrors = {r: mirror_dir(r) for r in roots if is_store(r)}
        self.serving = (
            ServingContext.of(
                Path(settings.model_dir),
                config.model_id,
                settings.max_lora_rank,
                prefix_caching=settings.prefix_caching,
            )
            if settings is not None
            else ServingContext(config.model_id, max_lora_rank=2**31)
        )
        self.compile_grammars = compile_grammars
        # The config's keys are checked hex already and hold EXPERTSERVE_TRUSTED_KEYS (ServeConfig.load).
        self.trust = TrustPolicy(frozenset(config.trusted_keys), config.allow_untrusted)
        self.defaults = load_defaults(Path(config.decoding_defaults) if config.decoding_defaults else None)
        self.metrics = Metrics()
        self.app_name = app_name()  # None outside Serve
        self.health = EngineHealth(self.app_name)
        self.engine_metrics = EngineMetrics()
        self.experts = Experts(Registry(), None)
        self.embedder = None
        if config.routing.enabled:
            if embedder_cls is None:
                from expertserve.routing.embedder import Embedder as embedder_cls
            self.embedder = embedder_cls()
        self.warmer: Warmer | None = None  # started below, once the first scan has run
        # The app's expert state (serve/expert_state.py), before the first scan: it holds the engines' shape.
        self.state = state_actor(self.app_name, config.replicas.ingress_resources) if self.app_name else None
        # The generation is read before the first scan: a reload asked for while this replica scans raises it,
        # and this replica then catches up, rather than claiming a generation its scan may predate.
        generation = self._current_generation()
        self.reload()
        self.follower = self._follow_expert_state(generation)
        self.warmer = self._start_warmer()

    def _start_warmer(self) -> Warmer | None:
        """Keeps experts with a replica minimum loaded on that many engine replicas (serve/warm.py). None outside
        Serve."""
        if self.app_name is None:
            return None
        overrides = self.config.replicas.expert_min_replicas
        warmer = Warmer(
            self.engine,
            lambda: warm_targets(self.registry, self.config.model_id, overrides, self._with_store),
        )
        warmer.start()
        return warmer

    def _with_store(self, record: ExpertRecord, spec: ExpertSpec) -> ExpertSpec:
        """The spec with the shared store its files are mirrored from, if any (packaging/store.py)."""
        store = store_of(record.root, self.mirrors) if self.mirrors else None
        return (
            spec if store is None else dataclasses.replace(spec, store=store, mirror=str(self.mirrors[store]))
        )

    def _current_generation(self) -> int:
        """The app's expert generation now (0 outside Serve)."""
        if self.state is None:
            return 0
        import ray

        return int(ray.get(self.state.current.remote()))

    def _follow_expert_state(self, generation: int) -> StateFollower | None:
        """Joins the app's expert state (serve/expert_state.py): this replica serves `generation`, read before its
        first scan, and follows later ones. None outside Serve."""
        actor = self.state
        if actor is None:
            return None
        import ray

        follower = StateFollower(actor, replica_id(), self.reload, generation, on_serve=_serve_generation)
        _serve_generation(generation)
        ray.get(actor.ack.remote(follower.replica, generation))
        follower.start()
        return follower

    @property
    def registry(self) -> Registry:
        """The experts served now."""
        return self.experts.registry

    # ---- routes (Serve binds these methods to the replica) -------------------------------------------------

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
            "experts": len(self.registry),
        }
        if not readiness.ready:
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(body)

    @app.get("/v1/models")
    async def route_models(self, request: Request) -> dict[str, Any]:
        self._auth(request, admin=False)
        created = int(time.time())
        model_id = self.config.model_id
        data = [
            {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "expertserve",
                "root": model_id,
                "parent": None,
            }
        ]
        if self.experts.router is not None:
            data += [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "expertserve",
                    "root": model_id,
                    "parent": None,
                    "routed": True,
                }
                for name in self.config.routing.routed_names
            ]
        for record in self.registry.servable(model_id):
            data.append(
                {
                    "id": record.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "expertserve",
                    "root": model_id,
                    "parent": model_id,
                    "version": record.version,
                }
            )
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def route_model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model object, as `GET /v1/models` lists it; 404 when there is none by that id."""
        listing = await self.route_models(request)
        found = next((m for m in listing["data"] if m["id"] == model_id), None)
        if found is None:
            raise ExpertNotFound(
                f"model {model_id!r} does not exist; GET /v1/models lists the base model and the "
                "servable experts"
            )
        return found

    @app.get("/v1/experts")
    async def route_experts(self, request: Request) -> dict[str, Any]:
        self._auth(request, admin=False)
        ctx = RuntimeContext.detect()
        out = [self._expert_info(record, ctx) for record in self.registry]
        return {
            "object": "list",
            "data": out,
            "problems": self.registry.problems,
            "warnings": self.registry.shadowing(),
        }

    @app.post("/v1/chat/completions")
    async def route_chat(self, request: Request) -> Response:
        return await self.complete(request, "chat")

    @app.post("/v1/completions")
    async def route_completions(self, request: Request) -> Response:
        return await self.complete(request, "completion")

    @app.post("/admin/experts/reload")
    async def route_reload(self, request: Request) -> dict[str, Any]:
        """Rescans the roots here, then makes every ingress replica serve the new generation; answers with it
        once they all do (503 naming the replicas that lag, after `RELOAD_WAIT_S`)."""
        self._auth(request, admin=True)
        return await self._reload_everywhere()

    async def _reload_everywhere(self) -> dict[str, Any]:
        follower = self.follower
        if follower is None:  # outside Serve (unit tests): one replica, nothing to agree with
            return await asyncio.to_thread(self.reload)
        generation = await follower.actor.bump.remote()
        # Off the event loop: scanning reads files and the router embeds every expert's examples.
        answer: dict[str, Any] = await asyncio.to_thread(follower.reload_to, generation)
        await follower.actor.ack.remote(follower.replica, generation)
        deadline = time.monotonic() + RELOAD_WAIT_S
        while lagging := await follower.actor.lagging.remote(generation):
            if time.monotonic() > deadline:
                raise RequestError(
                    503,
                    f"generation {generation} is not served by every ingress replica yet (lagging: "
                    f"{', '.join(lagging)}); they pick it up on their own, retry to check",
                    retry_after=2,
                    code="reload_pending",
                )
            await asyncio.sleep(0.1)
        replicas = await follower.actor.replicas.remote()
        return {**answer, "generation": generation, "ingress_replicas": len(replicas)}

    @app.post("/admin/engines/restart")
    async def route_engines_restart(self, request: Request) -> dict[str, Any]:
        """Restarts the engine replicas, one at a time, with the shape the experts need (the largest adapter rank,
        prefix caching), or the one asked for (never smaller than the running one); requests keep being served.
        Answers once every engine replica runs it and the experts were checked again (`restarted`: false when
        the running shape already serves every expert); 503 naming the replicas still restarting after
        `ENGINE_RESTART_WAIT_S` (they go on: call again to wait for them)."""
        self._auth(request, admin=True)
        empty = not (await request.body()).strip()  # Starlette keeps the body: _body reads it again for free
        asked = parse_engine_restart({} if empty else await self._body(request))
        if self.state is None:
            raise RequestError(
                409, "engine restarts need the Serve app (this ingress runs outside Ray Serve)"
            )
        started = time.monotonic()
        running = self._engine_shape()
        registry = await asyncio.to_thread(lambda: Registry.scan(local_roots(self.roots)[0]))
        target = running.grown(experts_need(registry, self.config.model_id))
        target = target.grown(
            EngineShape(asked.max_lora_rank or target.max_lora_rank, bool(asked.prefix_caching))
        )
        version, current = await self.state.target_shape.remote()
        if target == running and (current is None or EngineShape.from_dict(current) == running):
            status = await self.state.engine_status.remote()
            return {
                "restarted": False,
                "shape": running.to_dict(),
                "engine_replicas": status["engine_replicas"],
            }
        if current is None or EngineShape.from_dict(current) != target:
            version = await self.state.set_shape.remote(target.to_dict())
        logger.info("engine restart asked: %s (running %s), shape version %d", target, running, version)
        deadline = time.monotonic() + ENGINE_RESTART_WAIT_S
        while True:
            behind = await self.state.engines_behind.remote(version)
            status = await self.state.engine_status.remote()
            if not behind and status["engine_replicas"]:
                break
            if time.monotonic() > deadline:
                raise RequestError(
                    503,
                    f"the engines are restarting for {target.to_dict()} (not yet: {', '.join(behind) or 'none'}); "
                    "they go on, call again to wait for them",
                    retry_after=10,
                    code="restart_pending",
                )
            await asyncio.sleep(0.5)
        await self.state.shape_applied.remote(version)
        reloaded = await self._reload_everywhere()
        return {
            "restarted": True,
            "shape": target.to_dict(),
            "engine_replicas": status["engine_replicas"],
            "seconds": round(time.monotonic() - started, 1),
            **reloaded,
        }

    @app.get("/admin/engines")
    async def route_engines(self, request: Request) -> dict[str, Any]:
        """The shape experts are checked against here, the target and applied shapes, and each live engine
        replica's shape version."""
        self._auth(request, admin=True)
        status = await self.state.engine_status.remote() if self.state is not None else {}
        return {"serving": self._engine_shape().to_dict(), **status}

    @app.get("/metrics")
    async def route_metrics(self) -> PlainTextResponse:
        """Ours, then vLLM's engine series from Ray's metrics (see serve/engine_metrics.py)."""
        text = self.metrics.render().decode() + await self.engine_metrics.text()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ---- experts -------------------------------------------------------------------------------------------

    def reload(self) -> dict[str, list[str]]:
        """Rescans the expert roots, all or nothing: the new registry and router replace the old ones together.

        New experts serve at once and removed ones stop taking requests; an expert whose new manifest is invalid
        keeps its last valid version; one whose files this server cannot serve is listed as broken, with why. The
        answer lists every problem (`problems`)."""
        self._follow_engine_shape()
        previous = self.registry
        paths, store_problems = local_roots(self.roots)  # stores synced into this node's mirrors
        fresh = Registry.scan(paths, previous=previous, check=self._check)
        fresh.problems[:0] = store_problems
        before = {r.name: (r.version, r.content_id) for r in previous}
        after = {r.name: (r.version, r.content_id) for r in fresh}
        router = None
        if self.embedder is not None:
            from expertserve.routing.router import Router, RouterConfig

            routing = RouterConfig(
                min_confidence=self.config.routing.min_confidence, base_score=self.config.routing.base_score
            )
            router = Router(fresh, self.embedder, base_model=self.config.model_id, config=routing)
        self.experts = Experts(fresh, router)
        self._log_changes(fresh, before)
        if self.warmer is not None:
            self.warmer.poke()
        return {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "updated": sorted(n for n in after if n in before and after[n] != before[n]),
            "problems": [*fresh.problems, *(router.problems if router else [])],
            "warnings": fresh.shadowing(),
        }

    def _follow_engine_shape(self) -> None:
        """Experts are checked against the shape every engine runs: the one a restart applied, if any."""
        if self.state is None:
            return
        import ray

        applied = EngineShape.from_dict(ray.get(self.state.applied_shape.remote(), timeout=30))
        if applied is not None and not self._engine_shape().covers(applied):
            shape = self._engine_shape().grown(applied)
            self.serving = dataclasses.replace(
                self.serving, max_lora_rank=shape.max_lora_rank, prefix_caching=shape.prefix_caching
            )

    def _engine_shape(self) -> EngineShape:
        return EngineShape(self.serving.max_lora_rank, bool(self.serving.prefix_caching))

    def _check(self, record: ExpertRecord) -> list[str]:
        """This server's checks of an expert's files (engine limits, grammars); see serve/expert_checks.py."""
        return [
            *trust_problems(record, self.trust),
            *expert_problems(record, self.serving, xgrammar_compiler if self.compile_grammars else None),
        ]

    def _log_changes(self, fresh: Registry, before: dict[str, tuple[str, str]]) -> None:
        """The lifecycle transitions of a scan, logged and counted (`expertserve_expert_lifecycle_total`):
        discovered (a new name, version or content), then servable or broken; invalid manifests, kept last valid
        versions, removed experts."""
        count = self.metrics.lifecycle.labels
        for problem in fresh.problems:
            if "is not servable" not in problem:  # broken experts are counted below, with their record
                count("kept" if "still serving" in problem else "invalid").inc()
            logger.warning("expert problem: %s", problem)
        for warning in fresh.shadowing():
            logger.warning("expert shadowed: %s", warning)
        for name in sorted(set(before) - {r.name for r in fresh}):
            count("removed").inc()
            logger.info("expert %s removed", name)
        ctx = RuntimeContext.detect()
        for record in fresh:
            if before.get(record.name) == (record.version, record.content_id):
                continue
            count("discovered").inc()
            reason = record.unservable_reason(self.config.model_id)
            count("broken" if record.broken else "servable" if reason is None else "not_servable").inc()
            if reason:
                logger.warning("expert %s %s is not servable here: %s", record.name, record.version, reason)
            else:
                logger.info(
                    "expert %s %s servable (content %s)", record.name, record.version, record.content_id[:12]
                )
            for status in field_statuses(record.manifest, ctx):
                if status.path.startswith("runtime.") and status.status == "not applicable":
                    logger.info(
                        "expert %s: %s = %s not applicable: %s",
                        record.name,
                        status.path,
                        status.value,
                        status.detail,
                    )

    def _expert_info(self, record: ExpertRecord, ctx: RuntimeContext) -> dict[str, Any]:
        """One entry of `GET /v1/experts`."""
        reason = record.unservable_reason(self.config.model_id)
        adapter = record.adapter_for(self.config.model_id)
        defaults = resolve(
            {}, record.decoding, self.defaults, ignore_manifest=self.config.ignore_manifest_decoding
        )
        hints = [
            {"field": s.path, "value": s.value, "status": s.status, "detail": s.detail}
            for s in field_statuses(record.manifest, ctx)
            if s.path.startswith("runtime.")
        ]
        return {
            "name": record.name,
            "version": record.version,
            "versions": self.registry.versions(record.name),
            "servable": reason is None,
            "reason": reason,
            "adapter": {"type": adapter[0].effective_type, "r": adapter[0].r, "path": str(adapter[1])}
            if adapter
            else None,
            "soft_prompts": [{"name": sp.name, "tokens": sp.tokens} for sp, _ in record.soft_prompts],
            "decoding": {k: {"value": v.value, "source": v.source} for k, v in defaults.items()},
            "source": record.source,
            "signer": (record.provenance or {}).get("signer"),
            "tools": [t.name for t in record.decoding.tools or []],
            "tool_choice": record.decoding.tool_choice,
            "hints": hints,
        }

    # ---- the completion pipeline ---------------------------------------------------------------------------

    async def complete(self, request: Request, kind: Kind) -> Response:
        """Chat completions and completions, streaming or not."""
        self._auth(request, admin=False)
        req = parse_request(kind, await self._body(request))
        choice = await self._choose(req, kind)
        tool_plan = self._tool_plan(req, choice.record)
        engine_requests = self._engine_requests(kind, req, choice.record, tool_plan)
        first = engine_requests[0]
        headers = self._headers(req, choice, first)
        logger.info(
            "request %s model=%s expert=%s user=%s decoding: %s",
            first.request_id,
            req.model,
            headers["x-expertserve-expert"],
            json.dumps(req.user),
            describe(dict(first.sampling.items()), first.constraint),
        )
        return await self._respond(req, engine_requests, headers, self._meta(req, choice, first, tool_plan))

    def _tool_plan(self, req: AnyRequest, record: ExpertRecord | None) -> ToolPlan | None:
        """How the request's tools (or the expert's declared ones) are enforced (None: no tool call); see
        serve/tools.py."""
        if not isinstance(req, ChatCompletionRequest):
            return None
        decoding = record.decoding if record and not self.config.ignore_manifest_decoding else None
        tools, tool_choice, source = with_manifest(req.tools_dicts(), req.tool_choice_value(), decoding)
        tool_plan = plan_tools(
            tools, tool_choice, template_has_tools=self.serving.template_has_tools, source=source
        )
        if tool_plan is not None and req.response_format is not None:
            raise RequestError(
                400,
                "response_format: cannot be combined with a tool call (the call's arguments "
                "schema constrains the output)",
                param="response_format",
            )
        return tool_plan

    def _headers(self, req: AnyRequest, choice: Choice, engine_request: EngineRequest) -> dict[str, str]:
        """Who answered and with which decoding (values shortened; the log line has them whole)."""
        resolved = dict(engine_request.sampling.items())
        headers = {
            "x-expertserve-expert": choice.record.name if choice.record else self.config.model_id,
            "x-expertserve-decoding": describe(
                resolved, engine_request.constraint, max_value_chars=HEADER_VALUE_CHARS
            ),
            "x-expertserve-request-id": engine_request.request_id,
        }
        if choice.route:
            headers["x-expertserve-route"] = f"requested={req.model}; {choice.route}"
        return headers

    def _meta(
        self, req: AnyRequest, choice: Choice, engine_request: EngineRequest, tool_plan: ToolPlan | None
    ) -> ResponseMeta:
        """The body's `model` is who answered (an expert, or the base model); the fingerprint names its version."""
        record = choice.record
        answered = record.name if record else self.config.model_id
        echo = tuple(req.prompts()) if isinstance(req, CompletionRequest) and req.echo else ()
        return ResponseMeta.new(
            engine_request.kind,
            engine_request.request_id,
            int(time.time()),
            answered,
            fingerprint=f"expertserve-{__version__}:{record.name}@{record.version}"
            if record
            else f"expertserve-{__version__}:base",
            n=req.n,
            logprobs=req.sample_logprobs() is not None,
            token_ids=req.return_token_ids,
            echo=echo,
            tools=tool_plan,
        )

    async def _choose(self, req: AnyRequest, kind: Kind) -> Choice:
        """The router's choice for a routed model name; otherwise the expert (or base model) named."""
        if self.experts.router is not None and req.model in self.config.routing.routed_names:
            return await self._route(req, kind)
        return Choice(self._resolve_model(req.model))

    def _resolve_model(self, model: str) -> ExpertRecord | None:
        """None for the base model; the expert's record otherwise.

        Raises:
            ExpertNotFound: No such model.
            ExpertNotServable: The expert is registered but this server cannot serve it.
        """
        if model in (self.config.model_id, "base"):
            return None
        if model not in self.registry:
            raise ExpertNotFound(
                f"model {model!r} does not exist; GET /v1/models lists the base model and the experts"
            )
        record = self.registry.get(model)
        reason = record.unservable_reason(self.config.model_id)
        if reason:
            raise ExpertNotServable(model, reason)
        return record

    async def _route(self, req: AnyRequest, kind: Kind) -> Choice:
        """The router's decision, with the x-expertserve-route header."""
        router = self.experts.router
        # In a thread: an embedding takes milliseconds of CPU that other requests' streams must not wait for.
        if isinstance(req, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            decision, seconds = await asyncio.to_thread(_timed, router.route_messages, messages)
        else:
            decision, seconds = await asyncio.to_thread(_timed, router.route, req.prompt_text())
        self.metrics.routed.labels(decision.expert or "base").inc()
        self.metrics.route_decision.observe(seconds)
        if decision.expert is None:
            self.metrics.fallbacks.inc()
        header = (
            f"method={decision.method}; confidence={decision.confidence:.3f}; ms={1000 * seconds:.1f}; "
            f"expert={decision.expert or self.config.model_id}"
        )
        logger.info("route model=%s -> %s", req.model, header)
        return Choice(self.registry.get(decision.expert) if decision.expert else None, header)

    def _engine_requests(
        self, kind: Kind, req: AnyRequest, record: ExpertRecord | None, tool_plan: ToolPlan | None = None
    ) -> list[EngineRequest]:
        """Decoding resolved (request > manifest > defaults) and the typed requests the engine applies as they
        are: one per prompt."""
        manifest = record.decoding if record else None
        ignore = self.config.ignore_manifest_decoding
        sampling = Sampling.of(
            resolve(req.sampling_request(), manifest, self.defaults, ignore_manifest=ignore)
        )
        constraint: Constraint = resolve_constraint(
            req.response_format.as_dict() if req.response_format else None,
            manifest,
            record.root if record else None,
            ignore_manifest=ignore,
        )
        if tool_plan is not None:  # a request's constraint replaces the manifest's (request > manifest)
            constraint = Constraint("json_schema", tool_plan.schema, "request")
        extras = self._extras(req)
        check_sampling(sampling, extras)
        spec = self._with_store(record, record.engine_spec(self.config.model_id)) if record else None
        if isinstance(req, ChatCompletionRequest):
            messages = tuple(self._message(i, m) for i, m in enumerate(req.messages))
            if tool_plan is not None:
                messages = (Message("system", tool_plan.instruction), *messages)
            return [
                EngineRequest(
                    "chat", uuid.uuid4().hex, sampling, constraint, spec, messages=messages, extras=extras
                )
            ]
        return [
            EngineRequest(
                "completion", uuid.uuid4().hex, sampling, constraint, spec, prompt=prompt, extras=extras
            )
            for prompt in req.prompts()
        ]

    @staticmethod
    def _extras(req: AnyRequest) -> Extras:
        echo = isinstance(req, CompletionRequest) and req.echo
        logprobs = req.sample_logprobs()
        return Extras(
            n=req.n,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=logprobs if echo and logprobs is not None else None,
            score_only=echo and req.max_tokens == 0,
            whole=not req.stream,
        )

    def _message(self, index: int, message: Any) -> Message:
        """A chat message for the template; an author `name` only where the template uses names."""
        if message.name is not None and not self.serving.template_uses_name:
            raise RequestError(
                400,
                f"messages[{index}].name: the base model's chat template has no author names; "
                "leave name out or put it in the content",
                param=f"messages[{index}].name",
            )
        if (
            message.role == "tool" or message.tool_calls
        ):  # templates here have no tool turns: rendered as text
            calls = [c.model_dump() for c in message.tool_calls or []]
            turn, text = render_tool_turn(message.text() or None, calls, message.tool_call_id)
            return Message(turn, text, message.name)
        return Message(_ROLES[message.role], message.text(), message.name)

    async def _respond(
        self,
        req: AnyRequest,
        engine_requests: list[EngineRequest],
        headers: dict[str, str],
        meta: ResponseMeta,
    ) -> Response:
        """Sends the requests to the engine; streams the chunks as SSE, or answers with the whole body."""
        tracker = self.metrics.track(headers["x-expertserve-expert"])
        try:
            started = await _all_or_none([self._start(r) for r in engine_requests])
            stream = merged(started, req.n)
            first = await anext(stream, None)
            tracker.first(first, streamed=bool(req.stream))
            if first is not None and first.replica:
                headers["x-expertserve-replica"] = first.replica
            if (
                first is not None and first.load_seconds > 0
            ):  # this request waited for its expert to load there
                headers["x-expertserve-expert-load-ms"] = f"{first.load_seconds * 1000:.0f}"
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return StreamingResponse(
                    self._sse(meta, first, stream, include_usage, tracker),
                    media_type="text/event-stream",
                    headers=headers,
                )
            chunks = [first] if first is not None else []
            chunks += [chunk async for chunk in stream]
        except BaseException as e:
            raise _failed(tracker, e) from None
        payload = full_response(meta, req.n * len(engine_requests), chunks)
        tracker.done(payload["usage"])
        return JSONResponse(payload, headers=headers)

    async def _start(self, engine_request: EngineRequest) -> tuple[Any, Chunk | None]:
        """The engine's stream and its first chunk. A request whose replica died before it produced anything is
        sent again (nothing reached the client yet), with backoff, until `replicas.engine_retry_s` runs out."""
        expert = engine_request.expert
        handle = self.engine.options(stream=True, multiplexed_model_id=expert.key if expert else "")
        deadline = time.monotonic() + self.config.replicas.engine_retry_s
        delay = 0.25
        while True:
            stream = handle.generate.remote(engine_request)
            try:
                return stream, await anext(stream, None)
            except Exception as e:
                mapped = client_error(e)
                if (
                    mapped is None
                    or mapped.code != "engine_unavailable"
                    or time.monotonic() + delay > deadline
                ):
                    raise
                self.metrics.engine_lost.inc()
                logger.warning(
                    "request %s: engine replica lost before any output (%s); sending it again in %.2f s",
                    engine_request.request_id,
                    type(e).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def _sse(
        self,
        meta: ResponseMeta,
        first: Chunk | None,
        stream: Any,
        include_usage: bool,
        tracker: RequestTracker,
    ) -> AsyncIterator[str]:
        """The event stream; an error mid-stream goes into the stream (the status is sent already)."""
        per_choice: dict[int, tuple[int, int]] = {}
        sent: dict[int, int] = {}  # characters each choice has sent (completions' text_offset)
        try:
            chunk = first
            calls: dict[int, str] = {}  # a tool call's arguments so far, per choice (sent once complete)
            while chunk is not None:
                per_choice[chunk.index] = (chunk.prompt_tokens, chunk.completion_tokens)
                if meta.tools is not None:
                    calls[chunk.index] = calls.get(chunk.index, "") + chunk.text
                    if chunk.finish_reason is not None:
                        yield sse(tool_call_chunk(meta, chunk.index, calls[chunk.index], chunk.finish_reason))
                else:
                    body = chunk_body(
                        meta, chunk, first=chunk.index not in sent, offset=sent.get(chunk.index, 0)
                    )
                    sent[chunk.index] = sent.get(chunk.index, 0) + len(_text(body))
                    yield sse(body)
                chunk = await anext(stream, None)
            totals = usage(per_choice, meta.n)
            if include_usage:
                yield sse(usage_body(meta, totals))
            tracker.done(totals)
        except Exception as e:
            error = client_error(e)
            tracker.failed(error.status if error else 500)
            if error is None:
                logger.error("stream failed: %s", e, exc_info=e)
            yield sse(error.body() if error else INTERNAL_ERROR)
        finally:
            tracker.close()  # the client went away mid-stream
        yield SSE_DONE

    # ---- request checks ------------------------------------------------------------------------------------

    def _auth(self, request: Request, admin: bool) -> None:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else None
        if admin:
            if self.config.admin_key is None:
                if (request.client.host if request.client else "") not in LOOPBACK:
                    raise RequestError(
                        403, "admin endpoints are loopback-only unless admin_key is configured"
                    )
                return
            if not _same_key(token, self.config.admin_key):
                raise RequestError(401, "admin endpoints need 'Authorization: Bearer <admin_key>'")
            return
        if self.config.api_keys and not any(_same_key(token, k) for k in self.config.api_keys):
            raise RequestError(401, "missing or invalid API key ('Authorization: Bearer <key>')")

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
        raw = await request.body()
        if len(raw) > limit:
            raise RequestError(413, f"request body is {len(raw)} bytes; the limit is {limit}")
        return parse_body(raw)


def _same_key(token: str | None, key: str) -> bool:
    """Constant-time key check. Bytes, not str: `compare_digest` raises on non-ASCII text; a header arrives as
    latin-1 text, so its bytes are what the client sent."""
    if token is None:
        return False
    return secrets.compare_digest(token.encode("latin-1", "replace"), key.encode("utf-8"))


def _failed(tracker: RequestTracker, error: BaseException) -> BaseException:
    """Ends the request's tracking as failed; the error to raise (a client error, or the original: a 500)."""
    if isinstance(error, asyncio.CancelledError):  # the client went away
        tracker.close()
        return error
    mapped = client_error(error)
    tracker.failed(mapped.status if mapped else 500)
    return mapped or error


# How long a reload waits for every ingress replica to serve the new generation before answering 503.
RELOAD_WAIT_S = 30.0
# How long `POST /admin/engines/restart` waits for every engine replica to run the new shape before answering 503
# (vLLM starts in 20-60 s on CPU; the replicas restart one after another).
ENGINE_RESTART_WAIT_S = 540.0
# The expert-state generation this process's ingress replica serves (one replica per process), for the header.
_SERVED = {"generation": 0}


def _serve_generation(generation: int) -> None:
    _SERVED["generation"] = generation


class GenerationHeader:
    """ASGI middleware: every response carries `x-expertserve-generation`, the expert-state generation of the
    replica that answered (pure ASGI, so streamed responses and client disconnects pass through untouched)."""

    def __init__(self, asgi: Any) -> None:
        self.asgi = asgi

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.asgi(scope, receive, send)
            return

        async def with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-expertserve-generation", str(_SERVED["generation"]).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.asgi(scope, receive, with_header)


app.add_middleware(GenerationHeader)


def _text(body: dict[str, Any]) -> str:
    choice = body["choices"][0]
    return str(choice["delta"]["content"] if "delta" in choice else choice["text"])


async def _all_or_none(starts: list[Any]) -> list[tuple[Any, Chunk | None]]:
    """Starts every engine request; if any fails, the others are cancelled and the first error raised."""
    results = await asyncio.gather(*starts, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if not isinstance(r, BaseException):
                r[0].cancel()
        raise errors[0]
    return [r for r in results if not isinstance(r, BaseException)]


def _timed(func: Any, *args: Any) -> tuple[Any, float]:
    """func(*args) and the seconds it took."""
    started = time.perf_counter()
    return func(*args), time.perf_counter() - started


@app.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@app.exception_handler(ExpertserveError)
async def _domain_error(request: Request, error: ExpertserveError) -> JSONResponse:
    mapped = client_error(error)  # raised before the engine (registry, router)
    if mapped is not None:
        return await _request_error(request, mapped)
    return await _internal_error(request, error)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and wrong methods, as OpenAI error bodies (FastAPI's own are `{"detail": ...}`)."""
    if error.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(error.detail)
    body = RequestError(
        error.status_code, message, code="not_found" if error.status_code == 404 else None
    ).body()
    return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))


@app.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """Our own bugs: the body carries an id the log line has too, so a report can be traced."""
    incident = uuid.uuid4().hex[:16]
    logger.exception("internal error %s on %s", incident, request.url.path)
    message = (
        f"internal error {incident}: {type(error).__name__} (the server log has the details under this id)"
    )
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "internal_error"}}
    return JSONResponse(body, status_code=500, headers={"x-expertserve-request-id": incident})
