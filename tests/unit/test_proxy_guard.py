"""The guard Serve's proxy loads (serve/http/proxy_guard.py), on a real uvicorn server: Serve's client-policy
headers stripped, bodies refused at the limit while they stream, a deadline for request headers. Finding 10 of the
security issue; tests/e2e/test_server.py checks that the proxy of a running server loads it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from expertserve.serve.http.proxy_guard import STRIPPED, ProxyGuard, install_header_timeout, proxy_env

LIMIT = 4096


class Echo:
    """An app that answers with the header names and body size it saw."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        names = b",".join(k for k, _ in scope["headers"])
        out = b"%d;" % len(body) + names
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(out))]}
        )
        await send({"type": "http.response.body", "body": out})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, Echo]]:
    import uvicorn

    install_header_timeout(1.0)
    app = Echo()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(ProxyGuard(app, max_body_bytes=LIMIT), log_level="error", lifespan="off")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(instance.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not instance.started:
        time.sleep(0.02)
    yield port, app
    instance.should_exit = True
    thread.join(5)


def _exchange(port: int, raw: bytes, *, wait: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        conn.sendall(raw)
        data = b""
        while chunk := conn.recv(65536):  # every answer here closes the connection
            data += chunk
        return data


def test_serves_client_policy_headers_never_reach_serve(server: tuple[int, Echo]) -> None:
    port, _ = server
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-Request-Timeout-Seconds: 0\r\n"
        b"x-request-disconnect-disabled: ?1\r\nConnection: close\r\n\r\n{}"
    )
    answer = _exchange(port, raw)
    assert answer.startswith(b"HTTP/1.1 200")
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b"2;") and b"host" in body
    assert not any(name in body for name in STRIPPED)


def test_a_chunked_body_is_refused_at_the_limit_before_the_app_sees_it(server: tuple[int, Echo]) -> None:
    port, app = server
    before = app.calls
    chunk = b"x" * 1024
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"400\r\n" + chunk + b"\r\n") * 8
    )
    answer = _exchange(port, raw)  # no terminating chunk: the client is still sending when it is refused
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"over the limit of 4096 bytes" in answer
    assert app.calls == before
    declared = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n"
    assert _exchange(port, declared).startswith(b"HTTP/1.1 413")


def test_a_body_within_the_limit_reaches_the_app_whole(server: tuple[int, Echo]) -> None:
    port, _ = server
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    raw += b"800\r\n" + b"y" * 2048 + b"\r\n" + b"400\r\n" + b"z" * 1024 + b"\r\n0\r\n\r\n"
    answer = _exchange(port, raw)
    assert answer.startswith(b"HTTP/1.1 200") and answer.split(b"\r\n\r\n", 1)[1].startswith(b"3072;")


def test_a_client_that_does_not_finish_its_headers_is_disconnected(server: tuple[int, Echo]) -> None:
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        began = time.monotonic()
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a byte now and then does not extend the deadline
            time.sleep(0.4)
            try:
                conn.sendall(b"X")
            except OSError:
                break
        with contextlib.suppress(ConnectionResetError):  # closed: an orderly EOF, or a reset
            assert conn.recv(100) == b""
        assert time.monotonic() - began < 5


def test_the_proxy_environment_names_the_callback() -> None:
    import importlib

    env = proxy_env(2048, 3.0)
    module, name = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert env["EXPERTSERVE_MAX_BODY_BYTES"] == "2048"
