"""OpenAI request bodies: strict validation that names the parameter."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from expertserve.serve.protocol import ChatCompletionRequest, CompletionRequest, request_errors

CHAT = {"model": "expert-sql", "messages": [{"role": "user", "content": "hi"}]}


def errors(body: dict[str, Any], cls: type = ChatCompletionRequest) -> list[tuple[str, str]]:
    try:
        cls.model_validate(body)
    except ValidationError as e:
        return request_errors(e)
    return []


def test_minimal_chat_and_completion() -> None:
    assert errors(CHAT) == []
    assert errors({"model": "m", "prompt": "x"}, CompletionRequest) == []
    assert CompletionRequest(model="m", prompt=["x"]).prompt_text() == "x"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
        ({"temprature": 0.1}, "temprature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}, "extra": 1},
                }
            },
            "response_format.json_schema.extra",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ],
)
def test_bad_fields_are_named(change: dict[str, Any], where: str) -> None:
    found = errors({**CHAT, **change})
    assert found, "should be invalid"
    assert any(loc == where for loc, _ in found), found


@pytest.mark.parametrize("field", ["audio", "logit_bias", "prompt_embeds", "functions"])
def test_unsupported_openai_fields_are_refused_with_a_reason(field: str) -> None:
    [(where, msg)] = errors({**CHAT, field: [{"x": 1}] if field != "logit_bias" else {"1": 2}})
    assert where == field and ("not supported" in msg or "cannot send" in msg)


def test_vllm_extras_and_aliases() -> None:
    r = ChatCompletionRequest.model_validate(
        {**CHAT, "top_k": 5, "min_p": 0.1, "max_completion_tokens": 9, "stop": ";"}
    )
    assert r.max_tokens == 9 and r.stop_list() == [";"]
    sampling = r.sampling_request()
    assert (sampling["top_k"], sampling["min_p"], sampling["temperature"]) == (5, 0.1, None)


def test_response_format_as_constraint_input() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "object"}},
            },
        }
    )
    assert r.response_format.as_dict() == {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": {"type": "object"}},
    }


def test_text_parts_are_joined() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            **CHAT,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        }
    )
    assert r.messages[0].text() == "ab"


def test_one_request_asks_for_at_most_64_sequences() -> None:
    """Finding 10 of the security issue: 64 prompts x n=8 with ignore_eos was 512 sequences from one request."""
    from expertserve.serve.errors import RequestError
    from expertserve.serve.protocol import MAX_SEQUENCES, parse_request

    body = {"model": "m", "prompt": ["p"] * 64, "n": 8, "ignore_eos": True, "max_tokens": 16}
    with pytest.raises(RequestError) as info:
        parse_request("completion", body)
    assert (
        info.value.status == 400
        and "512 sequences" in info.value.message
        and str(MAX_SEQUENCES) in info.value.message
    )
    assert parse_request("completion", {**body, "n": 1}).n == 1
    assert parse_request("completion", {**body, "prompt": ["p"] * 8}).n == 8
