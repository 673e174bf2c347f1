"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve's proxy).

It validates requests, picks the expert, resolves decoding (request > manifest > server defaults) and the
output constraint, and forwards a fully resolved request to the engine deployment, routed to replicas that
already hold the expert (Serve model multiplexing). Every client mistake becomes an OpenAI error body with a
4xx status; nothing a client sends can produce a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from expertserve.decoding import describe, load_defaults, resolve, resolve_constraint
from expertserve.manifest.status import RuntimeContext, field_statuses
from expertserve.registry import ExpertRecord, Registry
from expertserve.serve.config import ServeConfig
from expertserve.serve.errors import RequestError
from expertserve.serve.metrics import Metrics
from expertserve.serve.protocol import ChatCompletionRequest, CompletionRequest, request_errors

# Serve configures this logger in replicas (stderr and log files); a logger of our own would print nothing.
logger = logging.getLogger("ray.serve")
app = FastAPI(title="expertserve", docs_url=None, redoc_url=None)
LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}


class Ingress:
    """Ray Serve ingress deployment class (the app builder applies `serve.deployment` and `serve.ingress`)."""

    def __init__(self, engine: Any, config: dict[str, Any], roots: list[str]):
        self.engine = engine
        self.config = ServeConfig.model_validate(config)
        self.roots = roots
        self.defaults = load_defaults(Path(self.config.decoding_defaults) if self.config.decoding_defaults else None)
        self.metrics = Metrics()
        self.registry = Registry()
        self.router = None
        if self.config.routing.enabled:
            from expertserve.routing.embedder import Embedder

            self.embedder = Embedder()
        self.reload()

    # ---- routes (Serve binds these methods to the replica) -------------------------------------------------

    @app.get("/healthz")
    async def route_healthz(self) -> Response:
        try:
            await self.engine.ping.remote()
        except Exception as e:  # the engine is starting, restarting or broken
            logger.warning("health check: engine unavailable: %s", str(e).splitlines()[0][:200])
            return JSONResponse({"status": "unavailable", "engine": "not ready"}, status_code=503,
                                headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "experts": len(self.registry)})

    @app.get("/v1/models")
    async def route_models(self, request: Request) -> dict[str, Any]:
        self._auth(request, admin=False)
        created = int(time.time())
        data = [{"id": self.config.model_id, "object": "model", "created": created, "owned_by": "expertserve",
                 "root": self.config.model_id, "parent": None}]
        if self.router is not None:
            data += [{"id": name, "object": "model", "created": created, "owned_by": "expertserve",
                      "root": self.config.model_id, "parent": None, "routed": True}
                     for name in self.config.routing.routed_names]
        for record in self.registry.servable(self.config.model_id):
            data.append({"id": record.name, "object": "model", "created": created, "owned_by": "expertserve",
                         "root": self.config.model_id, "parent": self.config.model_id, "version": record.version})
        return {"object": "list", "data": data}

    @app.get("/v1/experts")
    async def route_experts(self, request: Request) -> dict[str, Any]:
        self._auth(request, admin=False)
        ctx = RuntimeContext.detect()
        out = []
        for record in self.registry:
            reason = record.unservable_reason(self.config.model_id)
            adapter = record.adapter_for(self.config.model_id)
            defaults = resolve({}, record.decoding, self.defaults, ignore_manifest=self.config.ignore_manifest_decoding)
            hints = [{"field": s.path, "value": s.value, "status": s.status, "detail": s.detail}
                     for s in field_statuses(record.manifest, ctx) if s.path.startswith("runtime.")]
            out.append({
                "name": record.name, "version": record.version, "versions": self.registry.versions(record.name),
                "servable": reason is None, "reason": reason,
                "adapter": {"type": adapter[0].effective_type, "r": adapter[0].r, "path": str(adapter[1])}
                if adapter else None,
                "soft_prompts": [{"name": sp.name, "tokens": sp.tokens} for sp, _ in record.soft_prompts],
                "decoding": {k: {"value": v.value, "source": v.source} for k, v in defaults.items()},
                "hints": hints,
            })
        return {"object": "list", "data": out, "problems": self.registry.problems}

    @app.post("/v1/chat/completions")
    async def route_chat(self, request: Request) -> Response:
        return await self.complete(request, "chat")

    @app.post("/v1/completions")
    async def route_completions(self, request: Request) -> Response:
        return await self.complete(request, "completion")

    @app.post("/admin/experts/reload")
    async def route_reload(self, request: Request) -> dict[str, Any]:
        self._auth(request, admin=True)
        return self.reload()

    @app.get("/metrics")
    async def route_metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- experts -------------------------------------------------------------------------------------------

    def reload(self) -> dict[str, list[str]]:
        """Rescans the expert roots; new experts serve at once, removed ones stop taking requests."""
        fresh = Registry.scan(self.roots)
        before = {r.name: r.version for r in self.registry}
        after = {r.name: r.version for r in fresh}
        self.registry = fresh
        if self.config.routing.enabled:
            from expertserve.routing.router import Router, RouterConfig

            routing = RouterConfig(min_confidence=self.config.routing.min_confidence,
                                   base_score=self.config.routing.base_score)
            self.router = Router(fresh, self.embedder, base_model=self.config.model_id, config=routing)
        for problem in fresh.problems:
            logger.warning("expert not registered: %s", problem)
        ctx = RuntimeContext.detect()
        for record in fresh:
            if before.get(record.name) == record.version:
                continue
            reason = record.unservable_reason(self.config.model_id)
            if reason:
                logger.warning("expert %s %s is not servable here: %s", record.name, record.version, reason)
            for status in field_statuses(record.manifest, ctx):
                if status.path.startswith("runtime.") and status.status == "not applicable":
                    logger.info("expert %s: %s = %s not applicable: %s", record.name, status.path, status.value,
                                status.detail)
        return {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                "updated": sorted(n for n in after if n in before and after[n] != before[n])}

    def _resolve_model(self, model: str) -> ExpertRecord | None:
        """None for the base model; the expert's record otherwise."""
        if model in (self.config.model_id, "base"):
            return None
        if model not in self.registry:
            raise RequestError(404, f"model {model!r} does not exist; GET /v1/models lists the base model and the "
                               "experts", param="model", code="model_not_found")
        record = self.registry.get(model)
        reason = record.unservable_reason(self.config.model_id)
        if reason:
            raise RequestError(400, f"expert {model!r} cannot be served by this server: {reason}", param="model",
                               code="expert_not_servable")
        return record

    # ---- request path --------------------------------------------------------------------------------------

    def _auth(self, request: Request, admin: bool) -> None:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else None
        if admin:
            if self.config.admin_key is None:
                if (request.client.host if request.client else "") not in LOOPBACK:
                    raise RequestError(403, "admin endpoints are loopback-only unless admin_key is configured")
                return
            if token is None or not secrets.compare_digest(token, self.config.admin_key):
                raise RequestError(401, "admin endpoints need 'Authorization: Bearer <admin_key>'")
            return
        if self.config.api_keys and not any(token and secrets.compare_digest(token, k) for k in self.config.api_keys):
            raise RequestError(401, "missing or invalid API key ('Authorization: Bearer <key>')")

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
        raw = await request.body()
        if len(raw) > limit:
            raise RequestError(413, f"request body is {len(raw)} bytes; the limit is {limit}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    async def complete(self, request: Request, kind: str) -> Response:
        """Chat completions and completions, streaming or not."""
        self._auth(request, admin=False)
        body = await self._body(request)
        cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            param, message = request_errors(e)[0]
            raise RequestError(400, f"{param}: {message}" if param else message, param=param or None) from None
        route_header = None
        if self.router is not None and req.model in self.config.routing.routed_names:
            record, route_header = await self._route(req, kind)
        else:
            record = self._resolve_model(req.model)
        manifest = record.decoding if record else None
        resolved = resolve(req.sampling_request(), manifest, self.defaults,
                           ignore_manifest=self.config.ignore_manifest_decoding)
        constraint = resolve_constraint(req.response_format.as_dict() if req.response_format else None, manifest,
                                        record.root if record else None,
                                        ignore_manifest=self.config.ignore_manifest_decoding)
        name = record.name if record else self.config.model_id
        decoding = describe(resolved, constraint)
        logger.info("request model=%s expert=%s decoding: %s", req.model, name, decoding)
        engine_request = {
            "kind": kind, "request_id": uuid.uuid4().hex, "n": req.n, "seed": req.seed,
            "ignore_eos": req.ignore_eos, "min_tokens": req.min_tokens,
            "sampling": {k: v.value for k, v in resolved.items()},
            "constraint": {"kind": constraint.kind, "value": constraint.value, "source": constraint.source},
            "expert": self._expert_spec(record) if record else None,
        }
        if kind == "chat":
            engine_request["messages"] = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                          for m in req.messages]
        else:
            engine_request["prompt"] = req.prompt_text()
        headers = {"x-expertserve-expert": name, "x-expertserve-decoding": decoding}
        if route_header:
            headers["x-expertserve-route"] = route_header
        multiplexed = f"{record.name}@{record.version}" if record else ""
        stream = self.engine.options(stream=True, multiplexed_model_id=multiplexed).generate.remote(engine_request)
        started = time.monotonic()
        self.metrics.ongoing.inc()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as e:
            self.metrics.ongoing.dec()
            self.metrics.errors.labels(str(getattr(_unwrap(e), "status", 500))).inc()
            raise _unwrap(e) from None
        self.metrics.observe_first(name, started, first)
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{engine_request['request_id']}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(kind, rid, created, req.model, first, stream, include_usage, name,
                                               started), media_type="text/event-stream", headers=headers)
        try:
            chunks = [first] if first else []
            async for chunk in stream:
                chunks.append(chunk)
        except Exception as e:
            raise _unwrap(e) from None
        finally:
            self.metrics.ongoing.dec()
        payload = _full_response(kind, rid, created, req.model, req.n, chunks, req.return_token_ids)
        self.metrics.finish(name, started, payload["usage"], ok=True)
        return JSONResponse(payload, headers=headers)

    async def _route(self, req: Any, kind: str) -> tuple[ExpertRecord | None, str]:
        """The router's choice for a routed model name, and the x-expertserve-route header."""
        # In a thread: an embedding takes milliseconds of CPU that other requests' streams must not wait for.
        if kind == "chat":
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            decision, seconds = await asyncio.to_thread(_timed, self.router.route_messages, messages)
        else:
            decision, seconds = await asyncio.to_thread(_timed, self.router.route, req.prompt_text())
        self.metrics.routed.labels(decision.expert or "base").inc()
        self.metrics.route_decision.observe(seconds)
        if decision.expert is None:
            self.metrics.fallbacks.inc()
        header = f"method={decision.method}; confidence={decision.confidence:.3f}; ms={1000 * seconds:.1f}; " \
                 f"expert={decision.expert or self.config.model_id}"
        logger.info("route model=%s -> %s", req.model, header)
        return (self.registry.get(decision.expert) if decision.expert else None), header

    def _expert_spec(self, record: ExpertRecord) -> dict[str, Any]:
        adapter = record.adapter_for(self.config.model_id)
        return {"name": record.name, "version": record.version, "adapter_dir": str(adapter[1]) if adapter else None,
                "soft_prompts": [str(p) for _, p in record.soft_prompts]}

    async def _sse(self, kind: str, rid: str, created: int, model: str, first: dict[str, Any] | None,
                   stream: Any, include_usage: bool, name: str, started: float) -> AsyncIterator[str]:
        usage: dict[int, dict[str, int]] = {}
        try:
            chunk = first
            while chunk is not None:
                usage[chunk["index"]] = {"prompt_tokens": chunk["prompt_tokens"],
                                         "completion_tokens": chunk["completion_tokens"]}
                yield "data: " + json.dumps(_chunk(kind, rid, created, model, chunk)) + "\n\n"
                chunk = await anext(stream, None)
            totals = _usage(list(usage.values()))
            if include_usage:
                body = {"id": rid, "object": _object(kind, True), "created": created, "model": model, "choices": [],
                        "usage": totals}
                yield "data: " + json.dumps(body) + "\n\n"
            self.metrics.finish(name, started, totals, ok=True)
        except Exception as e:  # mid-stream: the status is sent already; the error goes in the stream
            self.metrics.finish(name, started, None, ok=False)
            error = _unwrap(e)
            body = error.body() if isinstance(error, RequestError) else {
                "error": {"message": "internal error", "type": "server_error", "param": None, "code": None}}
            yield "data: " + json.dumps(body) + "\n\n"
        finally:
            self.metrics.ongoing.dec()
        yield "data: [DONE]\n\n"


