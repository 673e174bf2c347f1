"""Objective scorers by name (the manifest's `evaluation.scorer`). Each scores a batch of answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertserve.datasets import json_extract, sql, typescript


@dataclass(frozen=True)
class Scorer:
    """A named metric and how to compute it for a batch."""

    metric: str
    score_many: Callable[[list[str], list[dict[str, Any]], Path], list[bool]]
    # A second, weaker check reported beside the metric (its name and test): is the answer well formed at all?
    well_formed: tuple[str, Callable[[str], bool]] | None = None


def _each(score: Callable[[str, dict[str, Any], Path], bool]) -> Callable[..., list[bool]]:
    return lambda preds, metas, data_dir: [score(p, m, data_dir) for p, m in zip(preds, metas, strict=True)]


SCORERS: dict[str, Scorer] = {
    "sql-execution": Scorer("execution_accuracy", _each(sql.score)),
    "json-exact": Scorer(
        "exact_match",
        _each(json_extract.score),
        ("valid_json", lambda answer: json_extract.parse_object(answer) is not None),
    ),
    "typescript-tests": Scorer("tsc_strict_and_tests", typescript.score_many),
}
