"""Sending engine requests and answering: the engine's streams started (a request whose engine replica died
before any output is sent again), merged across prompts and choices, then streamed as server-sent events or
collected into one body. Errors before the first byte are raised (the handlers map them); errors mid-stream go
into the stream."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from expertserve.engine.request import Chunk, EngineRequest
from expertserve.serve.config import ServeConfig
from expertserve.serve.errors import RequestError, client_error, error_chain
from expertserve.serve.metrics import Metrics, RequestTracker
from expertserve.serve.protocol import ChatCompletionRequest, CompletionRequest
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

logger = logging.getLogger("ray.serve")
AnyRequest = ChatCompletionRequest | CompletionRequest


# Engine cores (vLLM's EngineDeadError: the engine died while the replica ran this request) a request may be running
# on when they die before it is refused; and replicas lost under it (a process or node gone: an operator's kill, a
# scale-down, a stale route to a dead replica), which are rarely the request's doing and get more tries.
MAX_ENGINE_LOSSES = 2
MAX_REPLICA_LOSSES = 6
SUSPECT_S = 600.0  # how long a request that failed engines twice is refused when sent again
MAX_SUSPECTS = 1024


def _engine_core_died(error: BaseException) -> bool:
    return any(
        c.__name__ == "EngineDeadError" and c.__module__.startswith("vllm.")
        for cause in error_chain(error)
        for c in type(cause).__mro__
    )


class SuspectRequests:
    """Requests that took down engines, by a digest of everything the engine sees (not the request id)."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}

    def check(self, request: EngineRequest) -> str:
        """The request's fingerprint.

        Raises:
            RequestError: 503 while the same request is a suspect.
        """
        fingerprint = hashlib.sha256(
            repr(dataclasses.replace(request, request_id="", priority=0)).encode()
        ).hexdigest()
        until = self.until.get(fingerprint)
        if until is not None and until > time.monotonic():
            raise RequestError(
                503,
                "this request took down the engine twice; it is refused for a while (report it: it is a bug of "
                "the engine or of expertserve)",
                code="engine_failed_on_request",
            )
        return fingerprint

    def add(self, fingerprint: str) -> None:
        now = time.monotonic()
        self.until = {f: t for f, t in self.until.items() if t > now}
        if len(self.until) < MAX_SUSPECTS:
            self.until[fingerprint] = now + SUSPECT_S


class Responder:
    """Answers with the engine deployment's output.

    Args:
        engine: Handle of the engine deployment (its data plane chosen by the ingress).
        config: The server config (the engine retry budget).
        metrics: Per-request tracking.
    """

    def __init__(self, *, engine: Any, config: ServeConfig, metrics: Metrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.suspects = SuspectRequests()

    async def respond(
        self,
        req: AnyRequest,
        engine_requests: list[EngineRequest],
        headers: dict[str, str],
        meta: ResponseMeta,
        on_end: Callable[[str, dict[str, int] | None], None] | None = None,
    ) -> Response:
        """Sends the requests to the engine; streams the chunks as SSE, or answers with the whole body.
        `on_end(outcome, usage)` is told once how the request ended."""
        tracker = self.metrics.track(headers["x-expertserve-expert"], on_end)
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
        fingerprint = self.suspects.check(engine_request)
        losses = replica_losses = 0
        while True:
            stream = handle.generate.remote(engine_request)
            try:
                return stream, await anext(stream, None)
            except Exception as e:
                mapped = client_error(e)
                retryable = ("engine_unavailable", "engine_restarting")
                if mapped is None or mapped.code not in retryable or time.monotonic() + delay > deadline:
                    raise
                if (
                    mapped.code == "engine_unavailable"
                ):  # lost under it ("engine_restarting": refused, no loss)
                    core = _engine_core_died(e)
                    losses += 1 if core else 0
                    replica_losses += 0 if core else 1
                    self.metrics.engine_lost.inc()
                    if losses >= MAX_ENGINE_LOSSES or replica_losses >= MAX_REPLICA_LOSSES:
                        # The same request took down engines twice: it is the likely cause, so it goes to no
                        # other replica (a poison request retried for engine_retry_s took down every replica).
                        self.suspects.add(fingerprint)
                        raise RequestError(
                            503,
                            f"the engine failed {losses + replica_losses} times while running this request; it is "
                            f"not sent to another replica, and the same request is refused for {SUSPECT_S:.0f} s",
                            code="engine_failed_on_request",
                        ) from None
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


def _failed(tracker: RequestTracker, error: BaseException) -> BaseException:
    """Ends the request's tracking as failed; the error to raise (a client error, or the original: a 500)."""
    if isinstance(error, asyncio.CancelledError):  # the client went away
        tracker.close()
        return error
    mapped = client_error(error)
    tracker.failed(mapped.status if mapped else 500)
    return mapped or error


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
