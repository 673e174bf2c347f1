"""The engine shape rule: the config wins at start; a restart grows the running shape to what the experts need."""

from __future__ import annotations

from pathlib import Path

from expertserve.engine.config import EngineConfig
from expertserve.registry import Registry
from expertserve.serve.control.shape import EngineShape, experts_need, start_shape
from tests.helpers import make_expert, manifest


def _registry(root: Path, *experts: tuple[str, int, bool], soft: bool = False) -> Registry:
    for name, rank, cache in experts:
        data = manifest(name=name)
        if not soft:
            data["soft_prompts"] = []
        data["base_models"][0]["adapters"][0]["r"] = rank
        data["training"]["config"]["rank"] = rank
        if cache:
            data["runtime"] = {"requires_kv_cache_persistence": True}
        make_expert(root / name, data)
    return Registry.scan([root])


def test_the_experts_need_the_largest_rank_slot_and_prefix_caching_when_one_asks(tmp_path: Path) -> None:
    base = manifest()["base_models"][0]["name"]
    registry = _registry(tmp_path, ("expert-a", 8, False), ("expert-b", 12, True))
    assert not registry.problems and len(registry) == 2
    assert experts_need(registry, base) == EngineShape(16, True)
    assert experts_need(Registry.scan([tmp_path / "none"]), base) == EngineShape(8, False)
    # At start the config's explicit settings win (a user may cap the adapter memory).
    assert start_shape(registry, base, EngineConfig()) == EngineShape(16, True)
    capped = EngineConfig(max_lora_rank=8, prefix_caching=False)
    assert start_shape(registry, base, capped) == EngineShape(8, False)


def test_an_expert_with_a_soft_prompt_needs_prefix_caching(tmp_path: Path) -> None:
    base = manifest()["base_models"][0]["name"]
    assert experts_need(_registry(tmp_path / "plain", ("expert-a", 8, False)), base) == EngineShape(8, False)
    registry = _registry(tmp_path / "soft", ("expert-a", 8, False), soft=True)
    assert experts_need(registry, base) == EngineShape(8, True), (
        "its soft prompt is computed once, then reused"
    )
    assert start_shape(registry, base, EngineConfig(prefix_caching=False)) == EngineShape(8, False)


def test_a_shape_only_grows() -> None:
    small, big = EngineShape(8, False), EngineShape(32, False)
    assert big.covers(small) and not small.covers(big)
    assert small.grown(big) == big and big.grown(small) == big and small.grown(None) == small
    assert EngineShape(8, True).grown(EngineShape(16, False)) == EngineShape(16, True)
    assert not EngineShape(64, False).covers(EngineShape(8, True))
    assert EngineShape(12, False).grown(EngineShape(8, False)) == EngineShape(16, False), (
        "a slot vLLM accepts"
    )
    assert EngineShape.from_dict(big.to_dict()) == big and EngineShape.from_dict(None) is None


def test_only_trusted_servable_experts_size_the_engines_by_their_real_rank_within_the_limit(
    tmp_path: Path,
) -> None:
    """Finding 6 of the security issue: an untrusted store package (never served) raised the engines to rank 256
    and turned prefix caching on; the manifest's `r`, not the adapter's, was read."""
    import json

    from expertserve.packaging.trust import TrustPolicy
    from expertserve.serve.expert_checks import trust_problems

    base = manifest()["base_models"][0]["name"]
    local = tmp_path / "local"
    _registry(local, ("expert-a", 8, False))
    config = local / "expert-a" / "adapter" / "adapter_config.json"
    data = json.loads(config.read_text()) if config.exists() else {}
    config.write_text(json.dumps({**data, "r": 8, "rank_pattern": {"q_proj": 32}}))  # the manifest says 8
    assert experts_need(Registry.scan([local]), base).max_lora_rank == 32

    # An unsigned package of a rank-256 expert, installed where the server reads packages.
    from expertserve.packaging import archive

    _registry(tmp_path / "src", ("expert-untrusted", 8, True))
    source = tmp_path / "src" / "expert-untrusted"
    (source / "adapter" / "adapter_config.json").write_text(json.dumps({**data, "r": 256}))
    package = archive.build_package(source, tmp_path / "packages")
    archive.install_package(package, tmp_path / "installed")
    roots = [local, tmp_path / "installed"]
    policy = TrustPolicy(frozenset())
    checked = Registry.scan(roots, check=lambda r: trust_problems(r, policy))
    assert "unsigned" in (checked.get("expert-untrusted").broken or "")
    assert experts_need(checked, base) == EngineShape(32, False)
    assert start_shape(checked, base, EngineConfig()) == EngineShape(32, False)
    # Allowed explicitly, it counts, within engine.lora_rank_limit (64 by default).
    allowed = Registry.scan(roots, check=lambda r: trust_problems(r, TrustPolicy(frozenset(), True)))
    assert allowed.get("expert-untrusted").broken is None
    assert start_shape(allowed, base, EngineConfig()) == EngineShape(64, True)
    assert start_shape(allowed, base, EngineConfig(lora_rank_limit=256)).max_lora_rank == 256