def _timed(func: Any, *args: Any) -> tuple[Any, float]:
    """func(*args) and the seconds it took."""
    started = time.perf_counter()
    return func(*args), time.perf_counter() - started


def _unwrap(error: BaseException) -> BaseException:
    """The RequestError inside Ray's wrappers; back-pressure as 503 + Retry-After; others unchanged."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(error, BackPressureError):
        return RequestError(503, "the server is overloaded; retry shortly", retry_after=1, code="overloaded")
    cause = error
    while cause is not None and not isinstance(cause, RequestError):
        cause = getattr(cause, "cause", None) or cause.__cause__
    return cause if isinstance(cause, RequestError) else error


def _object(kind: str, chunk: bool) -> str:
    return ("chat.completion.chunk" if chunk else "chat.completion") if kind == "chat" else "text_completion"


def _chunk(kind: str, rid: str, created: int, model: str, c: dict[str, Any]) -> dict[str, Any]:
    c = {k: v for k, v in c.items() if k != "token_ids"}
    if kind == "chat":
        choice = {"index": c["index"], "delta": {"role": "assistant", "content": c["text"]},
                  "finish_reason": c["finish_reason"], "logprobs": None}
    else:
        choice = {"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
    return {"id": rid, "object": _object(kind, True), "created": created, "model": model, "choices": [choice]}


def _usage(per_choice: list[dict[str, int]]) -> dict[str, int]:
    prompt = per_choice[0]["prompt_tokens"] if per_choice else 0
    completion = sum(u["completion_tokens"] for u in per_choice)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _full_response(kind: str, rid: str, created: int, model: str, n: int, chunks: list[dict[str, Any]],
                   token_ids: bool = False) -> dict[str, Any]:
    texts, reasons, usage = [""] * n, [None] * n, {}
    ids: list[list[int]] = [[] for _ in range(n)]
    for c in chunks:
        texts[c["index"]] += c["text"]
        ids[c["index"]] += c["token_ids"]
        reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
        usage[c["index"]] = {"prompt_tokens": c["prompt_tokens"], "completion_tokens": c["completion_tokens"]}
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
    else:
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
    if token_ids:
        for choice, choice_ids in zip(choices, ids, strict=True):
            choice["token_ids"] = choice_ids
    return {"id": rid, "object": _object(kind, False), "created": created, "model": model, "choices": choices,
            "usage": _usage(list(usage.values()))}


@app.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@app.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("internal error on %s", request.url.path)
    return JSONResponse({"error": {"message": f"internal error: {type(error).__name__}", "type": "server_error",
                                   "param": None, "code": None}}, status_code=500)
