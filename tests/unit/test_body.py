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


def test_a_wide_body_under_a_long_key_is_checked_in_linear_time_and_memory() -> None:
    """Finding 1 of the security issue: a path string per value made this body ask for ~116 GiB."""
    import time
    import tracemalloc

    key = "k" * 500_000
    raw = ('{"' + key + '": [' + ",".join(["0"] * 250_000) + "]}").encode()
    assert len(raw) > 1_000_000
    tracemalloc.start()
    began = time.perf_counter()
    body = parse_body(raw)
    elapsed = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(body[key]) == 250_000
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert elapsed < 5  # generous on a loaded CI box; the quadratic walk did not finish at all


def test_too_many_values_are_refused_naming_the_bound() -> None:
    from expertserve.serve.http.body import MAX_VALUES

    raw = ('{"prompt": [' + ",".join(["1"] * (MAX_VALUES + 1)) + "]}").encode()
    with pytest.raises(RequestError) as info:
        parse_body(raw)
    assert info.value.status == 400 and f"more than {MAX_VALUES} JSON values" in info.value.message


def test_a_refusal_under_a_long_key_names_a_shortened_path() -> None:
    key = "k" * 10_000
    raw = ('{"' + key + '": ["ok", "\\ud800"]}').encode()
    with pytest.raises(RequestError) as info:
        parse_body(raw)
    assert info.value.param is not None and info.value.param.endswith("...[1]")
    assert len(info.value.message) < 300


class _StreamedRequest:
    """A Starlette request's surface read_body uses: headers and an async byte stream."""

    def __init__(self, chunks: list[bytes], headers: dict[str, str] | None = None) -> None:
        self.headers = headers or {}
        self.chunks = chunks
        self.read = 0

    async def stream(self):  # type: ignore[no-untyped-def]
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_a_chunked_body_is_refused_while_it_streams() -> None:
    import asyncio

    from expertserve.serve.http.body import read_body

    request = _StreamedRequest([b"x" * 1024] * 100)  # no content-length, as a chunked upload
    with pytest.raises(RequestError) as info:
        asyncio.run(read_body(request, 4096))
    assert info.value.status == 413
    assert request.read == 5  # stopped at the chunk that crossed the limit, not after buffering all 100


def test_an_empty_admin_body_reads_as_no_fields() -> None:
    import asyncio

    from expertserve.serve.http.body import read_body

    assert asyncio.run(read_body(_StreamedRequest([b"  "]), 4096, empty_ok=True)) == {}
    with pytest.raises(RequestError):
        asyncio.run(read_body(_StreamedRequest([b""]), 4096))


def test_the_issues_one_mib_body_is_refused_with_a_small_400() -> None:
    """Finding 1's body through the whole request check: a 400 naming a shortened parameter, not a 1 MB echo."""
    from expertserve.serve.protocol import parse_request

    key = "k" * 500_000
    raw = ('{"model": "m", "prompt": "p", "' + key + '": [' + ",".join(["0"] * 250_000) + "]}").encode()
    with pytest.raises(RequestError) as info:
        parse_request("completion", parse_body(raw))
    assert info.value.status == 400 and "unknown parameter" in info.value.message
    assert len(info.value.body()["error"]["message"]) < 1000 and len(info.value.param or "") < 200
