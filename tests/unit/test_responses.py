"""OpenAI bodies and SSE framing from engine chunks (pure)."""

from __future__ import annotations

import json

import pytest

from expertserve.engine.request import Chunk
from expertserve.serve.responses import (
    SSE_DONE,
    ResponseMeta,
    chunk_body,
    full_response,
    sse,
    usage,
    usage_body,
)

CHAT = ResponseMeta.new("chat", "abc", 1700000000, "expert-sql")
TEXT = ResponseMeta.new("completion", "abc", 1700000000, "expert-sql")


def chunks() -> list[Chunk]:
    """Two choices, interleaved as vLLM streams them."""
    return [
        Chunk(0, "SEL", (1,), None, 7, 1),
        Chunk(1, "sel", (4,), None, 7, 1),
        Chunk(0, "ECT", (2, 3), "stop", 7, 3),
        Chunk(1, "ect", (5,), "length", 7, 2),
    ]


def test_ids_and_object_names_follow_openai() -> None:
    assert (CHAT.id, CHAT.object(chunk=False), CHAT.object(chunk=True)) == (
        "chatcmpl-abc",
        "chat.completion",
        "chat.completion.chunk",
    )
    assert (TEXT.id, TEXT.object(chunk=False), TEXT.object(chunk=True)) == (
        "cmpl-abc",
        "text_completion",
        "text_completion",
    )


def test_full_chat_response_joins_each_choice_and_counts_the_prompt_once() -> None:
    body = full_response(CHAT, 2, chunks(), token_ids=True)
    assert body["id"] == "chatcmpl-abc" and body["model"] == "expert-sql" and body["created"] == 1700000000
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "SELECT"},
            "finish_reason": "stop",
            "logprobs": None,
            "token_ids": [1, 2, 3],
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "select"},
            "finish_reason": "length",
            "logprobs": None,
            "token_ids": [4, 5],
        },
    ]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_full_completion_response_has_text_and_no_token_ids_unless_asked() -> None:
    body = full_response(TEXT, 2, chunks())
    assert [c["text"] for c in body["choices"]] == ["SELECT", "select"]
    assert all("token_ids" not in c and "message" not in c for c in body["choices"])


def test_a_choice_with_no_output_is_still_listed() -> None:
    body = full_response(CHAT, 2, chunks()[:1])
    assert body["choices"][1]["message"]["content"] == "" and body["choices"][1]["finish_reason"] is None


@pytest.mark.parametrize(("meta", "key"), [(CHAT, "delta"), (TEXT, "text")])
def test_stream_chunks(meta: ResponseMeta, key: str) -> None:
    body = chunk_body(meta, chunks()[2])
    assert body["object"] == meta.object(chunk=True) and len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    assert (choice[key]["content"] if key == "delta" else choice[key]) == "ECT"


def test_usage_chunk_and_framing() -> None:
    totals = usage({0: (7, 3), 1: (7, 2)})
    assert totals == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert usage({}) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    body = usage_body(CHAT, totals)
    assert body["choices"] == [] and body["usage"] == totals
    event = sse(body)
    assert event.startswith("data: ") and event.endswith("\n\n") and json.loads(event[6:]) == body
    assert SSE_DONE == "data: [DONE]\n\n"
