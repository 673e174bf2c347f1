"""The server as users meet it: the official openai client against `expertserve serve` on real Ray Serve + vLLM."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import TINY_ID, Server
from tests.helpers import REPO
from tests.reference import reference_greedy

pytestmark = pytest.mark.server
HELLO = [{"role": "user", "content": "hello world"}]


def test_models_lists_base_and_servable_experts(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {
        TINY_ID,
        "auto",
        "expert-alpha",
        "expert-beta",
        "expert-delta",
        "expert-gram",
        "expert-tools",
    }
    assert all(models[m].model_extra["parent"] == TINY_ID for m in models if m not in (TINY_ID, "auto"))
    assert models["auto"].model_extra["routed"] is True


@pytest.mark.parametrize("model", [TINY_ID, "expert-alpha", "expert-beta", "expert-delta"])
def test_chat_and_completion_per_model(client: openai.OpenAI, model: str) -> None:
    chat = client.chat.completions.create(model=model, messages=HELLO, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    soft_tokens = 4 if model in ("expert-alpha", "expert-delta") else 0
    plain = client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=1)
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens + soft_tokens
    completion = client.completions.create(model=model, prompt="SELECT name", max_tokens=4, temperature=0)
    assert completion.object == "text_completion" and completion.usage.completion_tokens >= 1


def test_streaming_sends_chunks_usage_and_done(server: Server) -> None:
    body = {
        "model": "expert-alpha",
        "messages": HELLO,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1])
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=plain, timeout=120).json()
    assert streamed == whole["choices"][0]["message"]["content"]


def test_a_whole_answer_with_two_choices_and_logprobs_matches_the_stream(server: Server) -> None:
    """A non-streamed request asks vLLM for its final output only; the answer must equal the streamed one."""
    body = {
        "model": "expert-beta",
        "messages": HELLO,
        "max_tokens": 5,
        "temperature": 1.0,
        "seed": 7,  # the same draws for the streamed request
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "ignore_eos": True,
    }
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
    assert whole.get("usage", {}).get("completion_tokens") == 10, whole
    stream_body = {**body, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=stream_body, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for choice in whole["choices"]:
        parts = [
            c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]
        ]
        assert choice["message"]["content"] == "".join(p["delta"].get("content") or "" for p in parts)
        logprobs = [t for p in parts if p.get("logprobs") for t in p["logprobs"]["content"]]
        assert len(choice["logprobs"]["content"]) == len(logprobs) == 5
        assert [t["token"] for t in choice["logprobs"]["content"]] == [t["token"] for t in logprobs]
        assert all(len(t["top_logprobs"]) == 2 for t in choice["logprobs"]["content"])


def test_openai_client_streams(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="expert-beta", prompt="SELECT", max_tokens=4, stream=True)
    assert sum(1 for _ in stream) >= 1


def test_json_schema_output_parses(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}},
        "required": ["score", "ok"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="expert-beta",
        messages=HELLO,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"score", "ok"} and 0 <= value["score"] <= 9 and isinstance(value["ok"], bool)


def test_manifest_grammar_applies_and_request_format_overrides_it(server: Server) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "expert-gram", "messages": HELLO}, timeout=120
    )
    assert r.json()["choices"][0]["message"]["content"] in ("yes", "no")
    assert "constraint=grammar (manifest)" in r.headers["x-expertserve-decoding"]
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=120,
        json={
            "model": "expert-gram",
            "messages": HELLO,
            "max_tokens": 30,
            "response_format": {"type": "json_object"},
        },
    )
    assert r.json()["choices"][0]["message"]["content"].startswith("{")
    assert "constraint=json_object (request)" in r.headers["x-expertserve-decoding"]


def test_stop_sequences_cut_the_output(client: openai.OpenAI) -> None:
    full = (
        client.completions.create(model="expert-beta", prompt="hello", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = full[3:6]
    assert stop and stop in full
    cut = client.completions.create(
        model="expert-beta", prompt="hello", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_vllm_length_extras_ignore_eos_and_min_tokens(server: Server) -> None:
    for prompt in ("hello", "a", "count to three"):
        body = {
            "model": "expert-beta",
            "prompt": prompt,
            "max_tokens": 24,
            "ignore_eos": True,
            "temperature": 0,
        }
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 24
    body = {"model": "expert-beta", "prompt": "hello", "max_tokens": 6, "min_tokens": 6}
    assert (
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["usage"][
            "completion_tokens"
        ]
        == 6
    )
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "min_tokens": -1}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_manifest_decoding_applies_and_requests_override_it(server: Server) -> None:
    body = {"model": "expert-alpha", "messages": HELLO, "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.headers["x-expertserve-expert"] == "expert-alpha"
    assert "temperature=0.1 (manifest)" in r.headers["x-expertserve-decoding"]
    assert "max_tokens=2 (request)" in r.headers["x-expertserve-decoding"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "temperature": 0.5}, timeout=120)
    assert "temperature=0.5 (request)" in r.headers["x-expertserve-decoding"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "model": TINY_ID}, timeout=120)
    assert "temperature=0.7 (default)" in r.headers["x-expertserve-decoding"]
    assert "temperature=0.1 (manifest)" in server.log.read_text()  # the server logs the same line


@pytest.mark.parametrize(
    ("model", "adapter", "soft"),
    [
        (TINY_ID, False, False),
        ("expert-beta", True, False),
        ("expert-delta", False, True),
        ("expert-alpha", True, True),
    ],
)
def test_greedy_parity_with_transformers_and_peft(
    server: Server, model: str, adapter: bool, soft: bool
) -> None:
    got = _greedy(server, model, "hello world")
    expert = server.expert(model) if model != TINY_ID else server.base
    want = reference_greedy(server.base, expert, "hello world", adapter, soft, len(got))
    assert got == want


def test_base_and_adapter_requests_mixed_in_one_batch_stay_correct(server: Server) -> None:
    cases = [(TINY_ID, False, False), ("expert-beta", True, False), ("expert-alpha", True, True)] * 4
    want = {
        m: reference_greedy(
            server.base, server.expert(m) if m != TINY_ID else server.base, "SELECT name", a, s, 10
        )
        for m, a, s in cases[:3]
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: (c[0], _greedy(server, c[0], "SELECT name", 10)), cases))
    for model, got in results:
        assert got == want[model][: len(got)], model


def _greedy(server: Server, model: str, prompt: str, n: int = 8) -> list[int]:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=120,
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": n,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    choice = r.json()["choices"][0]
    assert len(choice["token_ids"]) == n or choice["finish_reason"] == "stop"
    return choice["token_ids"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "expert-nope", "messages": HELLO}, 404, "model"),
        ({"model": "expert-dora", "messages": HELLO}, 400, "model"),
        ({"model": "expert-alpha", "messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "expert-alpha", "messages": HELLO, "temperature": "hot"}, 400, "temperature"),
        ({"model": "expert-alpha", "messages": "hi"}, 400, "messages"),
        ({"model": "expert-alpha", "messages": HELLO, "temprature": 0.2}, 400, "temprature"),
        (
            {
                "model": "expert-alpha",
                "messages": HELLO,
                "response_format": {"type": "json_object", "strict": True},
            },
            400,
            "response_format.strict",
        ),
        (
            {"model": "expert-alpha", "messages": HELLO, "tools": [{"type": "function"}]},
            400,
            "tools[0].function",
        ),
        (
            {"model": "expert-alpha", "messages": [{"role": "user", "content": "word " * 5000}]},
            400,
            "messages",
        ),
    ],
)
def test_client_mistakes_are_4xx_with_openai_bodies(
    server: Server, body: dict[str, Any], status: int, param: str
) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_oversized_and_uncompilable_requests(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b" " * 70000, headers={"content-type": "application/json"})
    assert r.status_code == 413
    bad_schema = {
        "type": "json_schema",
        "json_schema": {
            "name": "x",
            "schema": {
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                "required": ["a"],
            },
        },
    }
    r = httpx.post(
        url, json={"model": "expert-beta", "messages": HELLO, "response_format": bad_schema}, timeout=120
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == "response_format"
    ok = httpx.post(url, json={"model": "expert-beta", "messages": HELLO, "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200, "the server keeps serving after bad requests"


def test_experts_endpoint_reports_versions_decoding_and_hints(server: Server) -> None:
    data = {e["name"]: e for e in httpx.get(f"{server.url}/v1/experts").json()["data"]}
    assert data["expert-alpha"]["decoding"]["temperature"] == {"value": 0.1, "source": "manifest"}
    assert data["expert-alpha"]["soft_prompts"] == [{"name": "style", "tokens": 4}]
    assert data["expert-dora"]["servable"] is False and "DORA" in data["expert-dora"]["reason"]


def test_metrics_count_requests_per_expert(server: Server) -> None:
    httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "expert-beta", "messages": HELLO, "max_tokens": 1},
        timeout=120,
    )
    text = httpx.get(f"{server.url}/metrics").text
    assert 'expertserve_requests_total{expert="expert-beta",outcome="ok"}' in text
    assert "expertserve_ttft_seconds_bucket" in text and "expertserve_requests_in_flight" in text


def test_live_add_and_remove_of_an_expert(server: Server, client: openai.OpenAI) -> None:
    copy = server.experts / "expert-epsilon"
    shutil.copytree(server.expert("expert-beta"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["name"] = "expert-epsilon"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    r = httpx.post(f"{server.url}/admin/experts/reload")
    assert r.status_code == 200 and r.json()["added"] == ["expert-epsilon"]
    assert "expert-epsilon" in {m.id for m in client.models.list()}
    body = {"model": "expert-epsilon", "messages": HELLO, "max_tokens": 30, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        shutil.rmtree(copy)  # removed while a request is in flight
        assert httpx.post(f"{server.url}/admin/experts/reload").json()["removed"] == ["expert-epsilon"]
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["object"] == "chat.completion.chunk" and rest[-1] == "data: [DONE]"
    assert "error" not in "".join(rest), "the in-flight request finished normally"
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=120)
    assert r.status_code == 404


def test_echo_scoring_matches_the_models_own_prompt_logprobs(server: Server) -> None:
    """Prompt log probabilities over HTTP (echo + logprobs + max_tokens 0, a list of prompts) are the model's own:
    transformers' float32 forward pass on the same tokens. (vLLM's offline engine agreed within 1e-3 too; starting
    one here cost 45 s of the suite.)"""
    from tests.reference import reference_prompt_logprobs

    prompts = ["The capital of France is Paris", "SELECT name FROM users WHERE id = 1"]
    r = httpx.post(
        f"{server.url}/v1/completions",
        timeout=120,
        json={"model": TINY_ID, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0},
    )
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == prompts and r.json()["usage"]["completion_tokens"] == 0
    for choice, prompt in zip(choices, prompts, strict=True):
        tokens, want = reference_prompt_logprobs(server.base, prompt)
        got = choice["logprobs"]["token_logprobs"]
        assert got[0] is None and len(got) == len(tokens)
        assert max(abs(a - b) for a, b in zip(got[1:], want, strict=True)) < 1e-3


def test_sampled_logprobs_on_the_real_engine(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="expert-beta", messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:  # greedy: the token taken is the most likely one
        assert abs(t.logprob - max(a.logprob for a in t.top_logprobs)) < 1e-4
    text = client.completions.create(
        model="expert-beta", prompt="hello", max_tokens=3, logprobs=2, temperature=0
    )
    assert (
        len(text.choices[0].logprobs.tokens) == 3
        and "".join(text.choices[0].logprobs.tokens) == text.choices[0].text
    )


def test_echo_scoring_is_refused_for_soft_prompt_experts(server: Server) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions",
        timeout=120,
        json={"model": "expert-alpha", "prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 0},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_tool_calls_are_enforced_with_structured_outputs(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(
            model="expert-beta",
            messages=messages,
            tools=[WEATHER_TOOL],
            tool_choice=choice,
            max_tokens=40,
            temperature=0,
        )
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    stream = client.chat.completions.create(
        model="expert-beta",
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert (
        len(calls) == 1
        and calls[0].function.name == "get_weather"
        and chunks[-1].choices[0].finish_reason == ("tool_calls")
    )
    followup = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12 C and rain"},
    ]
    r = client.chat.completions.create(model="expert-beta", messages=followup, max_tokens=5)
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="expert-beta", messages=messages, tools=[WEATHER_TOOL])


def test_an_experts_declared_tools_are_its_default_call(client: openai.OpenAI, server: Server) -> None:
    """Manifest tools on the real engine: a request without tools calls the expert's function, its arguments
    valid against the declared schema; the request's tool_choice "none" or its own tools win (request > manifest)."""
    messages = [{"role": "user", "content": "Where is Oslo?"}]
    r = client.chat.completions.create(model="expert-tools", messages=messages)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup_city"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and len(arguments["city"]) <= 10
    plain = client.chat.completions.create(
        model="expert-tools", messages=messages, tool_choice="none", max_tokens=5
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    own = client.chat.completions.create(
        model="expert-tools", messages=messages, tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert own.choices[0].message.tool_calls[0].function.name == "get_weather"
    experts = httpx.get(f"{server.url}/v1/experts", timeout=30).json()["data"]
    info = next(e for e in experts if e["name"] == "expert-tools")
    assert info["tools"] == ["lookup_city"] and info["tool_choice"] == "lookup_city"


def test_an_expert_from_an_unsigned_package_is_not_served(client: openai.OpenAI, server: Server) -> None:
    """The trust policy on the real server: installed from an unsigned package, with no trusted keys configured."""
    listing = httpx.get(f"{server.url}/v1/experts", timeout=30).json()
    info = next(e for e in listing["data"] if e["name"] == "expert-unsigned")
    assert info["servable"] is False and "unsigned; trust its signer" in info["reason"]
    assert info["source"].startswith("package expert-unsigned-0.1.0.expert (unsigned)")
    with pytest.raises(openai.BadRequestError, match="unsigned"):
        client.chat.completions.create(model="expert-unsigned", messages=HELLO, max_tokens=2)


def test_langchain_chat_openai_with_a_tool_call(server: Server) -> None:
    """LangChain's ChatOpenAI, as agent frameworks call us: plain chat, then a bound tool it must call (an OpenAI
    tool schema with a bounded string: the tiny random model would otherwise write one string until max_tokens)."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        model="expert-beta",
        max_tokens=40,
        temperature=0,
        max_retries=0,
    )
    assert isinstance(llm.invoke("hello").content, str)
    message = llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke("What is the weather in Oslo?")
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] == "get_weather", message
    assert set(message.tool_calls[0]["args"]) == {"city"}
    assert message.response_metadata["model_name"] == "expert-beta"


def test_metrics_include_vllms_engine_series(server: Server) -> None:
    """vLLM's engine metrics (through Ray's metrics, labelled by engine replica) appear in /metrics, and every
    vLLM series the Grafana dashboard reads is among them."""
    import re
    import time

    httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=120,
        json={"model": "expert-beta", "messages": HELLO, "max_tokens": 2},
    )
    deadline = time.monotonic() + 60  # Ray exports its metrics every few seconds
    text = ""
    # Gauges appear at vLLM's next stats interval, after the histograms of the request.
    while time.monotonic() < deadline and not all(
        f"{n}{{" in text
        for n in (
            "ray_vllm_num_requests_running",
            "ray_vllm_kv_cache_usage_perc",
            "ray_vllm_time_to_first_token_seconds_bucket",
        )
    ):
        time.sleep(2)
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_vllm_")}
    assert "ray_vllm_num_requests_running" in names and "ray_vllm_kv_cache_usage_perc" in names, sorted(names)
    assert re.search(r'ray_vllm_num_requests_running\{[^}]*ReplicaId="', text)
    dashboard = (REPO / "k8s" / "monitoring" / "grafana-dashboard.json").read_text()
    # Prefix-cache series exist only where prefix caching is on (not on this server).
    wanted = {n for n in re.findall(r"ray_vllm_\w+", dashboard) if "prefix_cache" not in n}
    assert wanted <= names, sorted(wanted - names)


def test_responses_name_the_engine_replica_and_the_expert_generation(server: Server) -> None:
    body = {"model": "expert-beta", "messages": HELLO, "max_tokens": 3}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["x-expertserve-replica"]
    assert int(r.headers["x-expertserve-generation"]) >= 0
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as s:
        assert s.headers["x-expertserve-replica"] == r.headers["x-expertserve-replica"]  # one engine replica
    models = httpx.get(f"{server.url}/v1/models", timeout=30)
    assert models.headers["x-expertserve-generation"] == r.headers["x-expertserve-generation"]


def test_serves_data_plane_runs_over_its_grpc_channels(server: Server) -> None:
    """`expertserve serve` starts Ray with Serve's gRPC switch (`grpc_data_plane`, on by default), so its proxy
    and replicas, which read it when they start, carry requests over gRPC instead of Ray actor calls."""
    import psutil

    from expertserve.serve.transport import GRPC_SWITCH

    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
    serving = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith(("ray::ProxyActor", "ray::ServeReplica:expertserve:")):
            try:
                serving.append((title, proc.environ().get(GRPC_SWITCH)))
            except psutil.NoSuchProcess:  # another test's server ending now
                continue
    assert {t.split()[0] for t, _ in serving} >= {
        "ray::ProxyActor",
        "ray::ServeReplica:expertserve:Ingress",
        "ray::ServeReplica:expertserve:ExpertEngine",
    }, serving
    assert all(value == "1" for _, value in serving), serving
