"""Raw request bodies to trusted JSON objects (pure): every refusal is a 400 naming where the problem is."""

from __future__ import annotations

import pytest

from expertserve.serve.errors import RequestError
from expertserve.serve.http.body import MAX_DEPTH, parse_body


@pytest.mark.parametrize(
    ("raw", "message", "param"),
    [
        (b'{"model": ', "not valid JSON", None),
        (b"\xff\xfe", "not valid JSON", None),
        (b"[1, 2]", "must be a JSON object", None),
        (b'{"temperature": NaN}', "NaN is not a JSON number", None),
        (b'{"temperature": -Infinity}', "-Infinity is not a JSON number", None),
        (
            b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "lone UTF-16 surrogate",
            "messages[0].content",
        ),
        (b'{"prompt": "\\udfff"}', "lone UTF-16 surrogate", "prompt"),
        (b'{"\\ud800": 1}', "lone UTF-16 surrogate", None),
        (
            b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}",
            f"deeper than {MAX_DEPTH}",
            "a" + "[0]" * (MAX_DEPTH - 1),
        ),
        (b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}", f"deeper than {MAX_DEPTH}", None),
    ],
)
def test_refused_bodies(raw: bytes, message: str, param: str | None) -> None:
    with pytest.raises(RequestError) as info:
        parse_body(raw)
    assert info.value.status == 400 and message in info.value.message
    assert info.value.param == param


def test_valid_bodies_pass_unchanged() -> None:
    body = {
        "model": "expert-sql",
        "messages": [{"role": "user", "content": "東京 😀 \u202e"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        },
    }
    import json

    assert parse_body(json.dumps(body).encode()) == body
