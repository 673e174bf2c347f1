"""The chat-example format every dataset uses, and JSONL splits. Pure Python.

One example per line: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
"meta": {...}}`. The last message is the assistant's answer (the training target); `meta` carries what the
scorer needs (gold query, gold object, tests).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from expertserve.errors import ExpertserveError

Example = dict[str, Any]
ROLES = ("system", "user", "assistant")


class DatasetError(ExpertserveError):
    """A dataset file is missing or malformed (the message names the file and line)."""


def chat_example(system: str | None, user: str, answer: str, meta: dict[str, Any] | None = None) -> Example:
    """A single-turn example."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "meta": meta or {}}


def prompt_messages(example: Example) -> list[dict[str, str]]:
    """The messages before the answer (what a model is asked)."""
    return example["messages"][:-1]


def answer(example: Example) -> str:
    """The gold answer text."""
    return example["messages"][-1]["content"]


def split(examples: list[Example], seed: int, valid: int, test: int) -> dict[str, list[Example]]:
    """Shuffles once and cuts train / valid / test; the test set never overlaps the others."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return {
        "test": shuffled[:test],
        "valid": shuffled[test : test + valid],
        "train": shuffled[test + valid :],
    }


def write_jsonl(path: Path, examples: list[Example]) -> None:
    """Writes one example per line (sorted keys: regenerating gives the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[Example]:
    """Reads and checks chat examples.

    Raises:
        DatasetError: Missing file, bad JSON, or an example that is not a chat ending with an answer.
    """
    examples = read_checked_jsonl(path, _check, "dataset file")
    if not examples:
        raise DatasetError(f"{path}: no examples")
    return examples


def read_checked_jsonl(path: Path, check: Callable[[Any], str | None], what: str = "file") -> list[Any]:
    """One JSON value a line (blank lines skipped), each passed through `check`, which returns a problem or None.

    Raises:
        DatasetError: Missing file, bad JSON, or a line `check` refuses; the message names file and line.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found")
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"{path}:{lineno}: not UTF-8 (byte {e.start} of the line: {raw[e.start : e.start + 1]!r})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e})") from None
            problem = check(row)
            if problem:
                raise DatasetError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    return rows


def _check(ex: Any) -> str | None:
    if not isinstance(ex, dict) or not isinstance(ex.get("messages"), list) or not ex["messages"]:
        return "expected an object with a non-empty 'messages' list"
    for i, m in enumerate(ex["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"messages[{i}]: expected {{'role': one of {ROLES}, 'content': string}}"
    if ex["messages"][-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    return None
