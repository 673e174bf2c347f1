"""The error hierarchy. Every message names the field, file or path at fault and what was expected.

The CLI maps any `ExpertserveError` to a one-line message and a non-zero exit; the HTTP layer maps them
to OpenAI-style error bodies. Nothing else should escape to a user as a traceback.
"""

from __future__ import annotations

from typing import Any


class ExpertserveError(Exception):
    """Base class of every error expertserve reports to a user.

    Every subclass survives pickling with its attributes (Ray ships errors from replicas to the ingress), whatever
    its constructor takes.
    """

    def __reduce__(self) -> Any:
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[ExpertserveError], args: tuple[Any, ...], state: dict[str, Any]) -> ExpertserveError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ManifestError(ExpertserveError):
    """A manifest is unreadable or invalid.

    Attributes:
        source: The file (or package member) the manifest came from.
        problems: One line per problem, each starting with the JSON path of the offending field.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            joined = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{source}: invalid expert manifest, {len(problems)} problems:\n{joined}")


class PackageError(ExpertserveError):
    """An `.expert` package is malformed, tampered with, unsafe or cannot be written."""


class SignatureError(PackageError):
    """A package signature is missing, invalid, or made by an unexpected key."""


class RegistryError(ExpertserveError):
    """The registry cannot be built as asked (for example two experts with the same name and version)."""


class ExpertNotFound(ExpertserveError):
    """No registered expert has the requested name (and version)."""


class ModelError(ExpertserveError):
    """The base model is missing, cannot be prepared, or failed its conversion checks."""


class ExpertNotServable(ExpertserveError):
    """The expert is registered but this server cannot serve it (another base model, an adapter type vLLM cannot
    hot-swap)."""

    def __init__(self, expert: str, reason: str):
        super().__init__(f"expert {expert!r} cannot be served by this server: {reason}")
        self.expert, self.reason = expert, reason


class EngineError(ExpertserveError):
    """An engine refused or failed a request. Raised by engines; only serve/ maps these to HTTP."""


class PromptTooLong(EngineError):
    """The prompt (soft-prompt positions included) leaves no room to generate in the model's context."""

    def __init__(self, tokens: int, limit: int, param: str):
        super().__init__(f"the prompt is {tokens} tokens; this model's context is {limit}")
        self.tokens, self.limit, self.param = tokens, limit, param


class InvalidSampling(EngineError):
    """The engine refuses a sampling parameter or output constraint (`param` names the request field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineRestarting(EngineError):
    """This replica's engine is being replaced (a drain-then-start restart): the request belongs on another replica,
    or on this one once it is back."""


class ExpertLoadError(EngineError):
    """An expert's adapter or soft prompt could not be loaded on an engine replica."""

    def __init__(self, expert: str, reason: str):
        super().__init__(f"expert {expert!r} could not be loaded: {reason}")
        self.expert, self.reason = expert, reason
