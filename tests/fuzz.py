"""Generated requests for the property-based fuzz tests (tests/integration/test_fuzz_fake_engine.py on the fake
engine, tests/e2e/test_fuzz.py on vLLM), and the seed corpus: one body of every class of client input that once
answered 500.

The properties, checked by `check_response`: no 5xx; every non-2xx body is an OpenAI error object.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import strategies as st

PATHS = ("/v1/chat/completions", "/v1/completions")
# Generated requests per run: thousands against the fake engine (milliseconds each), fewer against vLLM.
FAKE_EXAMPLES = 2000
REAL_EXAMPLES = 150
FIELDS = (
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
    "logprobs",
    "return_token_ids",
    "ignore_eos",
    "min_tokens",
    "response_format",
    "tools",
    "logit_bias",
    "echo",
    "suffix",
    "best_of",
    "prompt_embeds",
)
# Text with what breaks naive servers: lone surrogates, NUL, control characters, right-to-left marks, emoji.
TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["", " ", "\ud800", "a\udfffb", "\x00", "\u202e", "😀" * 3, "x" * 3000]
)
INTEGERS = st.integers() | st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30])
FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -0.0, 1e-9, 2.0000001, 1e308]
)
SCALARS = st.none() | st.booleans() | INTEGERS | FLOATS | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "developer", "tool", ""]),
            "content": TEXT | JSON,
        }
    ),
    max_size=3,
)


def bodies(models: list[str]) -> st.SearchStrategy[tuple[str, Any]]:
    """(path, body): valid bodies with fields replaced, dropped or added, and arbitrary JSON."""
    valid = st.fixed_dictionaries(
        {
            "model": st.sampled_from(models) | TEXT,
            "messages": MESSAGES | st.just([{"role": "user", "content": "hello"}]),
            "prompt": TEXT | st.lists(TEXT, max_size=2),
            "max_tokens": st.integers(1, 4),
        }
    )
    mutated = st.tuples(valid, st.dictionaries(st.sampled_from(FIELDS) | TEXT, JSON, max_size=3)).map(
        lambda pair: {**pair[0], **pair[1]}
    )
    return st.tuples(st.sampled_from(PATHS), mutated | JSON)


# What h11 lets a client send: no control characters, no surrounding whitespace.
HEADER_BYTES = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F))
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "authorization": HEADER_BYTES.map(lambda b: (b"Bearer " + b).strip()) | HEADER_BYTES,
        "content-type": st.sampled_from(
            [b"application/json", b"text/plain", b"", b"application/json; charset=latin-1"]
        ),
        "x-expertserve-anything": HEADER_BYTES,
    },
)

HELLO = [{"role": "user", "content": "hello"}]


def seed_corpus(
    expert: str, greedy_expert: str, max_body_bytes: int = 1_048_576
) -> list[tuple[str, Any, int]]:
    """Every class of input that once answered 500, as (path, body, the status it must get); the 16 long stop
    strings (60 KB each once stalled the response) are as long as the server's body limit allows."""
    chat, text = PATHS
    stop = "x" * min(60000, (max_body_bytes - 1000) // 16)
    deep = ('{"model": ' + json.dumps(expert) + ', "messages": ' + "[" * 5000 + "]" * 5000 + "}").encode()
    return [
        (chat, {"model": greedy_expert, "messages": HELLO, "n": 2}, 400),
        (chat, {"model": expert, "messages": HELLO, "max_tokens": 2, "min_tokens": 5}, 400),
        (chat, {"model": expert, "messages": HELLO, "stop": ""}, 400),
        (chat, {"model": expert, "messages": HELLO, "stop": ["a", ""]}, 400),
        (chat, {"model": expert, "messages": HELLO, "seed": 2**64}, 400),
        (chat, {"model": expert, "messages": HELLO, "top_k": 2**64}, 400),
        (chat, {"model": expert, "messages": HELLO, "top_k": 2**31 - 1, "max_tokens": 2}, 200),
        (chat, deep, 400),
        (chat, {"model": expert, "messages": [{"role": "user", "content": "\ud800"}]}, 400),
        (text, {"model": expert, "prompt": "a\ud800b"}, 400),
        (chat, {"model": "auto", "messages": [{"role": "user", "content": "\udfff sql"}]}, 400),
        (chat, {"model": expert, "messages": HELLO, "max_tokens": 2, "stop": [stop] * 16}, 200),
        (chat, {"model": expert, "messages": HELLO, "temperature": float("nan")}, 400),
    ]


def send(
    client: httpx.Client, path: str, body: Any, headers: dict[str, bytes] | None = None
) -> httpx.Response:
    """POSTs a body (bytes as they are; anything else as JSON, NaN and lone surrogates included)."""
    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    sent = {"content-type": b"application/json", **(headers or {})}
    return client.post(path, content=raw, headers=sent)


def check_response(response: httpx.Response) -> None:
    """No 5xx; a non-2xx answer is an OpenAI error object."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 300:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text[:500]
        assert isinstance(error["type"], str) and "param" in error and "code" in error, response.text[:500]
