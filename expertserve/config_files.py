"""Settings files (the server config, the tenants file): reading YAML or JSON, and one line per problem of a
pydantic validation. Pure (no ray, vllm or torch)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class UnreadableFile(Exception):
    """A settings file that is missing or not YAML/JSON; the message is one line (`config file not found`,
    `cannot read it: ...`)."""


def read_structured(path: Path, *, what: str) -> Any:
    """The parsed content of a YAML file (JSON when it ends in `.json`).

    Raises:
        UnreadableFile: `{what} not found`, or `cannot read it: <the parser's first line>`.
    """
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise UnreadableFile(f"{what} not found") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableFile(f"cannot read it: {first}") from None


def validation_problems(
    error: ValidationError,
    *,
    unknown: str,
    secret: Callable[[tuple[int | str, ...]], bool],
    max_value_chars: int | None = None,
) -> list[str]:
    """One line per problem: `engine.dtype: input should be 'auto', ... (got 'fp8')`.

    Args:
        error: What pydantic found.
        unknown: The message for an unknown key (`unknown setting`, `unknown field`).
        secret: Whether the value at a location must never be shown (keys).
        max_value_chars: Where a shown value is cut (None: whole).
    """
    from expertserve.manifest.load import json_path

    lines = []
    for err in error.errors(include_url=False):
        loc = err["loc"]
        where = json_path(loc) or "(top level)"
        message = unknown if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        value = err.get("input")
        scalar = isinstance(value, (str, int, float, bool)) and err["type"] != "missing"
        shown = value if max_value_chars is None else str(value)[:max_value_chars]
        lines.append(f"{where}: {message}" + (f" (got {shown!r})" if scalar and not secret(loc) else ""))
    return lines
