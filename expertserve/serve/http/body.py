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
# A 1 MiB body holds at most ~500k values ("[0,0,...]"); 64 prompts of 4k token ids is 262k.
MAX_VALUES = 300_000
# Keys are client text: a refusal names at most this much of one.
MAX_KEY_SHOWN = 64


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
    """Depth, size and string encodability, iteratively and in time linear in the body.

    A path string per value costs the path's length for every value under it (a 500 KB key over a 250k-item list
    asks for 116 GiB), so each value carries only a link to its parent and the path is spelled on a refusal only.
    """
    stack: list[tuple[Any, _Link | None, int]] = [(body, None, 1)]
    seen = 0
    while stack:
        value, link, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise RequestError(
                400, f"the body holds more than {MAX_VALUES} JSON values; send fewer or smaller items"
            )
        if depth > MAX_DEPTH:
            path = _spell(link)
            raise RequestError(
                400, f"{path or 'the body'}: nested deeper than {MAX_DEPTH} levels", param=path or None
            )
        if isinstance(value, str):
            _check_text(value, link)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, link)
                stack.append((item, (link, key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, (link, i), depth + 1) for i, item in enumerate(value))


# (parent, key or index): a path shared by every value under it, spelled only when one is refused.
_Link = tuple[Any, "str | int"]


def _spell(link: _Link | None) -> str:
    parts: list[str] = []
    while link is not None:
        link, key = link
        if isinstance(key, int):
            parts.append(f"[{key}]")
        else:
            shown = key if len(key) <= MAX_KEY_SHOWN else key[:MAX_KEY_SHOWN] + "..."
            parts.append(f".{shown}" if link is not None else shown)
    return "".join(reversed(parts))


def _check_text(text: str, link: _Link | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        path = _spell(link)
        raise RequestError(
            400,
            f"{path or 'a key'}: text holds a lone UTF-16 surrogate ({text[e.start]!r} at "
            f"{e.start}); send valid Unicode",
            param=path or None,
        ) from None


async def read_body(request: Any, limit: int, *, empty_ok: bool = False) -> dict[str, Any]:
    """A request's body as a JSON object (`parse_body`), refused at `limit` bytes; `{}` for an empty body where
    `empty_ok` (admin calls whose every field is optional).

    Raises:
        RequestError: 413 beyond the limit (by the declared length before reading), 400 for a bad body.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
    # Counted while it streams: a chunked body declares no length, and buffering it whole first is the attack.
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if empty_ok and not raw.strip():
        return {}
    return parse_body(raw)
