"""A full queue answers 503 with Retry-After and an OpenAI error body; the server recovers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import running_server

pytestmark = pytest.mark.server


def test_overload_is_503_with_retry_after(built: tuple[Path, Path, Path]) -> None:
    limits = {"replicas": {"max_ongoing_requests": 1, "max_queued_requests": 1}}
    with running_server(*built, **limits) as server:
        body = {
            "model": "expert-beta",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 200,
            "temperature": 1.0,
        }
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(
                    lambda _: httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120),
                    range(8),
                )
            )
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 503 in statuses, statuses
        refused = next(r for r in responses if r.status_code == 503)
        assert (
            refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "server_overloaded"
        )
        again = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=120)
        assert again.status_code == 200
