"""Request bodies from raw bytes to a JSON object the request models can trust. Pure Python.

Python's `json` accepts what no tokenizer or engine should see: `NaN` and `Infinity`, strings holding lone UTF-16
surrogates (`"\\ud800"`, which cannot be encoded as UTF-8), and nesting deep enough to exhaust the recursion limit
of every recursive walker after it. Each is refused here as a 400 naming where it is.
"""

from __future__ import annotations

import json
from typing import Any

from expertserve.serve.errors import RequestError

# Far beyond any OpenAI body (a JSON schema in response_format is the deepest thing clients send).
MAX_DEPTH = 64


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object.

    Raises:
        RequestError: 400 for anything but a JSON object of finite numbers and encodable strings within
            `MAX_DEPTH` levels.
    """
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(400, f"the body is nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    _check(body)
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check(body: dict[str, Any]) -> None:
    """Depth and string encodability, iteratively (a recursive walk is what deep nesting breaks)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(
                400, f"{path or 'the body'}: nested deeper than {MAX_DEPTH} levels", param=path or None
            )
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            400,
            f"{path or 'a key'}: text holds a lone UTF-16 surrogate ({text[e.start]!r} at "
            f"{e.start}); send valid Unicode",
            param=path or None,
        ) from None


async def read_body(request: Any, limit: int) -> dict[str, Any]:
    """A request's body as a JSON object (`parse_body`), refused at `limit` bytes.

    Raises:
        RequestError: 413 beyond the limit (by the declared length before reading), 400 for a bad body.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
    raw = await request.body()
    if len(raw) > limit:
        raise RequestError(413, f"request body is {len(raw)} bytes; the limit is {limit}")
    return parse_body(raw)
