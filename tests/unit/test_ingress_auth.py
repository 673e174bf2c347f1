"""Inference API keys and the admin key (the ingress's own logic, no Ray)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from expertserve.serve.config import ServeConfig
from expertserve.serve.errors import RequestError
from expertserve.serve.ingress import Ingress


def ingress(**config: object) -> Ingress:
    obj = Ingress.__new__(Ingress)
    obj.config = ServeConfig(**config)
    return obj


def request(token: str | None = None, host: str = "127.0.0.1") -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return Request({"type": "http", "headers": headers, "client": (host, 5000), "method": "GET", "path": "/"})


def test_no_keys_means_open_inference_and_loopback_only_admin() -> None:
    server = ingress()
    server._auth(request(), admin=False)
    server._auth(request(), admin=True)
    with pytest.raises(RequestError) as info:
        server._auth(request(host="10.1.2.3"), admin=True)
    assert info.value.status == 403


def test_api_keys_are_required_when_configured() -> None:
    server = ingress(api_keys=["k1", "k2"], admin_key="adm")
    server._auth(request("k2"), admin=False)
    for token in (None, "nope", "adm"):
        with pytest.raises(RequestError) as info:
            server._auth(request(token), admin=False)
        assert info.value.status == 401 and info.value.body()["error"]["type"] == "authentication_error"


def test_admin_key_is_separate() -> None:
    server = ingress(api_keys=["k1"], admin_key="adm")
    server._auth(request("adm", host="10.1.2.3"), admin=True)
    with pytest.raises(RequestError) as info:
        server._auth(request("k1"), admin=True)
    assert info.value.status == 401


def test_non_ascii_and_odd_bytes_in_the_key_are_refused_not_crashed() -> None:
    server = ingress(api_keys=["k1", "clé"], admin_key="adm")
    for raw in (b"Bearer k\xe9", b"Bearer \xff\xfe", b"bearer k1 ", "Bearer clé".encode()):
        scope = {
            "type": "http",
            "headers": [(b"authorization", raw)],
            "client": ("127.0.0.1", 1),
            "method": "GET",
            "path": "/",
        }
        try:
            server._auth(Request(scope), admin=False)
        except RequestError as e:
            assert e.status == 401
        else:
            assert raw == "Bearer clé".encode(), raw  # a UTF-8 key sent as UTF-8 bytes matches
