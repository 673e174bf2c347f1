"""Response headers every answer carries, whatever route made it: `x-expertserve-generation`, the expert-state
generation of the replica that answered."""

from __future__ import annotations

from typing import Any

# The expert-state generation this process's ingress replica serves (one replica per process).
_SERVED = {"generation": 0}


def serve_generation(generation: int) -> None:
    """This replica serves `generation` from now on (the generation follower calls it)."""
    _SERVED["generation"] = generation


def served_generation() -> int:
    """The generation this replica serves."""
    return _SERVED["generation"]


class GenerationHeader:
    """ASGI middleware: adds `x-expertserve-generation` (pure ASGI, so streamed responses and client disconnects
    pass through untouched)."""

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
