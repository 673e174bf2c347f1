"""The real Ray Serve app (proxy, ingress, two engine replicas, multiplexing) with `FakeEngine` on CPU: protocol,
streaming, errors, routing and placement tested in seconds, without vLLM. The same app on vLLM is tested in
tests/e2e."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import FakeEmbedder, FakeEngine
from tests.helpers import REPO, make_expert, manifest

pytestmark = pytest.mark.slow
BASE = "fake-base"
HELLO = [{"role": "user", "content": "hello world"}]


def _expert(root: Path, name: str, routing: dict[str, Any], *, broken: bool = False) -> None:
    data = manifest(name=name, description=f"{name} answers")
    data["base_models"][0]["name"] = BASE
    data["routing"] = routing
    data["training"]["decoding"] = {"temperature": 0.1, "max_tokens": 12}
    expert = make_expert(root / name, data)
    if broken:
        (expert / "adapter" / "adapter_config.json").unlink()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray
    from ray import serve

    from expertserve.bench.servers import free_port
    from expertserve.serve.app import build_app_from_config
    from expertserve.serve.config import ServeConfig

    root = tmp_path_factory.mktemp("fake-serve")
    experts = root / "experts"
    _expert(
        experts, "expert-sql", {"keywords": ["sql", "select"], "examples": ["write a sql query for orders"]}
    )
    _expert(experts, "expert-json", {"keywords": ["json"], "examples": ["extract the fields into json"]})
    _expert(experts, "expert-broken", {"keywords": ["broken"]}, broken=True)
    port = free_port()
    config = ServeConfig.model_validate(
        {
            "model_dir": str(root),
            "model_id": BASE,
            "experts_dirs": [str(experts)],
            "port": port,
            "engine": {"max_model_len": 64},
            "replicas": {"num_replicas": 2, "num_cpus": 0.1, "max_queued_requests": 16},
            "routing": {"base_score": 0.3, "min_confidence": 0.0},
        }
    )
    saved = dict(os.environ)
    # Ray's workers import tests.fakes by name: they need the repository on their path. Loopback only, no auth.
    os.environ.update(
        {
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app_from_config(config, engine_cls=FakeEngine, embedder_cls=FakeEmbedder)
        serve.run(app, name="expertserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def _chat(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, **body}, timeout=30)


def test_health_and_models(url: str, client: openai.OpenAI) -> None:
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "experts": 3}
    assert {m.id for m in client.models.list()} == {
        BASE,
        "auto",
        "expert-sql",
        "expert-json",
        "expert-broken",
    }


def test_chat_reaches_the_engine_with_the_expert_and_its_manifest_decoding(url: str) -> None:
    r = _chat(url, model="expert-sql")
    assert r.status_code == 200, r.text
    body = r.json()
    text = body["choices"][0]["message"]["content"]
    assert text.startswith("[expert-sql@0.1.0 replica=") and text.endswith("t=0.1] hello world")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 6,
        "total_tokens": 9,
    }  # 2 words + 1 file
    assert r.headers["x-expertserve-expert"] == "expert-sql"
    assert "temperature=0.1 (manifest)" in r.headers["x-expertserve-decoding"]
    r = _chat(url, model=BASE, temperature=0.5, max_tokens=2, n=2)
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["content"].startswith("[base replica=") for c in choices)
    assert (
        all(c["finish_reason"] == "length" for c in choices) and r.json()["usage"]["completion_tokens"] == 4
    )
    assert "temperature=0.5 (request)" in r.headers["x-expertserve-decoding"]


def test_completions_and_streaming_with_usage(url: str, client: openai.OpenAI) -> None:
    completion = client.completions.create(model="expert-json", prompt="a b c", max_tokens=50)
    assert completion.object == "text_completion" and completion.choices[0].text.endswith("] a b c")
    body = {
        "model": "expert-json",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]).split()
    whole = _chat(url, model="expert-json").json()["choices"][0]["message"]["content"].split()
    assert (
        streamed[0] == whole[0] and streamed[3:] == whole[3:]
    )  # the same answer, replica and load count aside
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "expert-nope"}, 404, "model", "model_not_found"),
        ({"model": "expert-sql", "temprature": 1}, 400, "temprature", None),
        (
            {"model": "expert-sql", "messages": [{"role": "user", "content": "word " * 80}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ({"model": "expert-broken"}, 500, "model", "expert_load_failed"),
    ],
)
def test_errors_are_openai_bodies_from_one_table(
    url: str, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    r = _chat(url, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and error["message"]


def test_a_completion_prompt_too_long_names_the_prompt(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"model": "expert-sql", "prompt": "x " * 80}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_stream_errors_arrive_before_the_stream_starts(url: str) -> None:
    r = _chat(url, model="expert-broken", stream=True)
    assert r.status_code == 500 and r.json()["error"]["code"] == "expert_load_failed"


def test_auto_routes_to_the_expert_that_matches(url: str) -> None:
    r = _chat(url, model="auto", messages=[{"role": "user", "content": "write a sql query for orders"}])
    assert (
        r.headers["x-expertserve-expert"] == "expert-sql"
        and "expert=expert-sql" in r.headers["x-expertserve-route"]
    )
    assert r.json()["choices"][0]["message"]["content"].startswith("[expert-sql@0.1.0")
    r = _chat(url, model="auto", messages=[{"role": "user", "content": "tell me about the weather"}])
    assert r.headers["x-expertserve-expert"] == BASE


def test_an_experts_requests_go_to_the_replica_that_loaded_it(url: str) -> None:
    def answer() -> tuple[str, int]:
        text = _chat(url, model="expert-json", max_tokens=3).json()["choices"][0]["message"]["content"]
        replica, loads = (part.split("=")[1] for part in text.split()[1:3])
        return replica, int(loads)

    # Serve learns where an expert is loaded from the replica's report; give it a moment after the first load.
    deadline = time.monotonic() + 20
    seen = [answer()]
    while time.monotonic() < deadline and not (len(seen) >= 2 and seen[-1][0] == seen[-2][0]):
        time.sleep(0.5)
        seen.append(answer())
    replica = seen[-1][0]
    later = [answer() for _ in range(8)]
    assert all(r == replica for r, _ in later), later
    assert all(loads == 1 for _, loads in later), "the replica loaded the expert once and kept it"


def test_metrics_settle_after_requests(url: str) -> None:
    _chat(url, model="expert-sql")
    _chat(url, model="expert-broken")
    text = httpx.get(f"{url}/metrics").text
    assert "expertserve_requests_in_flight 0.0" in text
    assert 'expertserve_requests_total{expert="expert-sql",outcome="ok"}' in text
    assert 'expertserve_errors_total{status="500"}' in text  # the broken expert's load failures
