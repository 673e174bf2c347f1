"""Who may call what: inference keys for `/v1/...`, the admin key for `/admin/...`, nothing for probes and
`/metrics`. Applied as ASGI middleware before any route reads the body, so an unauthenticated request costs no
parsing. Pure (no ray, vllm or torch).

The middleware asks the `KeyCheck` the ingress replica installed (`install`; one ingress replica per process, and
Serve may run a copy of the FastAPI app object, so the check lives in this module, not in `app.state`), and leaves
the caller it found in the request's scope (`scope["state"]["caller"]`): a layer that scopes or meters callers
reads it from there.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from expertserve.serve.errors import RequestError
from expertserve.tenancy.config import Tenants, build

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost", "testclient"})
Scope = Literal["open", "inference", "admin"]


def scope_of(path: str) -> Scope:
    """What a path needs: the admin key, an inference key, or nothing (probes, metrics, unknown paths)."""
    if path.startswith("/admin/") or path == "/admin":
        return "admin"
    if path.startswith("/v1/") or path == "/v1":
        return "inference"
    return "open"


def app_path(scope: Any) -> str:
    """The request's path inside the app: without the app's route prefix (Serve's `root_path`), so an app
    deployed under `/team/` needs keys for `/team/v1/...` exactly as one at `/` does for `/v1/...`."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", "") or "")
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        return path[len(root.rstrip("/")) :] or "/"
    return path


@dataclass(frozen=True)
class Caller:
    """Who a request comes from, as far as authentication knows: for inference, the tenant whose key it presented
    (`default` when no key is configured; tenancy/config.py)."""

    scope: Scope
    tenant: str | None = None


def same_key(token: str | None, key: str) -> bool:
    """Constant-time key check. Bytes, not str: `compare_digest` raises on non-ASCII text; a header arrives as
    latin-1 text, so its bytes are what the client sent."""
    if token is None:
        return False
    return secrets.compare_digest(token.encode("latin-1", "replace"), key.encode("utf-8"))


def bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, None without one."""
    return authorization[7:] if authorization.lower().startswith("bearer ") else None


class KeyCheck:
    """The configured keys: the tenants' (no tenant keys: inference is open, as the tenant `default`) and the admin
    key (none: admin is loopback-only)."""

    def __init__(self, tenants: Tenants | Iterable[str], admin_key: str | None) -> None:
        # A plain list of keys is the server config's api_keys: the tenant `default`.
        self.tenants = (
            tenants if isinstance(tenants, Tenants) else build({}, tenants, admin_key, source="api_keys")
        )
        self.admin_key = admin_key

    def check(self, scope: Scope, authorization: str, client_host: str) -> Caller:
        """The caller of a request needing `scope`.

        Raises:
            RequestError: 401 for a missing or wrong key, 403 for admin from beyond loopback with no admin key.
        """
        if scope == "open":
            return Caller("open")
        token = bearer(authorization)
        if scope == "admin":
            if self.admin_key is None:
                if client_host not in LOOPBACK:
                    raise RequestError(
                        403, "admin endpoints are loopback-only unless admin_key is configured"
                    )
            elif not same_key(token, self.admin_key):
                raise RequestError(401, "admin endpoints need 'Authorization: Bearer <admin_key>'")
            return Caller("admin")
        # The header arrives as latin-1 text: its bytes are what the client sent (a UTF-8 key as UTF-8 matches).
        tenant = self.tenants.find(token.encode("latin-1", "replace") if token is not None else None)
        if tenant is None:
            raise RequestError(401, "missing or invalid API key ('Authorization: Bearer <key>')")
        return Caller("inference", tenant)


_INSTALLED: dict[str, KeyCheck] = {}


def install(check: KeyCheck) -> None:
    """Makes `check` the one this process's middleware applies (the ingress replica calls it on start and when its
    config changes)."""
    _INSTALLED["check"] = check


class AuthMiddleware:
    """ASGI middleware applying the app's `KeyCheck` (pure ASGI: streamed responses pass through untouched)."""

    def __init__(self, asgi: Any) -> None:
        self.asgi = asgi

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.asgi(scope, receive, send)
            return
        needed = scope_of(app_path(scope))
        check = _INSTALLED.get("check")
        try:
            if check is None:  # fail closed: a replica not yet configured serves nothing that needs a key
                if needed != "open":
                    raise RequestError(503, "the server is starting", retry_after=1)
                caller = Caller("open")
            else:
                headers = dict(scope.get("headers") or [])
                authorization = headers.get(b"authorization", b"").decode("latin-1")
                client = scope.get("client")
                caller = check.check(needed, authorization, client[0] if client else "")
        except RequestError as error:
            from starlette.responses import JSONResponse

            response = JSONResponse(error.body(), status_code=error.status, headers=error.response_headers())
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.asgi(scope, receive, send)
