"""OpenAI-compatible request bodies, validated strictly. Pure Python (pydantic only).

Unknown fields are 400 errors that name the field (a misspelt `temprature` must not be silently ignored);
OpenAI fields that expertserve does not implement (tools, logit_bias, ...) are refused with the reason when they
ask for something, and dropped when they hold an empty default. vLLM's sampling extras (`top_k`, `min_p`,
`repetition_penalty`) are accepted at the top level.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from expertserve.engine.request import MAX_LOGPROBS
from expertserve.manifest.base import Bool, Int, Num, Str
from expertserve.serve.errors import RequestError

# OpenAI fields clients may send that expertserve does not implement, with the reason given back when they ask
# for something. SDKs and frameworks send many of them as empty defaults (`"tools": []`, `"logit_bias": null`,
# `"parallel_tool_calls": false`): a value that asks for nothing (listed in NO_OP) means "not given" and is dropped.
UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "logit_bias": "logit_bias is not supported",
    "prompt_embeds": "clients cannot send embeddings; soft prompts belong to experts on the server",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "best_of": "best_of is not supported; use n",
    "audio": "audio output is not supported",
    "modalities": "only text is supported",
    "prediction": "predicted outputs are not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "service_tier": "service tiers are not offered",
    "store": "stored completions are not offered",
    "metadata": "stored completions are not offered",
    "reasoning_effort": "the models served here do not reason in a separate channel",
    "web_search_options": "web search is not offered",
}
# Values that ask for nothing, besides null, false, "", [] and {}.
_NO_OP_FOR: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "modalities": (["text"],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "service_tier": ("auto", "default"),
}


def _asks_nothing(key: str, value: Any) -> bool:
    """Whether an unsupported field holds an empty default (type-exact: 0 is not false)."""
    return value is None or any(
        value == v and type(value) is type(v) for v in (False, "", [], {}, *_NO_OP_FOR.get(key, ()))
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    """`stream_options`."""

    include_usage: Bool = Field(default=False, description="Send a last chunk with token usage.")


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`."""

    name: Str = Field(min_length=1, max_length=64, description="Schema name.")
    description: Str | None = Field(default=None, description="What the schema describes.")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema the output must match.")
    strict: Bool | None = Field(default=None, description="OpenAI strict mode (output always matches here).")


class ResponseFormat(_Strict):
    """`response_format`: text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="Output format.")
    json_schema: JsonSchemaFormat | None = Field(default=None, description="Required for type json_schema.")

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is 'json_schema'")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema: only allowed when type is 'json_schema', not {self.type!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The form `expertserve.decoding.resolve_constraint` takes."""
        out: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        return out


class ToolCallFunction(_Strict):
    """`tool_calls[].function` of an assistant message."""

    name: Str = Field(description="The function called.")
    arguments: Str = Field(description="Its arguments, as JSON text.")


class ToolCall(_Strict):
    """One tool call an assistant made earlier in the conversation."""

    id: Str = Field(description="The call's id (tool messages answer it).")
    type: Literal["function"] = Field(description="Only functions.")
    function: ToolCallFunction = Field(description="What was called.")


