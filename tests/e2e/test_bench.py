"""`expertserve bench` at its smallest size: both servers start, every scenario runs, every headline figure is
printed and written. No timing is asserted: this proves the benchmark works, the README holds its figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from expertserve.bench.stats import FIGURES
from tests.helpers import REPO

pytestmark = pytest.mark.server


def test_bench_smoke_runs_every_scenario_and_writes_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "expertserve", "bench", "--size", "smoke", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    for key in [*FIGURES, "machine"]:
        assert key in results, key
    for key in FIGURES:
        assert isinstance(results[key], float) and math.isfinite(results[key]), (key, results[key])
    assert {"cores", "memory_gib", "device"} <= set(results["machine"])
    assert results["errors"] == 0
    # Both servers did exactly the same work: every request generated max_tokens tokens (ignore_eos).
    shape = results["shapes"]["stack"]
    for server in ("vllm", "expertserve"):
        assert results["stack"][server]["output_tokens"] == shape["requests"] * shape["max_tokens"], server
        # vLLM's own benchmark client did the same work on both servers.
        client = results["vllm_client"][server]
        assert client["completed"] == shape["requests"] and client["failed"] == 0, (server, client)
    # Compared workloads ran repeatedly: base-only several times on each server (at measured sizes on vLLM's
    # before and after expertserve's; the smoke size starts vLLM's server once), the soft prompt interleaved.
    shapes = results["shapes"]
    mixed = shapes["mixed"]
    for server, rounds in (("vllm", 1), ("expertserve", 1)):
        base = results["base_only"][server]
        runs = rounds * shapes["base_runs"]
        assert base["output_tokens"] == runs * mixed["requests"] * mixed["max_tokens"], server
    before, after = results["base_only"]["vllm_tokens_per_s_before_after"]
    assert before > 0 and after is None
    soft = results["softprompt"]
    assert (
        soft["runs_each"] == 2 * shapes["soft_rounds"]
        and soft["with"]["requests"] == soft["without"]["requests"]
    )
    assert {"model", "flags", "native_bf16"} <= set(results["machine"]["cpu_info"])
    assert results["dtype"]["used"] in ("float32", "bfloat16") and results["dtype"]["why"]
    # `auto` chose among the shipped experts (or the base model), never a synthetic one.
    assert set(results["routing"]["chosen"]) <= {
        "expert-sql",
        "expert-json",
        "expert-typescript",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    # Many experts: every synthetic one registered by the reload; the Zipf run loaded experts as it went, and the
    # loads the requests saw are at least the distinct experts they asked for (each loaded at least once).
    many = results["many"]
    assert many["experts"] == 40 and many["errors"] == 0
    assert many["loads"] >= many["distinct_requested"] >= 1
    # The placement server's two engine replicas both answered, and the share is a share.
    assert results["placement"]["replicas"] == 2 and 0 <= results["placement_held_share"] <= 1
    # Fairness: both tenants' runs answered (the figure itself is for the quick and full sizes).
    fair = results["fairness"]
    assert fair["light_alone"]["requests"] == fair["light_under_flood"]["requests"] == 4
    assert (
        fair["light_under_flood"]["errors"] == 0
        and fair["flood"]["requests"] >= 64
        and fair["flood"]["errors"] == 0
    )
    assert results["fairness_ttft_p50_ratio"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in FIGURES.values():
        assert label in proc.stdout
    assert "pass" in proc.stdout or "FAIL" in proc.stdout
