"""The error hierarchy. Every message names the field, file or path at fault and what was expected.

The CLI maps any `ExpertserveError` to a one-line message and a non-zero exit; the HTTP layer maps them
to OpenAI-style error bodies. Nothing else should escape to a user as a traceback.
"""

from __future__ import annotations


class ExpertserveError(Exception):
    """Base class of every error expertserve reports to a user."""


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
