"""The registry: discovery, versions, clashes, what serving needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertserve.errors import ExpertNotFound, RegistryError
from expertserve.registry import Registry
from tests.helpers import REPO, make_expert, manifest

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_finds_repository_experts_and_installed_versions(tmp_path: Path) -> None:
    make_expert(tmp_path / "experts" / "expert-demo")
    make_expert(tmp_path / "install" / "expert-demo" / "0.2.0", manifest(version="0.2.0"))
    make_expert(
        tmp_path / "install" / "expert-other" / "1.0.0", manifest(name="expert-other", version="1.0.0")
    )
    registry = Registry.scan([tmp_path / "experts", tmp_path / "install", tmp_path / "missing"])
    assert registry.problems == []
    assert registry.names() == ["expert-demo", "expert-other"]
    assert registry.versions("expert-demo") == ["0.1.0", "0.2.0"]
    assert registry.get("expert-demo").version == "0.2.0"
    assert registry.get("expert-demo", "0.1.0").root == tmp_path / "experts" / "expert-demo"


def test_versions_sort_numerically(tmp_path: Path) -> None:
    for v in ("0.9.0", "0.10.0", "0.2.0"):
        make_expert(tmp_path / "expert-demo" / v, manifest(version=v))
    registry = Registry.scan([tmp_path])
    assert registry.get("expert-demo").version == "0.10.0"


def test_name_clash_is_reported_and_the_first_wins(tmp_path: Path) -> None:
    make_expert(tmp_path / "a" / "expert-demo")
    make_expert(tmp_path / "b" / "expert-demo")
    registry = Registry.scan([tmp_path / "a", tmp_path / "b"])
    assert len(registry.problems) == 1
    assert "name clash: expert-demo 0.1.0 is defined twice" in registry.problems[0]
    assert registry.get("expert-demo").root == tmp_path / "a" / "expert-demo"
    with pytest.raises(RegistryError, match="name clash"):
        Registry.scan([tmp_path / "a", tmp_path / "b"], strict=True)


def test_invalid_manifest_is_reported_not_fatal(tmp_path: Path) -> None:
    make_expert(tmp_path / "expert-demo")
    make_expert(tmp_path / "expert-bad", manifest(name="expert-bad", version="one"), files=False)
    registry = Registry.scan([tmp_path])
    assert registry.names() == ["expert-demo"]
    assert len(registry.problems) == 1 and "version" in registry.problems[0]


@pytest.mark.parametrize("name", ["auto", "base", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_expert_names_cannot_take_server_model_names(name: str) -> None:
    from expertserve.errors import ManifestError
    from expertserve.manifest import validate_manifest

    with pytest.raises(ManifestError, match="name: string should match pattern"):
        validate_manifest(manifest(name=name), "t")


def test_unknown_expert_lists_the_known_ones(tmp_path: Path) -> None:
    make_expert(tmp_path / "expert-demo")
    registry = Registry.scan([tmp_path])
    with pytest.raises(ExpertNotFound, match="no expert named 'expert-sqll' .*expert-demo"):
        registry.get("expert-sqll")
    with pytest.raises(ExpertNotFound, match="no version 9.9.9"):
        registry.get("expert-demo", "9.9.9")


def test_remove(tmp_path: Path) -> None:
    make_expert(tmp_path / "expert-demo" / "0.1.0")
    make_expert(tmp_path / "expert-demo" / "0.2.0", manifest(version="0.2.0"))
    registry = Registry.scan([tmp_path])
    registry.remove("expert-demo", "0.2.0")
    assert registry.get("expert-demo").version == "0.1.0"
    registry.remove("expert-demo")
    assert "expert-demo" not in registry


def test_servability_and_lora_rank(tmp_path: Path) -> None:
    make_expert(tmp_path / "expert-demo")
    data = manifest(name="expert-wide")
    data["base_models"][0]["adapters"][0].update(r=16, alpha=32)
    data["training"]["config"].update(rank=16, alpha=32)
    make_expert(tmp_path / "expert-wide", data)
    dora = manifest(name="expert-dora")
    dora["base_models"][0]["adapters"][0].update(type="dora", r=64, alpha=64)
    dora["training"]["config"].update(adapter_type="dora", rank=64, alpha=64)
    make_expert(tmp_path / "expert-dora", dora)
    other = manifest(name="expert-other")
    other["base_models"][0]["name"] = "Qwen/Qwen3-0.6B"
    make_expert(tmp_path / "expert-other", other)
    registry = Registry.scan([tmp_path])
    assert [r.name for r in registry.servable(BASE)] == ["expert-demo", "expert-wide"]
    assert registry.max_lora_rank(BASE) == 16
    assert "vLLM hot-swaps LoRA adapters only" in registry.get("expert-dora").unservable_reason(BASE)
    assert "trained for base model(s) Qwen/Qwen3-0.6B" in registry.get("expert-other").unservable_reason(BASE)
    assert registry.get("expert-other").unservable_reason("other", aliases=["Qwen/Qwen3-0.6B"]) is None


def test_record_exposes_paths_for_serving(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo")
    record = Registry.scan([tmp_path]).get("expert-demo")
    adapter, path = record.adapter_for(BASE)
    assert adapter.r == 4 and path == root / "adapter"
    [(sp, sp_path)] = record.soft_prompts
    assert sp.tokens == 4 and sp_path == root / "soft_prompts" / "style.safetensors"
    assert record.decoding.temperature == 0.1
    assert record.file_problems() == []


def test_shipped_experts_register_without_problems() -> None:
    registry = Registry.scan([REPO / "experts"])
    assert registry.problems == []
    assert registry.names() == ["expert-json", "expert-sql", "expert-typescript"]
    assert registry.get("expert-sql").decoding.temperature == 0.1
    assert registry.get("expert-typescript").decoding.temperature == 0.4
    assert [sp.name for sp, _ in registry.get("expert-json").soft_prompts] == ["json_strict"]