class ChatMessage(_Strict):
    """One chat message (text content only)."""

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Author.")
    content: Str | list[dict[str, Any]] | None = Field(
        default=None,
        description="Text, or a list of {'type': 'text', 'text': ...} parts (null with tool_calls).",
    )
    name: Str | None = Field(default=None, description="Optional author name.")
    tool_calls: list[ToolCall] | None = Field(default=None, description="Calls an assistant made.")
    tool_call_id: Str | None = Field(default=None, description="The call a tool message answers.")

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages make tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: required in a tool message")
        if self.content is None and not self.tool_calls:
            raise ValueError("content: required (it may be null only with tool_calls)")
        return self

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, list):
            for i, part in enumerate(value):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"part {i} is not text; only {{'type': 'text', 'text': ...}} parts are supported"
                    )
        return value

    def text(self) -> str:
        """The content as one string ("" when null)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p["text"] for p in self.content)


class FunctionDefinition(_Strict):
    """`tools[].function`."""

    name: Str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Function name.")
    description: Str | None = Field(default=None, description="What it does (shown to the model).")
    parameters: dict[str, Any] | None = Field(default=None, description="JSON schema of its arguments.")
    strict: Bool | None = Field(default=None, description="OpenAI strict mode (arguments always match here).")


class Tool(_Strict):
    """One entry of `tools`."""

    type: Literal["function"] = Field(description="Only functions.")
    function: FunctionDefinition = Field(description="The function.")


class NamedFunction(_Strict):
    """`tool_choice.function`."""

    name: Str = Field(description="The function to call.")


class NamedToolChoice(_Strict):
    """`tool_choice` naming one function."""

    type: Literal["function"] = Field(description="Only functions.")
    function: NamedFunction = Field(description="The function to call.")


StopString = Annotated[Str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=16)]
# Integers the engine takes: vLLM keeps token counts in 32-bit and seeds in torch's int64; beyond these it fails
# with an internal error instead of refusing the value.
MAX_INT32 = 2**31 - 1
# Prompts in one completions request; each is one engine request.
MAX_PROMPTS = 64
MAX_SEQUENCES = 64  # prompts x n in one request
INT64 = (-(2**63), 2**63 - 1)


class SamplingFields(_Strict):
    """Fields shared by chat and completions. None means "not given" (manifest or default applies)."""

    model: Str = Field(min_length=1, description="Expert name, base model id, or 'auto'.")
    max_tokens: Int | None = Field(default=None, ge=1, le=MAX_INT32, description="Most tokens to generate.")
    temperature: Num | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")
    top_p: Num | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: Int | None = Field(
        default=None, ge=-1, le=MAX_INT32, description="Top-k (vLLM extra; 0 or -1: no limit)."
    )
    min_p: Num | None = Field(default=None, ge=0, le=1, description="Min-p (vLLM extra).")
    repetition_penalty: Num | None = Field(default=None, gt=0, le=2, description="Repetition penalty (vLLM).")
    presence_penalty: Num | None = Field(default=None, ge=-2, le=2, description="Presence penalty.")
    frequency_penalty: Num | None = Field(default=None, ge=-2, le=2, description="Frequency penalty.")
    stop: Stop | None = Field(default=None, description="Stop string(s).")
    seed: Int | None = Field(
        default=None, ge=INT64[0], le=INT64[1], description="Sampling seed (reproducible per request)."
    )
    n: Int = Field(default=1, ge=1, le=8, description="Choices to generate.")
    stream: Bool = Field(default=False, description="Server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    user: Str | None = Field(
        default=None, max_length=256, description="End-user id (logged with the request)."
    )
    return_token_ids: Bool = Field(default=False, description="Extra: add each choice's generated token ids.")
    ignore_eos: Bool = Field(
        default=False, description="vLLM extra: go on past end-of-sequence (fixed-length benchmarks)."
    )
    min_tokens: Int | None = Field(
        default=None, ge=0, le=MAX_INT32, description="vLLM extra: generate at least this many tokens."
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key, reason in UNSUPPORTED.items():
                if key in cls.model_fields:  # supported by this endpoint (tools in chat)
                    continue
                if key in data and _asks_nothing(key, data[key]):
                    del data[key]  # an empty default: not given
                elif key in data:
                    raise ValueError(f"{key}: {reason}")
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stop_list(self) -> list[str] | None:
        """`stop` as a list (None when not given)."""
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_request(self) -> dict[str, Any]:
        """The request's sampling values for `expertserve.decoding.resolve`."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "max_tokens": self.max_tokens,
            "stop": self.stop_list(),
        }


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation.")
    response_format: ResponseFormat | None = Field(default=None, description="Output format constraint.")
    max_completion_tokens: Int | None = Field(
        default=None, ge=1, le=MAX_INT32, description="Alias of max_tokens (newer clients)."
    )
    tools: list[Tool] | None = Field(
        default=None, max_length=128, description="Functions the model may call."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="none, auto (default with tools), required, or one named function."
    )
    parallel_tool_calls: Bool | None = Field(
        default=None, description="Allowed; expertserve makes one call per choice."
    )
    logprobs: Bool | None = Field(default=None, description="Return each sampled token's log probability.")
    top_logprobs: Int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="Alternatives per position (needs logprobs: true)."
    )

    def sample_logprobs(self) -> int | None:
        """vLLM's `logprobs`: alternatives per sampled token, or None for none."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def tools_dicts(self) -> list[dict[str, Any]]:
        """`tools` as plain JSON."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def tool_choice_value(self) -> Any:
        """`tool_choice` as plain JSON (None when not given)."""
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    @model_validator(mode="after")
    def _alias_max_tokens(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_completion_tokens: differs from max_tokens; send one of them")
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: Str | Annotated[list[Str], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description="The prompt, or a list of prompts (each gets its own n choices, indexed prompt * n + choice)."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="Output format constraint (extra)."
    )
    max_tokens: Int | None = Field(
        default=None, ge=0, le=MAX_INT32, description="Most tokens to generate (0 only with echo: scoring)."
    )
    logprobs: Int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="Log probabilities with this many alternatives."
    )
    echo: Bool = Field(
        default=False, description="Put the prompt before the completion (with logprobs: scored)."
    )

    @model_validator(mode="after")
    def _zero_tokens_only_to_score(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (to score the prompt)")
        return self

    @model_validator(mode="after")
    def _bounded_sequences(self) -> CompletionRequest:
        # 64 prompts x n=8 with ignore_eos was 512 sequences to the context's end from one request.
        asked = len(self.prompts()) * self.n
        if asked > MAX_SEQUENCES:
            raise ValueError(
                f"n: {len(self.prompts())} prompt(s) x n={self.n} asks for {asked} sequences; one request may ask "
                f"for at most {MAX_SEQUENCES} (send fewer prompts or a smaller n, or several requests)"
            )
        return self

    def prompts(self) -> list[str]:
        """The prompts, in order."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def prompt_text(self) -> str:
        """The first prompt (what routing reads)."""
        return self.prompts()[0]

    def sample_logprobs(self) -> int | None:
        """vLLM's `logprobs`: alternatives per sampled token, or None for none."""
        return self.logprobs

    def sampling_request(self) -> dict[str, Any]:
        """As for chat, but `max_tokens: 0` (scoring) resolves as not given: nothing is generated."""
        values = super().sampling_request()
        if values["max_tokens"] == 0:
            values["max_tokens"] = None
        return values


def request_errors(error: ValidationError) -> list[tuple[str, str]]:
    """(parameter, message) for each problem of a request body, e.g. ("messages[0].role", "input should be ...")."""
    from expertserve.manifest.load import locate

    out = []
    for err in error.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        path, text = locate(err, msg)
        if len(path) > MAX_PARAM_SHOWN:  # a client's key, echoed: a 500 KB key must not come back whole
            path = path[:MAX_PARAM_SHOWN] + "..."
        out.append((path, text[0].lower() + text[1:] if text else text))
    return out


MAX_PARAM_SHOWN = 128


class EngineRestartRequest(_Strict):
    """The body of `POST /admin/engines/restart` (every field optional: an empty body restarts for what the
    experts need)."""

    max_lora_rank: Int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="Largest LoRA rank the engines must hold after the restart (at least what the experts need).",
    )
    prefix_caching: Bool | None = Field(
        default=None, description="true: the engines run with prefix caching after the restart."
    )


def parse_engine_restart(body: dict[str, Any]) -> EngineRestartRequest:
    """The validated body of `POST /admin/engines/restart`.

    Raises:
        RequestError: 400 naming the first field at fault.
    """
    try:
        return EngineRestartRequest.model_validate(body)
    except ValidationError as e:
        param, message = request_errors(e)[0]
        raise RequestError(400, f"{param}: {message}" if param else message, param=param or None) from None


def parse_request(kind: str, body: dict[str, Any]) -> ChatCompletionRequest | CompletionRequest:
    """The validated body of `POST /v1/chat/completions` (`chat`) or `/v1/completions` (`completion`).

    Raises:
        RequestError: 400 naming the first parameter at fault.
    """
    cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        param, message = request_errors(e)[0]
        raise RequestError(400, f"{param}: {message}" if param else message, param=param or None) from None
