"""Inference API keys and the admin key (the auth layer's own logic, and its middleware on a bare app, no Ray)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from expertserve.serve.errors import RequestError
from expertserve.serve.http import auth
from expertserve.serve.http.auth import KeyCheck, scope_of


def check(keys: KeyCheck, token: str | None, *, admin: bool, host: str = "127.0.0.1") -> auth.Caller:
    header = f"Bearer {token}" if token else ""
    return keys.check("admin" if admin else "inference", header, host)


def test_no_keys_means_open_inference_and_loopback_only_admin() -> None:
    keys = KeyCheck([], None)
    check(keys, None, admin=False)
    check(keys, None, admin=True)
    with pytest.raises(RequestError) as info:
        check(keys, None, admin=True, host="10.1.2.3")
    assert info.value.status == 403


def test_api_keys_are_required_when_configured() -> None:
    keys = KeyCheck(["k1", "k2"], "adm")
    assert check(keys, "k2", admin=False).tenant == "default"
    for token in (None, "nope", "adm"):
        with pytest.raises(RequestError) as info:
            check(keys, token, admin=False)
        assert info.value.status == 401 and info.value.body()["error"]["type"] == "authentication_error"


def test_admin_key_is_separate() -> None:
    keys = KeyCheck(["k1"], "adm")
    check(keys, "adm", admin=True, host="10.1.2.3")
    with pytest.raises(RequestError) as info:
        check(keys, "k1", admin=True)
    assert info.value.status == 401


def test_non_ascii_and_odd_bytes_in_the_key_are_refused_not_crashed() -> None:
    keys = KeyCheck(["k1", "clé"], "adm")
    for raw in (b"Bearer k\xe9", b"Bearer \xff\xfe", b"bearer k1 ", "Bearer clé".encode()):
        try:
            keys.check("inference", raw.decode("latin-1"), "127.0.0.1")
        except RequestError as e:
            assert e.status == 401
        else:
            assert raw == "Bearer clé".encode(), raw  # a UTF-8 key sent as UTF-8 bytes matches


def test_paths_decide_what_a_request_needs() -> None:
    assert scope_of("/v1/chat/completions") == "inference"
    assert scope_of("/v1/models/x") == "inference"
    assert scope_of("/admin/experts/reload") == "admin"
    for open_path in ("/livez", "/healthz", "/readyz", "/metrics", "/"):
        assert scope_of(open_path) == "open"


def test_the_middleware_refuses_before_the_route_reads_the_body() -> None:
    app = FastAPI()
    app.add_middleware(auth.AuthMiddleware)
    seen: list[object] = []

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict[str, object]:
        seen.append(await request.body())
        return {"ok": True}

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    client = TestClient(app)
    auth.install(KeyCheck(["k1"], "adm"))
    refused = client.post("/v1/echo", content=b"{not json", headers={"authorization": "Bearer nope"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert seen == []
    assert client.get("/livez").status_code == 200
    assert client.post("/admin/x", headers={"authorization": "Bearer k1"}).status_code == 401


def test_an_app_under_a_route_prefix_needs_its_keys_too() -> None:
    from expertserve.serve.http.auth import app_path

    # Serve gives an app deployed at route_prefix /team the full path and the prefix as root_path.
    assert app_path({"path": "/team/v1/models", "root_path": "/team"}) == "/v1/models"
    assert app_path({"path": "/team/admin/usage", "root_path": "/team/"}) == "/admin/usage"
    assert app_path({"path": "/team", "root_path": "/team"}) == "/"
    assert app_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"
    assert app_path({"path": "/teamx/v1/models", "root_path": "/team"}) == "/teamx/v1/models"
    assert scope_of(app_path({"path": "/team/v1/chat/completions", "root_path": "/team"})) == "inference"
