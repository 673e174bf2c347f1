"""OpenAI bodies and SSE framing from engine chunks (pure)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from expertserve.engine.request import Chunk, TokenLogprob
from expertserve.serve.responses import (
    SSE_DONE,
    ResponseMeta,
    chunk_body,
    full_response,
    sse,
    usage,
    usage_body,
)

CHAT = ResponseMeta.new("chat", "abc", 1700000000, "expert-sql", n=2)
TEXT = ResponseMeta.new("completion", "abc", 1700000000, "expert-sql", n=2)


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
    body = full_response(dataclasses.replace(CHAT, token_ids=True), 2, chunks())
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
    totals = usage({0: (7, 3), 1: (7, 2)}, n=2)
    assert totals == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert usage({}) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    body = usage_body(CHAT, totals)
    assert body["choices"] == [] and body["usage"] == totals
    event = sse(body)
    assert event.startswith("data: ") and event.endswith("\n\n") and json.loads(event[6:]) == body
    assert SSE_DONE == "data: [DONE]\n\n"


def test_several_prompts_count_each_prompt_once_and_index_as_openai() -> None:
    assert usage({0: (3, 1), 1: (3, 2), 2: (5, 1), 3: (5, 1)}, n=2)["prompt_tokens"] == 8
    meta = ResponseMeta.new("completion", "x", 1, "expert-sql", n=1, echo=("p0 ", "p1 "))
    body = full_response(meta, 2, [Chunk(1, "b", (2,), "stop", 5, 1), Chunk(0, "a", (1,), "stop", 3, 1)])
    assert [c["text"] for c in body["choices"]] == ["p0 a", "p1 b"]
    assert body["usage"]["prompt_tokens"] == 8


def test_roles_once_fingerprint_and_token_ids_in_streams() -> None:
    meta = ResponseMeta.new(
        "chat", "x", 1, "expert-sql", fingerprint="expertserve-0.1.0:expert-sql@1.0.0", token_ids=True
    )
    first = chunk_body(meta, Chunk(0, "a", (7,), None, 3, 1), first=True)
    later = chunk_body(meta, Chunk(0, "b", (8,), "stop", 3, 2))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert later["choices"][0]["delta"] == {"content": "b"}
    assert first["system_fingerprint"] == "expertserve-0.1.0:expert-sql@1.0.0"
    assert (first["choices"][0]["token_ids"], later["choices"][0]["token_ids"]) == ([7], [8])


def test_logprobs_in_chat_and_completion_shapes_with_echo() -> None:
    sampled = (TokenLogprob("SEL", 1, -0.5, (("SEL", 1, -0.5), ("sel", 2, -1.5))),)
    prompt = (TokenLogprob("Q", 9, None), TokenLogprob(":", 10, -2.0, ((":", 10, -2.0), (";", 11, -3.0))))
    chunk = Chunk(0, "SEL", (1,), "length", 2, 1, logprobs=sampled, prompt_logprobs=prompt)
    chat = full_response(ResponseMeta.new("chat", "x", 1, "m", logprobs=True), 1, [chunk])
    content = chat["choices"][0]["logprobs"]["content"]
    assert content == [
        {
            "token": "SEL",
            "logprob": -0.5,
            "bytes": [83, 69, 76],
            "top_logprobs": [
                {"token": "SEL", "logprob": -0.5, "bytes": [83, 69, 76]},
                {"token": "sel", "logprob": -1.5, "bytes": [115, 101, 108]},
            ],
        }
    ]
    meta = ResponseMeta.new("completion", "x", 1, "m", logprobs=True, echo=("Q:",))
    text = full_response(meta, 1, [chunk])["choices"][0]
    assert text["text"] == "Q:SEL"
    assert text["logprobs"] == {
        "tokens": ["Q", ":", "SEL"],
        "token_logprobs": [None, -2.0, -0.5],
        "top_logprobs": [None, {":": -2.0, ";": -3.0}, {"SEL": -0.5, "sel": -1.5}],
        "text_offset": [0, 1, 2],
    }
    assert full_response(ResponseMeta.new("chat", "x", 1, "m"), 1, [chunk])["choices"][0]["logprobs"] is None
