"""The router with the real offline embedder on the repository's held-out routing set, and `expertserve route`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.model
HELDOUT = REPO / "configs" / "routing" / "heldout.jsonl"


def route(*args: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "expertserve",
            "route",
            *args,
            "--json",
            "--experts-dir",
            str(REPO / "experts"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_heldout_accuracy_meets_the_targets() -> None:
    report = route("--eval", str(HELDOUT))
    assert report["in_domain_accuracy"] >= 0.95, report["per_expert_recall"]
    assert report["off_domain_accuracy"] >= 0.90, report["confusion"]
    lines = [line for line in HELDOUT.read_text().splitlines() if line.strip()]
    assert len(report["predictions"]) == len(lines)
    assert all({"expert", "confidence"} <= set(p) for p in report["predictions"])


def test_heldout_set_is_not_what_the_router_learns_from() -> None:
    learned = set()
    for name in ("expert-sql", "expert-json", "expert-typescript"):
        manifest = json.loads((REPO / "experts" / name / "manifest.json").read_text())
        learned |= set(manifest["routing"]["examples"])
        for line in (REPO / "experts" / name / "data" / "train.jsonl").read_text().splitlines():
            learned.add(json.loads(line)["messages"][-2]["content"])
    prompts = {json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines() if line.strip()}
    assert not prompts & learned


def test_route_one_prompt_prints_the_decision_and_scores() -> None:
    decision = route("Write a TypeScript function that doubles every number in an array.")
    assert decision["expert"] == "expert-typescript" and 0 < decision["confidence"] <= 1
    assert {c["expert"] for c in decision["candidates"]} == {"expert-sql", "expert-json", "expert-typescript"}
    assert route("Good morning! How was your weekend?")["expert"] is None


def test_labelled_file_errors_name_the_line(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "expert": null}\n{"text": "y"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "expertserve", "route", "--eval", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "bad.jsonl:2" in out.stderr


def test_routing_benchmark_runs_and_reports_both_registries() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "expertserve",
            "route",
            "--bench",
            "--bench-n",
            "5",
            "--synthetic",
            "4",
            "--json",
            "--experts-dir",
            str(REPO / "experts"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)
    assert results["shipped"]["experts"] == 3 and results["synthetic"]["experts"] == 4
    for key in ("shipped", "synthetic"):
        assert {"p50_ms", "p99_ms", "target_p99_ms", "pass"} <= set(results[key])


def test_the_traced_embedder_embeds_one_text_as_the_model_does() -> None:
    """A decision's text runs through the TorchScript trace: the same vectors as the eager model, at any length
    (the trace was taken at one), for empty, non-English and over-long texts."""
    import numpy as np

    from expertserve.routing.embedder import Embedder

    traced, eager = Embedder(), Embedder(trace=False)
    assert traced.traced and not eager.traced
    for text in ["", "hi", "write a sql query " * 60, "日本語のテキストを JSON にして 😀", "x" * 3000]:
        assert np.allclose(traced.embed([text]), eager.embed([text]), atol=1e-5), text[:40]
    both = ["write a sql query", "why is the sky blue?"]
    assert np.array_equal(traced.embed(both), eager.embed(both))  # batches run eagerly
