"""What Serve's HTTP proxy does before any request reaches the ingress: strip the headers Serve lets a client use
to change the operator's policy, refuse bodies at the size limit while they stream, and close connections whose
request headers do not arrive in time.

Serve's proxy honours two client headers: `x-request-timeout-seconds` (a client lifts the operator's
`request_timeout_s`, or turns it off with 0) and `x-request-disconnect-disabled: ?1` (a generation keeps running
after its client left). They are for a trusted load balancer in front of Serve, never for API clients, so they are
removed here. A chunked body has no length to check up front, and the proxy and the ingress would each buffer it
whole: here it is read up to `max_body_bytes` and refused with 413 at the first byte beyond. Uvicorn has no deadline
for a request's headers, so a client sending a byte a minute holds a connection (and a file descriptor) before
auth ever runs: `header_timeout_s` closes it.

Serve loads this through `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` in the proxy actor's process (`proxy_env`
gives the variables; `expertserve serve`, the cluster configs and the Kubernetes manifests set them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "expertserve.serve.http.proxy_guard:middlewares"
MAX_BODY_ENV = "EXPERTSERVE_MAX_BODY_BYTES"
HEADER_TIMEOUT_ENV = "EXPERTSERVE_HEADER_TIMEOUT_S"
DEFAULT_MAX_BODY = 1_048_576
DEFAULT_HEADER_TIMEOUT_S = 10.0
# Serve's per-request overrides (ray/serve/_private/constants.py); lower-case as ASGI carries header names.
STRIPPED = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def proxy_env(max_body_bytes: int, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> dict[str, str]:
    """The environment Serve's proxy needs to load the guard with these limits."""
    return {
        CALLBACK_ENV: CALLBACK,
        MAX_BODY_ENV: str(max_body_bytes),
        HEADER_TIMEOUT_ENV: str(header_timeout_s),
    }


def middlewares() -> list[Any]:
    """Serve's proxy callback: the guard, configured from the proxy's environment; installs the header deadline."""
    from starlette.middleware import Middleware

    limit = int(os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY)
    install_header_timeout(float(os.environ.get(HEADER_TIMEOUT_ENV) or DEFAULT_HEADER_TIMEOUT_S))
    return [Middleware(ProxyGuard, max_body_bytes=limit)]


class ProxyGuard:
    """ASGI middleware: strips Serve's client-policy headers and reads bodies up to the limit before the app."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in STRIPPED]
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _refuse(send, f"request body is {declared} bytes; the limit is {self.max_body_bytes}")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _refuse(send, f"request body is over the limit of {self.max_body_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: the client's disconnect, which Serve watches for

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _refuse(send: Send, message: str) -> None:
    """413 with the body the ingress would send (one error table: serve/errors.py)."""
    from expertserve.serve.errors import RequestError

    body = json.dumps(RequestError(413, message).body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def install_header_timeout(seconds: float) -> None:
    """Gives uvicorn's HTTP protocols (httptools and h11) a deadline for each request's headers, from the
    connection's start or the previous response's end; a connection that misses it is closed. Idempotent."""
    from uvicorn.protocols.http import h11_impl

    protocols: list[Any] = [h11_impl.H11Protocol]
    try:
        from uvicorn.protocols.http import httptools_impl

        protocols.append(httptools_impl.HttpToolsProtocol)
    except ImportError:  # httptools is optional in uvicorn
        pass
    for protocol in protocols:
        _patch(protocol, seconds)


def _patch(protocol: Any, seconds: float) -> None:
    if getattr(protocol, "_expertserve_header_timeout", None) is not None:
        protocol._expertserve_header_timeout = seconds
        return
    protocol._expertserve_header_timeout = seconds
    made, lost, complete = protocol.connection_made, protocol.connection_lost, protocol.on_response_complete

    def arm(self: Any) -> None:
        disarm(self)
        self._expertserve_header_deadline = self.loop.call_later(
            protocol._expertserve_header_timeout, expire, self
        )

    def disarm(self: Any) -> None:
        timer = getattr(self, "_expertserve_header_deadline", None)
        if timer is not None:
            timer.cancel()
            self._expertserve_header_deadline = None

    def expire(self: Any) -> None:
        self._expertserve_header_deadline = None
        cycle = getattr(self, "cycle", None)
        waiting = cycle is None or cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        arm(self)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        disarm(self)
        lost(self, exc)

    def on_response_complete(self: Any) -> None:
        complete(self)
        if not self.transport.is_closing():
            arm(self)

    protocol.connection_made = connection_made
    protocol.connection_lost = connection_lost
    protocol.on_response_complete = on_response_complete
    # A request whose headers are complete has a cycle: the deadline then no longer applies.
    if hasattr(protocol, "on_headers_complete"):
        headers_complete = protocol.on_headers_complete

        def on_headers_complete(self: Any) -> None:
            disarm(self)
            headers_complete(self)

        protocol.on_headers_complete = on_headers_complete
    else:  # h11: the cycle starts in handle_events once h11 yields the Request event
        events = protocol.handle_events

        def handle_events(self: Any) -> None:
            events(self)
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                disarm(self)

        protocol.handle_events = handle_events
