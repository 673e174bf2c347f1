"""Effective decoding parameters. Pure Python.

One precedence rule, written once: **request > expert manifest > server defaults**. Every resolved value
carries its source, so responses and logs can say `temperature=0.1 (manifest)`. The output constraint
(grammar, JSON schema, JSON object) follows the same rule: a request's `response_format` replaces the
manifest's grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from expertserve.manifest.base import is_comment_key
from expertserve.manifest.model import Decoding

Source = Literal["request", "manifest", "default"]
# Sampling parameters resolved by precedence, and the manifest field each one comes from.
PARAMETERS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_tokens": "max_tokens",
    "stop": "stop_sequences",
}


@dataclass(frozen=True)
class Resolved:
    """A value and where it came from."""

    value: Any
    source: Source


@dataclass(frozen=True)
class Constraint:
    """The output constraint: kind `grammar` (GBNF text), `json_schema` (a schema), `json_object`, or none."""

    kind: Literal["none", "grammar", "json_schema", "json_object"]
    value: Any
    source: Source | None


def load_defaults(path: Path | None = None) -> dict[str, Any]:
    """Server decoding defaults from a JSON file (default: the packaged one); comments dropped."""
    text = (
        path.read_text()
        if path
        else resources.files("expertserve.defaults").joinpath("decoding.json").read_text()
    )
    data = json.loads(text)
    unknown = sorted(k for k in data if not is_comment_key(k) and k not in PARAMETERS)
    if unknown:
        raise ValueError(
            f"{path or 'decoding defaults'}: unknown parameter(s) {unknown}; known: {sorted(PARAMETERS)}"
        )
    return {k: v for k, v in data.items() if not is_comment_key(k)}


def resolve(
    request: dict[str, Any],
    manifest: Decoding | None,
    defaults: dict[str, Any],
    *,
    ignore_manifest: bool = False,
) -> dict[str, Resolved]:
    """Each sampling parameter with its source. A request value of None counts as not given."""
    out: dict[str, Resolved] = {}
    for name, field in PARAMETERS.items():
        manifest_value = None if manifest is None or ignore_manifest else getattr(manifest, field)
        if request.get(name) is not None:
            out[name] = Resolved(request[name], "request")
        elif manifest_value is not None:
            out[name] = Resolved(manifest_value, "manifest")
        elif name in defaults:
            out[name] = Resolved(defaults[name], "default")
    return out


def resolve_constraint(
    request_format: dict[str, Any] | None,
    manifest: Decoding | None,
    root: Path | None,
    *,
    ignore_manifest: bool = False,
) -> Constraint:
    """The output constraint: the request's `response_format`, else the manifest's grammar or schema.

    Args:
        request_format: OpenAI `response_format` ({"type": "text" | "json_object" | "json_schema", ...}).
        manifest: The expert's decoding block.
        root: The expert directory (grammar and schema files are relative to it).
    """
    if request_format and request_format.get("type") not in (None, "text"):
        if request_format["type"] == "json_object":
            return Constraint("json_object", True, "request")
        return Constraint("json_schema", request_format["json_schema"]["schema"], "request")
    if request_format and request_format.get("type") == "text":
        return Constraint("none", None, "request")
    if manifest is None or ignore_manifest or not manifest.grammar_enabled:
        return Constraint("none", None, None)
    root = root or Path(".")
    if manifest.grammar_file:
        return Constraint("grammar", (root / manifest.grammar_file).read_text(encoding="utf-8"), "manifest")
    if manifest.json_schema is not None:
        return Constraint("json_schema", manifest.json_schema, "manifest")
    if manifest.json_schema_file:
        return Constraint(
            "json_schema", json.loads((root / manifest.json_schema_file).read_text()), "manifest"
        )
    if manifest.grammar_type == "json":
        return Constraint("json_object", True, "manifest")
    return Constraint("none", None, None)


def describe(
    resolved: dict[str, Resolved], constraint: Constraint | None = None, *, max_value_chars: int | None = None
) -> str:
    """`temperature=0.1 (manifest), top_p=1.0 (default), ...`: the header and log line.

    Args:
        resolved: The resolved parameters.
        constraint: The output constraint.
        max_value_chars: Shorten each value to about this many characters (`..." (+N chars)`): response headers
            stay small whatever a client sends; logs keep the whole value.
    """
    parts = []
    for k, v in resolved.items():
        # ASCII (json.dumps escapes the rest): a header value must be, and a log line stays one line.
        text = json.dumps(v.value) if not isinstance(v.value, (int, float)) else str(v.value)
        if max_value_chars is not None and len(text) > max_value_chars:
            text = f"{text[:max_value_chars]}...(+{len(text) - max_value_chars} chars)"
        parts.append(f"{k}={text} ({v.source})")
    if constraint is not None and constraint.kind != "none":
        parts.append(f"constraint={constraint.kind} ({constraint.source})")
    return ", ".join(parts)
