"""Tenancy on the real server (vLLM, two ingress replicas; the small-queue server of tests/e2e/conftest.py, whose
tenants come from a tenants file): scopes on listings and completions, a scoped answer is the expert's own answer
token for token, a limit holds across both ingress replicas, usage counts the engine's tokens, and a bad tenants
file keeps the last good one. The endpoint x scope matrix runs on the fake engine (test_serve_fake_engine.py)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import TENANTS_FILE, TINY_ID, Server

pytestmark = pytest.mark.server

BETA = {"Authorization": "Bearer sk-e2e-beta"}
BASE_ONLY = {"Authorization": "Bearer sk-e2e-base"}


def _chat(server: Server, headers: dict[str, str], model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4}
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"temperature": 0, "return_token_ids": True, **body, **extra},
        headers=headers,
        timeout=180,
    )


def test_scopes_limits_and_usage_on_vllm(small_queue_server: Server) -> None:
    server = small_queue_server
    listed = httpx.get(f"{server.url}/v1/models", headers=BETA, timeout=30).json()
    assert {m["id"] for m in listed["data"]} == {"expert-beta", "auto"}
    listed = httpx.get(f"{server.url}/v1/models", headers=BASE_ONLY, timeout=30).json()
    assert {m["id"] for m in listed["data"]} == {TINY_ID, "auto"}

    # A scoped tenant's answer is the expert's own (the default tenant sees every expert): the same tokens.
    own = _chat(server, BETA, "expert-beta")
    assert own.status_code == 200, own.text
    unscoped = _chat(server, server.headers, "expert-beta")
    assert own.json()["choices"][0]["token_ids"] == unscoped.json()["choices"][0]["token_ids"]
    assert own.headers["x-ratelimit-limit-requests"] == "6"
    for headers, model in ((BETA, TINY_ID), (BASE_ONLY, "expert-beta"), (BETA, "expert-gone")):
        refused = _chat(server, headers, model)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found", (
            refused.text
        )
    auto = _chat(server, BASE_ONLY, "auto", stream=False)
    assert auto.status_code == 200 and auto.headers["x-expertserve-expert"] == TINY_ID

    # 6 per minute across two ingress replicas: one spent above, 5 more, then 429s.
    statuses = [_chat(server, BETA, "expert-beta", max_tokens=1).status_code for _ in range(8)]
    assert statuses == [200] * 5 + [429] * 3, statuses
    time.sleep(1.5)  # the other ingress replica's usage arrives with its next flush
    usage = httpx.get(f"{server.url}/admin/usage", timeout=30).json()["tenants"]
    row = usage["team-beta"]["experts"]["expert-beta"]
    assert row["requests"] == 6 and row["rejected"] == 3
    assert row["completion_tokens"] == own.json()["usage"]["completion_tokens"] + 5  # the engine's counts
    assert row["prompt_tokens"] == 6 * own.json()["usage"]["prompt_tokens"]


def test_a_bad_tenants_file_keeps_the_last_good_tenants_on_vllm(small_queue_server: Server) -> None:
    server = small_queue_server
    tenants_file = server.experts.parent / "tenants.yaml"
    tenants_file.write_text(TENANTS_FILE.replace("team-base:", "team-base:\n    weight: -1"))
    try:
        answer = httpx.post(f"{server.url}/admin/experts/reload", timeout=120).json()
        assert answer["tenants"]["loaded"] is False
        assert any(p.startswith("tenants.team-base.weight") for p in answer["tenants"]["problems"]), answer
        assert _chat(server, BASE_ONLY, TINY_ID).status_code == 200
    finally:
        tenants_file.write_text(TENANTS_FILE)
    assert httpx.post(f"{server.url}/admin/experts/reload", timeout=120).json()["tenants"]["loaded"] is True
