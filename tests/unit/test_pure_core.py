"""The pure core imports no ray, vllm or torch (so it is fast and testable in milliseconds)."""

from __future__ import annotations

import subprocess
import sys

PURE_MODULES = [
    "expertserve.errors",
    "expertserve.settings",
    "expertserve.manifest",
    "expertserve.manifest.files",
    "expertserve.manifest.status",
    "expertserve.registry",
    "expertserve.packaging.archive",
    "expertserve.cli.validate",
    "expertserve.cli.packages",
    "expertserve.decoding",
    "expertserve.datasets.common",
    "expertserve.datasets.sql",
    "expertserve.datasets.json_extract",
    "expertserve.datasets.typescript",
    "expertserve.eval.scorers",
    "expertserve.train.plan",
    "expertserve.train.faults",
    "expertserve.cli.train",
    "expertserve.cli.eval",
    "expertserve.routing.lexical",
    "expertserve.routing.router",
    "expertserve.routing.evaluate",
    "expertserve.cli.route",
    "expertserve.serve.protocol",
    "expertserve.serve.config",
    "expertserve.serve.errors",
    "expertserve.serve.responses",
    "expertserve.serve.http.body",
    "expertserve.serve.http.auth",
    "expertserve.serve.http.headers",
    "expertserve.serve.tools",
    "expertserve.serve.expert_checks",
    "expertserve.serve.streams",
    "expertserve.serve.health",
    "expertserve.serve.engine_metrics",
    "expertserve.engine.request",
    "expertserve.engine.protocol",
    "expertserve.engine.config",
    "expertserve.engine.args",
    "expertserve.serve.control.shape",
    "expertserve.engine.hardware",
    "expertserve.routing.intent",
    "expertserve.eval.sandbox",
    "expertserve.packaging.trust",
    "expertserve.stats",
    "expertserve.bench.stats",
]
HEAVY = ("torch", "ray", "vllm", "transformers", "peft")


def test_pure_modules_import_no_heavy_library() -> None:
    code = (
        f"import sys\nfor m in {PURE_MODULES!r}: __import__(m)\n"
        f"print(sorted(h for h in {HEAVY!r} if h in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
