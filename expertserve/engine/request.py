"""What crosses the Ray boundary between the ingress and an engine replica. Pure Python (no ray, vllm or torch).

Frozen dataclasses only: the ingress resolves everything (expert, decoding with sources, output constraint) and
the engine applies it as given, so no value is rebuilt or defaulted twice on the way. `Chunk` is what the engine
streams back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from expertserve.decoding import PARAMETERS, Constraint, Resolved
from expertserve.errors import InvalidSampling

Kind = Literal["chat", "completion"]
Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ExpertSpec:
    """One expert version as an engine loads it.

    Attributes:
        name: Expert name.
        version: Expert version.
        content_id: Identity of the files the engine loads (manifest, adapter, soft prompts): a changed file
            under the same version is a different expert to the engine, so it is loaded again, never stale.
        adapter_dir: Directory of the LoRA adapter trained for the served base model.
        soft_prompt_files: Soft-prompt files, in manifest order (prepended in that order).
        store: The shared store (URI) the expert's files are mirrored from; an engine replica reads them from its own
            node's mirror of it, syncing the store first where that lacks them (packaging/store.py). None: a local
            expert.
        mirror: The mirror directory the paths above are under on the ingress's node (each node has its own).
    """

    name: str
    version: str
    content_id: str
    adapter_dir: str | None
    soft_prompt_files: tuple[str, ...] = ()
    store: str | None = None
    mirror: str | None = None

    @property
    def key(self) -> str:
        """The id engines and Serve's multiplexing know this expert by (`name@version+content`)."""
        return f"{self.name}@{self.version}+{self.content_id[:12]}"


@dataclass(frozen=True)
class Message:
    """One chat message as the chat template sees it (`developer` is sent as `system`; `name` only to templates that
    use it)."""

    role: Role
    content: str
    name: str | None = None


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters, each with where it came from (None: not set anywhere, the engine's own
    behaviour applies). The fields are exactly `expertserve.decoding.PARAMETERS`."""

    temperature: Resolved | None = None
    top_p: Resolved | None = None
    top_k: Resolved | None = None
    min_p: Resolved | None = None
    repetition_penalty: Resolved | None = None
    presence_penalty: Resolved | None = None
    frequency_penalty: Resolved | None = None
    max_tokens: Resolved | None = None
    stop: Resolved | None = None

    @classmethod
    def of(cls, resolved: Mapping[str, Resolved]) -> Sampling:
        """From `expertserve.decoding.resolve`'s result.

        Raises:
            KeyError: A name that is not a sampling parameter.
        """
        unknown = sorted(set(resolved) - set(PARAMETERS))
        if unknown:
            raise KeyError(f"not sampling parameters: {unknown}")
        return cls(**resolved)

    def items(self) -> Iterator[tuple[str, Resolved]]:
        """(name, resolved value) of every parameter that is set, in `PARAMETERS` order."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                yield f.name, value

    def values(self) -> dict[str, Any]:
        """Plain values of the parameters that are set (what vLLM's SamplingParams takes)."""
        return {name: r.value for name, r in self.items()}

    def with_max_tokens(self, value: int) -> Sampling:
        """A copy with `max_tokens` lowered to fit the context; its source stays where the limit came from."""
        source = self.max_tokens.source if self.max_tokens is not None else "default"
        return Sampling(**{**dict(self.items()), "max_tokens": Resolved(value, source)})


@dataclass(frozen=True)
class Extras:
    """Request-only options (vLLM extras and OpenAI's per-request fields) that no manifest sets.

    Attributes:
        n: Choices to generate.
        seed: Sampling seed.
        ignore_eos: Go on past end-of-sequence.
        min_tokens: Generate at least this many tokens.
        logprobs: Log probabilities of each sampled token, with this many alternatives (0: the token's own only);
            None: none.
        prompt_logprobs: Log probabilities of the prompt tokens, with this many alternatives (echo); None: none.
        score_only: Generate nothing the client sees (OpenAI's `echo` with `max_tokens: 0`: prompt scoring).
        whole: The client reads the answer whole (not streamed): the replica sends it in one message.
    """

    n: int = 1
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    score_only: bool = False
    whole: bool = False


# The most alternatives per position vLLM returns (and what the ingress accepts for logprobs / top_logprobs).
MAX_LOGPROBS = 20


# vLLM treats a temperature below this as greedy decoding (vllm/sampling_params.py, _SAMPLING_EPS).
GREEDY_BELOW = 1e-5


