"""Reading manifests from disk, with errors that name the JSON path, the bad value and what was expected."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from expertserve.errors import ManifestError
from expertserve.manifest import model as m

MANIFEST_FILE = "manifest.json"

# Values that users coming from the reference system write and that have a known correct spelling.
_HINTS: dict[tuple[str, object], str] = {
    ("prompt_template", "qwen3"): "Qwen3 uses the ChatML format: write 'chatml'",
}


@dataclass(frozen=True)
class LoadedManifest:
    """A validated manifest and where it came from.

    Attributes:
        manifest: The validated model.
        raw: The JSON object as written, comments included (what tools edit and write back).
        path: The manifest file.
        root: The expert directory that relative paths in the manifest refer to.
    """

    manifest: m.ExpertManifest
    raw: dict[str, Any]
    path: Path
    root: Path


def manifest_path(path: Path) -> Path:
    """The manifest file of an expert directory, or the file itself."""
    return path / MANIFEST_FILE if path.is_dir() else path


def load_manifest(path: str | Path) -> LoadedManifest:
    """Loads and validates the manifest of an expert directory or a manifest file.

    Raises:
        ManifestError: The file is missing, not JSON, or not a valid manifest.
    """
    file = manifest_path(Path(path))
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            str(file), ["file not found (an expert directory needs a manifest.json)"]
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(str(file), [f"cannot read: {e}"]) from None
    raw = parse_json(text, str(file))
    return LoadedManifest(validate_manifest(raw, str(file)), raw, file, file.parent)


def parse_json(text: str, source: str) -> dict[str, Any]:
    """Parses a manifest's JSON, rejecting duplicate keys (json.loads would keep the last one silently)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ManifestError(source, [f"duplicate key {key!r} in one object"])
            seen[key] = value
        return seen

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ManifestError(
            source, [f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"]
        ) from None
    except RecursionError:
        raise ManifestError(source, [f"nested deeper than {MAX_DEPTH} levels"]) from None
    if not isinstance(data, dict):
        raise ManifestError(source, [f"expected a JSON object at the top level, got {type(data).__name__}"])
    if _depth(data) > MAX_DEPTH:
        # Every recursive walker after this one (validation, copies, dumps) would hit the recursion limit.
        raise ManifestError(source, [f"nested deeper than {MAX_DEPTH} levels"])
    return data


# Far beyond any manifest (an inline JSON schema is the deepest part).
MAX_DEPTH = 64


def _depth(data: Any) -> int:
    """The nesting depth of parsed JSON, iteratively."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return deepest


def validate_manifest(raw: dict[str, Any], source: str) -> m.ExpertManifest:
    """Validates a parsed manifest.

    Raises:
        ManifestError: With one line per problem.
    """
    try:
        return m.ExpertManifest.model_validate(raw)
    except ValidationError as e:
        raise ManifestError(source, format_validation_error(e)) from None


def format_validation_error(error: ValidationError) -> list[str]:
    """Turns pydantic errors into `path: what is wrong, got VALUE` lines, in order, without duplicates."""
    lines: list[str] = []
    for err in error.errors(include_url=False):
        path, text = locate(err, _describe(err))
        line = f"{path or '(manifest)'}: {text}"
        if line not in lines:
            lines.append(line)
    return lines


def locate(err: Any, text: str) -> tuple[str, str]:
    """The JSON path of an error and its message. Cross-field rules raise "field.path: message" from a model
    validator; the field goes into the path."""
    path = json_path(err["loc"])
    lead = _LEADING_FIELD.match(text)
    if lead and err["type"] == "value_error":
        return (f"{path}.{lead[1]}" if path else lead[1]), lead[2]
    return path, text


def json_path(loc: tuple[int | str, ...]) -> str:
    """`('base_models', 0, 'adapters', 0, 'r')` -> `base_models[0].adapters[0].r`, without union tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part or part.startswith(("function-", "constrained-")):
            continue
        else:
            out += f".{part}" if out else part
    return out


def _describe(err: Any) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    field = next((p for p in reversed(err["loc"]) if isinstance(p, str) and p not in _UNION_TAGS), "")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(field), _ALL_FIELDS, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field{hint} (not in the expert manifest schema; keys starting with '_' are comments)"
    if kind == "missing":
        return "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    elif msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, ") :]
    text = msg[0].lower() + msg[1:] if msg else kind
    if _is_short_scalar(value) and not kind.startswith("value_error"):
        text += f", got {value!r}"
    tip = _HINTS.get((str(field), value)) if _is_short_scalar(value) else None
    return f"{text} ({tip})" if tip else text


def _is_short_scalar(value: object) -> bool:
    return isinstance(value, (str, int, float, bool)) and len(repr(value)) <= 120 or value is None


def _model_classes() -> list[type[BaseModel]]:
    return [
        c
        for c in vars(m).values()
        if isinstance(c, type) and issubclass(c, BaseModel) and c.__module__ == m.__name__
    ]


_LEADING_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.DOTALL)
_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"} | {c.__name__ for c in _model_classes()}
_ALL_FIELDS = sorted({name for c in _model_classes() for name in c.model_fields})
