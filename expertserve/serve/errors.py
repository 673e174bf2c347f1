"""Client-facing errors and their OpenAI error bodies, mapped in one place. Pure Python."""

from __future__ import annotations

from typing import Any

from expertserve.errors import ExpertserveError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}


class RequestError(ExpertserveError):
    """A request the server refuses, with its HTTP status and the parameter at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def __reduce__(self) -> Any:  # keeps the fields when Ray ships the error from a replica
        return (_rebuild, (self.status, self.message, self.param, self.code, self.retry_after))

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _rebuild(status: int, message: str, param: str | None, code: str | None, retry_after: int | None) -> RequestError:
    return RequestError(status, message, param=param, code=code, retry_after=retry_after)
