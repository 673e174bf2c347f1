"""OpenAI response bodies and server-sent-event framing from engine chunks. Pure Python.

Chat completions and completions share one shape here; `kind` picks the object names and where the text goes
(`message`/`delta` for chat, `text` for completions).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from expertserve.engine.request import Chunk, Kind

SSE_DONE = "data: [DONE]\n\n"
INTERNAL_ERROR = {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}}


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats.

    Attributes:
        kind: `chat` or `completion`.
        id: The response id (`chatcmpl-...` or `cmpl-...`).
        created: Unix time the response was created.
        model: The model name the client asked for.
    """

    kind: Kind
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, kind: Kind, request_id: str, created: int, model: str) -> ResponseMeta:
        """The meta of a response to engine request `request_id`."""
        return cls(kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}", created, model)

    def object(self, chunk: bool) -> str:
        """OpenAI's `object` of a full body or a streamed chunk."""
        if self.kind == "completion":
            return "text_completion"
        return "chat.completion.chunk" if chunk else "chat.completion"

    def envelope(self, chunk: bool) -> dict[str, Any]:
        """The fields every body starts with."""
        return {"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model}


def usage(per_choice: Mapping[int, tuple[int, int]]) -> dict[str, int]:
    """OpenAI usage from each choice's (prompt tokens, completion tokens): the prompt counts once."""
    prompt = next(iter(per_choice.values()))[0] if per_choice else 0
    completion = sum(c for _, c in per_choice.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk_body(meta: ResponseMeta, chunk: Chunk) -> dict[str, Any]:
    """One streamed chunk."""
    if meta.kind == "chat":
        choice: dict[str, Any] = {
            "index": chunk.index,
            "delta": {"role": "assistant", "content": chunk.text},
            "finish_reason": chunk.finish_reason,
            "logprobs": None,
        }
    else:
        choice = {
            "index": chunk.index,
            "text": chunk.text,
            "finish_reason": chunk.finish_reason,
            "logprobs": None,
        }
    return {**meta.envelope(chunk=True), "choices": [choice]}


def usage_body(meta: ResponseMeta, totals: dict[str, int]) -> dict[str, Any]:
    """The last streamed chunk when the client asked for usage (`stream_options.include_usage`)."""
    return {**meta.envelope(chunk=True), "choices": [], "usage": totals}


def full_response(
    meta: ResponseMeta, n: int, chunks: Iterable[Chunk], token_ids: bool = False
) -> dict[str, Any]:
    """The non-streamed body: every choice's chunks joined.

    Args:
        meta: The response's id, time and model.
        n: Choices requested.
        chunks: Every chunk the engine sent, in order.
        token_ids: Add each choice's generated token ids (`return_token_ids`).
    """
    texts = [""] * n
    reasons: list[str | None] = [None] * n
    ids: list[list[int]] = [[] for _ in range(n)]
    per_choice: dict[int, tuple[int, int]] = {}
    for c in chunks:
        texts[c.index] += c.text
        ids[c.index] += c.token_ids
        reasons[c.index] = c.finish_reason or reasons[c.index]
        per_choice[c.index] = (c.prompt_tokens, c.completion_tokens)
    choices: list[dict[str, Any]] = []
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        body = {"message": {"role": "assistant", "content": text}} if meta.kind == "chat" else {"text": text}
        choices.append({"index": i, **body, "finish_reason": reason, "logprobs": None})
        if token_ids:
            choices[-1]["token_ids"] = ids[i]
    return {**meta.envelope(chunk=False), "choices": choices, "usage": usage(per_choice)}


def sse(body: Mapping[str, Any]) -> str:
    """One server-sent event."""
    return "data: " + json.dumps(body) + "\n\n"
