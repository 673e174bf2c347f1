"""A full queue answers 503 with Retry-After and an OpenAI error body; the server recovers. On the small-queue server
(tests/e2e/conftest.py), which the engine-restart test shares."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.server


def test_overload_is_503_with_retry_after(small_queue_server: Server) -> None:
    server = small_queue_server
    body = {
        "model": "expert-beta",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 200,
        "temperature": 1.0,
    }
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda _: httpx.post(
                    f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=120
                ),
                range(8),
            )
        )
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "server_overloaded"
    again = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={**body, "max_tokens": 2},
        headers=server.headers,
        timeout=120,
    )
    assert again.status_code == 200