def check_sampling(sampling: Sampling, extras: Extras) -> None:
    """What vLLM refuses about a combination of resolved values, refused before the request reaches it, with the
    parameter named and where each value came from (vLLM's own messages name no parameter).

    Raises:
        InvalidSampling: n > 1 with greedy decoding, or min_tokens above max_tokens.
    """
    temperature = sampling.temperature
    if extras.n > 1 and temperature is not None and temperature.value < GREEDY_BELOW:
        raise InvalidSampling(
            f"n: {extras.n} choices need sampling, but temperature is {temperature.value} "
            f"({temperature.source}), which is greedy decoding; send a temperature above 0 or n=1",
            param="n",
        )
    limit = sampling.max_tokens
    if extras.min_tokens is not None and limit is not None and extras.min_tokens > limit.value:
        raise InvalidSampling(
            f"min_tokens: {extras.min_tokens} is above max_tokens={limit.value} ({limit.source})",
            param="min_tokens",
        )


@dataclass(frozen=True)
class EngineRequest:
    """A fully resolved generation request.

    Attributes:
        kind: `chat` (messages, formatted with the base model's chat template) or `completion` (raw prompt).
        request_id: Unique id; the engine aborts by it.
        sampling: Resolved sampling parameters with their sources.
        constraint: The output constraint (grammar, JSON schema, JSON object, or none).
        expert: The expert to apply; None for the base model.
        messages: The conversation (chat).
        prompt: The prompt text (completion).
        extras: Request-only options.
        priority: The engine's scheduling priority (lower runs first; ties by arrival): the tenant's fair-queueing
            tag (serve/quota.py), so the engine's own waiting queue keeps the tenants' fair order.
    """

    kind: Kind
    request_id: str
    sampling: Sampling
    constraint: Constraint
    expert: ExpertSpec | None = None
    messages: tuple[Message, ...] = ()
    prompt: str | None = None
    extras: Extras = field(default_factory=Extras)
    priority: int = 0

    def __post_init__(self) -> None:
        if self.kind == "chat" and (not self.messages or self.prompt is not None):
            raise ValueError("a chat request carries messages and no prompt")
        if self.kind == "completion" and (self.prompt is None or self.messages):
            raise ValueError("a completion request carries a prompt and no messages")

    @property
    def prompt_param(self) -> str:
        """The OpenAI parameter that holds the prompt (what errors about the prompt name)."""
        return "messages" if self.kind == "chat" else "prompt"


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its log probability, and the most likely alternatives at its position.

    Attributes:
        token: The token's text.
        token_id: Its id.
        logprob: Its log probability (None for a prompt's first token: nothing precedes it).
        top: The alternatives, most likely first, as (text, id, log probability).
    """

    token: str
    token_id: int
    logprob: float | None
    top: tuple[tuple[str, int, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of one choice's output, as the engine streams it.

    Attributes:
        index: The choice (0 .. n-1).
        text: New text since the previous chunk of this choice.
        token_ids: New token ids since the previous chunk.
        finish_reason: `stop` or `length` on the choice's last chunk, else None.
        prompt_tokens: Prompt length in tokens, soft-prompt positions included.
        completion_tokens: Tokens generated so far for this choice.
        load_seconds: How long loading the expert took on this replica (0 for the base model).
        logprobs: One entry per new token, when the request asked for log probabilities.
        prompt_logprobs: One entry per prompt token (the first has no log probability), on the first chunk of
            each choice, when the request asked for prompt log probabilities.
        replica: The engine replica that produced it (set by the replica on the first chunk it sends).
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    load_seconds: float = 0.0
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    replica: str = ""


def coalesce(chunks: Sequence[Chunk]) -> list[Chunk]:
    """Consecutive chunks joined per choice, in the order the choices first appear: one message carries what
    several engine steps produced (text, token ids and log probabilities appended; the last finish reason and
    counts; load time summed; prompt log probabilities from the first)."""
    joined: dict[int, Chunk] = {}
    for chunk in chunks:
        before = joined.get(chunk.index)
        if before is None:
            joined[chunk.index] = chunk
            continue
        joined[chunk.index] = Chunk(
            chunk.index,
            before.text + chunk.text,
            before.token_ids + chunk.token_ids,
            chunk.finish_reason,
            chunk.prompt_tokens,
            chunk.completion_tokens,
            before.load_seconds + chunk.load_seconds,
            before.logprobs + chunk.logprobs,
            before.prompt_logprobs or chunk.prompt_logprobs,
            before.replica or chunk.replica,
        )
    return list(joined.values())
