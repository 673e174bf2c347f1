"""The Grafana dashboard and the scrape configuration: they parse, and name only series the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from expertserve.serve.metrics import Metrics
from tests.helpers import REPO

SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")


def _ours() -> set[str]:
    return {m.name + s for m in Metrics().registry.collect() for s in SUFFIXES} | {
        s.name for m in Metrics().registry.collect() for s in m.samples
    }


def _vllms() -> set[str]:
    """vLLM's metric names as Ray exports them (`vllm:x` -> `ray_vllm_x`), read from vLLM's logger source."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    source = (Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py").read_text()
    names = set(re.findall(r'"vllm:([a-z_]+)"', source))
    return {f"ray_vllm_{n}{s}" for n in names for s in SUFFIXES}


def test_the_dashboard_names_only_exported_series() -> None:
    dashboard = json.loads((REPO / "k8s" / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(expertserve_\w+|ray_vllm_\w+)", e)}
    assert used and used <= _ours() | _vllms(), sorted(used - _ours() - _vllms())
    assert any(u.startswith("ray_vllm_") for u in used) and any(u.startswith("expertserve_") for u in used)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_scrape_config_targets_the_serve_service_port() -> None:
    config = yaml.safe_load((REPO / "k8s" / "monitoring" / "prometheus-scrape.yaml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    keeps = {r["regex"] for r in job["relabel_configs"]}
    rayservice = (REPO / "k8s" / "rayservice.yaml").read_text()
    assert "expertserve-serve-svc" in keeps and "name: serve" in rayservice
