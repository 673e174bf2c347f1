"""OpenAI response bodies and server-sent-event framing from engine chunks. Pure Python.

Chat completions and completions share one shape here; `kind` picks the object names and where the text goes
(`message`/`delta` for chat, `text` for completions) and the shape of log probabilities (chat's `content` list,
completions' parallel `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists). With several prompts in
one completions request, choice `i * n + j` is choice `j` of prompt `i`, as OpenAI indexes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from expertserve.engine.request import Chunk, Kind, TokenLogprob
from expertserve.serve.tools import ToolPlan, tool_call

SSE_DONE = "data: [DONE]\n\n"
INTERNAL_ERROR = {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}}


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats, and how its choices are built.

    Attributes:
        kind: `chat` or `completion`.
        id: The response id (`chatcmpl-...` or `cmpl-...`).
        created: Unix time the response was created.
        model: The model that answered (the expert's name, or the base model id).
        fingerprint: `system_fingerprint`: the server and the expert version that answered.
        n: Choices per prompt.
        logprobs: Whether the client asked for log probabilities.
        token_ids: Whether the client asked for each choice's token ids (`return_token_ids`).
        echo: The prompts to put before each choice's text (completions `echo`); empty: none.
        tools: The enforced tool call: each choice's output is its arguments, answered as `tool_calls`.
    """

    kind: Kind
    id: str
    created: int
    model: str
    fingerprint: str | None = None
    n: int = 1
    logprobs: bool = False
    token_ids: bool = False
    echo: tuple[str, ...] = field(default=())
    tools: ToolPlan | None = None

    @classmethod
    def new(cls, kind: Kind, request_id: str, created: int, model: str, **options: Any) -> ResponseMeta:
        """The meta of a response to engine request `request_id`."""
        return cls(
            kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}", created, model, **options
        )

    def object(self, chunk: bool) -> str:
        """OpenAI's `object` of a full body or a streamed chunk."""
        if self.kind == "completion":
            return "text_completion"
        return "chat.completion.chunk" if chunk else "chat.completion"

    def envelope(self, chunk: bool) -> dict[str, Any]:
        """The fields every body starts with."""
        out = {"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model}
        if self.fingerprint:
            out["system_fingerprint"] = self.fingerprint
        return out

    def echoed(self, index: int) -> str:
        """The prompt choice `index` echoes ("" without echo)."""
        return self.echo[index // self.n] if self.echo else ""


def usage(per_choice: Mapping[int, tuple[int, int]], n: int = 1) -> dict[str, int]:
    """OpenAI usage from each choice's (prompt tokens, completion tokens): each prompt counts once."""
    prompts = {index // n: tokens for index, (tokens, _) in sorted(per_choice.items())}
    prompt = sum(prompts.values())
    completion = sum(c for _, c in per_choice.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]} (sampled tokens only)."""
    return {
        "content": [
            {**_token(e.token, e.logprob), "top_logprobs": [_token(t, lp) for t, _, lp in e.top]}
            for e in entries
        ]
    }


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Completions' `logprobs`: parallel lists; the first prompt token when echoed has a null log probability
    (nothing precedes it). `text_offset` counts characters of the returned text, from `offset`."""
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    position = offset
    for e in entries:
        tokens.append(e.token)
        logprobs.append(e.logprob)
        tops.append({t: lp for t, _, lp in e.top} if e.logprob is not None else None)
        offsets.append(position)
        position += len(e.token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _token(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}


def chunk_body(meta: ResponseMeta, chunk: Chunk, *, first: bool = False, offset: int = 0) -> dict[str, Any]:
    """One streamed chunk; `first` marks the first chunk of its choice (chat sends the role once, echo the
    prompt once); `offset` is how much text the choice has sent before (completions' `text_offset`)."""
    text = (meta.echoed(chunk.index) if first else "") + chunk.text
    if meta.kind == "chat":
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice: dict[str, Any] = {
            "index": chunk.index,
            "delta": delta,
            "finish_reason": chunk.finish_reason,
            "logprobs": chat_logprobs(chunk.logprobs) if meta.logprobs else None,
        }
    else:
        entries = (*chunk.prompt_logprobs, *chunk.logprobs) if first else chunk.logprobs
        choice = {
            "index": chunk.index,
            "text": text,
            "finish_reason": chunk.finish_reason,
            "logprobs": completion_logprobs(entries, offset) if meta.logprobs else None,
        }
    if meta.token_ids:
        choice["token_ids"] = list(chunk.token_ids)
    return {**meta.envelope(chunk=True), "choices": [choice]}


def tool_call_chunk(meta: ResponseMeta, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    """A streamed tool call: one chunk with the whole call once the arguments are complete (they are only a call
    once they parse), or the text as content when they were cut short."""
    call = tool_call(meta.tools, text) if meta.tools is not None else None
    if call is None:
        delta: dict[str, Any] = {"role": "assistant", "content": text}
    else:
        delta = {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]}
        finish_reason = "tool_calls"
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {**meta.envelope(chunk=True), "choices": [choice]}


def usage_body(meta: ResponseMeta, totals: dict[str, int]) -> dict[str, Any]:
    """The last streamed chunk when the client asked for usage (`stream_options.include_usage`)."""
    return {**meta.envelope(chunk=True), "choices": [], "usage": totals}


def full_response(meta: ResponseMeta, choices: int, chunks: Iterable[Chunk]) -> dict[str, Any]:
    """The non-streamed body: every choice's chunks joined.

    Args:
        meta: The response's id, time, model and options.
        choices: Choices in all (prompts x n).
        chunks: Every chunk the engines sent, in order, indexed across prompts.
    """
    texts = [meta.echoed(i) for i in range(choices)]
    reasons: list[str | None] = [None] * choices
    ids: list[list[int]] = [[] for _ in range(choices)]
    entries: list[list[TokenLogprob]] = [[] for _ in range(choices)]
    sampled: list[list[TokenLogprob]] = [[] for _ in range(choices)]
    per_choice: dict[int, tuple[int, int]] = {}
    for c in chunks:
        texts[c.index] += c.text
        ids[c.index] += c.token_ids
        entries[c.index] += [*c.prompt_logprobs, *c.logprobs]
        sampled[c.index] += c.logprobs
        reasons[c.index] = c.finish_reason or reasons[c.index]
        per_choice[c.index] = (c.prompt_tokens, c.completion_tokens)
    out: list[dict[str, Any]] = []
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        if meta.kind == "chat":
            body: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
            logprobs = chat_logprobs(sampled[i]) if meta.logprobs else None
            call = tool_call(meta.tools, text) if meta.tools is not None else None
            if call is not None:
                body = {"message": {"role": "assistant", "content": None, "tool_calls": [call]}}
                reason = "tool_calls"
        else:
            body = {"text": text}
            logprobs = completion_logprobs(entries[i]) if meta.logprobs else None
        out.append({"index": i, **body, "finish_reason": reason, "logprobs": logprobs})
        if meta.token_ids:
            out[-1]["token_ids"] = ids[i]
    return {**meta.envelope(chunk=False), "choices": out, "usage": usage(per_choice, meta.n)}


def sse(body: Mapping[str, Any]) -> str:
    """One server-sent event."""
    return "data: " + json.dumps(body) + "\n\n"
