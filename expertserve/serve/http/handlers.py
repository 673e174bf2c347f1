"""Every error an ingress route raises, as an OpenAI error body: client mistakes and domain errors with their 4xx
(the table in serve/errors.py), unknown paths and methods, and our own bugs as a 500 with an incident id."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertserve.errors import ExpertserveError
from expertserve.serve.errors import RequestError, client_error

# Serve configures this logger in replicas (stderr and log files); a logger of our own would print nothing.
logger = logging.getLogger("ray.serve")


async def request_error(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.response_headers())


async def domain_error(request: Request, error: ExpertserveError) -> JSONResponse:
    mapped = client_error(error)  # raised before the engine (registry, router)
    if mapped is not None:
        return await request_error(request, mapped)
    return await internal_error(request, error)


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
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


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """Our own bugs: the body carries an id the log line has too, so a report can be traced."""
    incident = uuid.uuid4().hex[:16]
    logger.exception("internal error %s on %s", incident, request.url.path)
    message = (
        f"internal error {incident}: {type(error).__name__} (the server log has the details under this id)"
    )
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "internal_error"}}
    return JSONResponse(body, status_code=500, headers={"x-expertserve-request-id": incident})


def install(app: Any) -> None:
    """Registers the handlers on a FastAPI app."""
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(ExpertserveError, domain_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
