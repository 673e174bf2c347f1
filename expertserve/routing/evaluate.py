"""Router accuracy on a labelled file. Pure Python given a router.

File format: one JSON object a line, `"prompt"` or `"messages"`, and `"expert"` (null: the base model).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from expertserve.datasets.common import read_checked_jsonl
from expertserve.routing.router import Router

BASE_LABEL = "(base)"


def read_labelled(path: Path) -> list[dict[str, Any]]:
    """Reads and checks a labelled routing file.

    Raises:
        DatasetError: Missing file, bad JSON, or a line without prompt/messages and expert.
    """
    return read_checked_jsonl(path, _check)


def _check(row: Any) -> str | None:
    if (
        not isinstance(row, dict)
        or "expert" not in row
        or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list))
    ):
        return 'expected {"prompt" or "messages", "expert": name or null}'
    return None


def evaluate(router: Router, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy in and off domain, confusion matrix, per-expert recall, and every prediction."""
    predictions: list[dict[str, Any]] = []
    confusion: Counter[tuple[str, str]] = Counter()
    for row in rows:
        decision = (
            router.route_messages(row["messages"]) if "messages" in row else router.route(row["prompt"])
        )
        predictions.append(
            {"expert": decision.expert, "confidence": round(decision.confidence, 4), "label": row["expert"]}
        )
        confusion[(row["expert"] or BASE_LABEL, decision.expert or BASE_LABEL)] += 1
    inside = [p for p in predictions if p["label"] is not None]
    outside = [p for p in predictions if p["label"] is None]
    labels = sorted({p["label"] for p in inside})
    recall = {name: _share([p for p in inside if p["label"] == name]) for name in labels}
    names = sorted({a for a, _ in confusion} | {b for _, b in confusion})
    return {
        "n": len(predictions),
        "in_domain_accuracy": _share(inside),
        "off_domain_accuracy": _share(outside),
        "accuracy": _share(predictions),
        "per_expert_recall": recall,
        "confusion": {a: {b: confusion[(a, b)] for b in names if confusion[(a, b)]} for a in names},
        "predictions": predictions,
    }


def _share(predictions: list[dict[str, Any]]) -> float:
    return sum(p["expert"] == p["label"] for p in predictions) / len(predictions) if predictions else 0.0
