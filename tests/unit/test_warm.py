"""Which experts the ingress keeps loaded on several engine replicas (serve/control/warm.py: the pure plan)."""

from __future__ import annotations

from pathlib import Path

from expertserve.registry import Registry
from expertserve.serve.control.warm import warm_targets
from tests.helpers import make_expert, manifest

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_replica_minimums_come_from_the_config_over_the_manifest(tmp_path: Path) -> None:
    make_expert(tmp_path / "expert-a", manifest(name="expert-a", runtime={"min_replicas": 3}))
    make_expert(tmp_path / "expert-b", manifest(name="expert-b", runtime={"min_replicas": 2}))
    make_expert(tmp_path / "expert-c", manifest(name="expert-c"))
    other = manifest(name="expert-other", runtime={"min_replicas": 2})
    other["base_models"][0]["name"] = "another/base"
    make_expert(tmp_path / "expert-other", other)  # not servable on this base model: never warmed
    registry = Registry.scan([tmp_path])
    seen = []

    def decorate(record, spec):  # noqa: ANN001, ANN202
        seen.append(record.name)
        return spec

    targets = warm_targets(registry, BASE, {"expert-b": 1, "expert-c": 2}, decorate)
    assert {(t.spec.name, t.replicas) for t in targets} == {("expert-a", 3), ("expert-c", 2)}
    assert sorted(seen) == ["expert-a", "expert-c"]
