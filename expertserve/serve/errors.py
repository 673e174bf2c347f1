"""Client-facing errors and their OpenAI error bodies: the one table from domain errors to HTTP. Pure Python.

Engines and the registry raise domain errors (`expertserve.errors`); Ray delivers them wrapped (a replica's error
arrives as the `cause` of a Ray error). `client_error` finds the domain error inside and maps it here, once.
"""

from __future__ import annotations

from typing import Any

from expertserve.errors import (
    EngineRestarting,
    ExpertLoadError,
    ExpertNotFound,
    ExpertNotServable,
    ExpertserveError,
    InvalidSampling,
    PromptTooLong,
)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_overloaded",
}
# Ray errors that mean the engine replica is gone or not yet back: the client may retry shortly.
_ENGINE_UNAVAILABLE = (
    "RayActorError",
    "ActorDiedError",
    "ActorUnavailableError",
    "DeploymentUnavailableError",
)


class RequestError(ExpertserveError):
    """A request the server refuses, with its HTTP status and the parameter at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.headers = dict(headers or {})
        self.status, self.message, self.param, self.code, self.retry_after = (
            status,
            message,
            param,
            code,
            retry_after,
        )

    def response_headers(self) -> dict[str, str] | None:
        """`Retry-After` and the error's own headers (the rate-limit triples of a 429)."""
        out = dict(self.headers)
        if self.retry_after:
            out["Retry-After"] = str(self.retry_after)
        return out or None

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def _mapped(error: BaseException) -> RequestError | None:
    """The table: one domain error to its status, OpenAI type (by status), parameter and code."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, PromptTooLong):
        return RequestError(400, str(error), param=error.param, code="context_length_exceeded")
    if isinstance(error, InvalidSampling):
        return RequestError(400, str(error), param=error.param)
    if isinstance(error, ExpertNotFound):
        return RequestError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, ExpertNotServable):
        return RequestError(400, str(error), param="model", code="expert_not_servable")
    if isinstance(error, EngineRestarting):
        return RequestError(
            503, "the engine is restarting; retry shortly", retry_after=5, code="engine_restarting"
        )
    if isinstance(error, ExpertLoadError):
        return RequestError(500, str(error), param="model", code="expert_load_failed")
    names = {cls.__name__ for cls in type(error).__mro__ if cls.__module__.startswith("ray.")}
    if "BackPressureError" in names:
        return RequestError(503, "the server is overloaded; retry shortly", retry_after=1, code="overloaded")
    vllm = {cls.__name__ for cls in type(error).__mro__ if cls.__module__.startswith("vllm.")}
    if names & set(_ENGINE_UNAVAILABLE) or "EngineDeadError" in vllm:
        return RequestError(
            503, "the engine is restarting; retry shortly", retry_after=5, code="engine_unavailable"
        )
    return None


def error_chain(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps (Ray's `cause`, Python's `__cause__`), outermost first, each once."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and all(cause is not seen for seen in chain):
        chain.append(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__
    return chain


def client_error(error: BaseException) -> RequestError | None:
    """The client-facing error for `error` or for the domain error Ray wrapped in it; None for a bug (500)."""
    # Innermost first: Ray's wrapper subclasses the error it wraps, but its message is a remote traceback.
    for candidate in reversed(error_chain(error)):
        mapped = None if _is_ray_wrapper(candidate) else _mapped(candidate)
        if mapped is not None:
            return mapped
    return None


def _is_ray_wrapper(error: BaseException) -> bool:
    return any(cls.__name__ == "RayTaskError" for cls in type(error).__mro__)
