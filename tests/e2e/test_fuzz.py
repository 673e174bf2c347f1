"""The fuzz properties against the real engine (vLLM on the tiny model): the seed corpus of every input class that
once answered 500, then a smaller generated run. No 5xx; every error is an OpenAI error body; the server answers
a normal request afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.e2e.conftest import TINY_ID, Server
from tests.fuzz import HEADERS, REAL_EXAMPLES, bodies, check_response, seed_corpus, send

pytestmark = pytest.mark.server
MAX_BODY = 65536  # the e2e server's limit (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_seed_corpus_on_the_real_engine(http: httpx.Client) -> None:
    for path, body, status in seed_corpus("expert-beta", "expert-gram", MAX_BODY):
        response = send(http, path, body)
        check_response(response)
        assert response.status_code == status, response.text[:300]


@settings(
    max_examples=REAL_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    request=bodies(["expert-alpha", "expert-beta", "expert-gram", "expert-dora", TINY_ID, "auto"]),
    headers=HEADERS,
)
def test_generated_requests_on_the_real_engine(
    http: httpx.Client, request: tuple[str, Any], headers: dict[str, bytes]
) -> None:
    check_response(send(http, *request, headers=headers))


def test_the_real_server_serves_after_the_fuzzing(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"model": "expert-beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
