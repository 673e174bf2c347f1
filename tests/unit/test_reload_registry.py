"""Reload semantics of the registry and the server's expert checks (pure): a bad edit never takes a good expert
down, broken files make an expert unservable with the reason."""

from __future__ import annotations

import json
from pathlib import Path

from expertserve.registry import Registry
from expertserve.serve.expert_checks import ServingContext, expert_problems
from tests.helpers import make_expert, manifest, write_safetensors

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CTX = ServingContext(BASE, max_lora_rank=8, hidden_size=8, modules=frozenset({"q_proj", "v_proj", "o_proj"}))


def check(record):  # noqa: ANN001, ANN201
    return expert_problems(record, CTX)


def test_an_invalid_new_manifest_keeps_the_last_valid_version(tmp_path: Path) -> None:
    expert = make_expert(tmp_path / "expert-demo", manifest())
    first = Registry.scan([tmp_path], check=check)
    assert first.get("expert-demo").broken is None and first.problems == []
    (expert / "manifest.json").write_text(json.dumps({**manifest(), "version": "not-a-version"}))
    second = Registry.scan([tmp_path], previous=first, check=check)
    assert second.get("expert-demo").version == "0.1.0"
    assert len(second.problems) == 1 and "still serving expert-demo 0.1.0" in second.problems[0]
    third = Registry.scan([tmp_path])  # a first scan has nothing to keep
    assert "expert-demo" not in third and len(third.problems) == 1


def test_a_removed_expert_is_not_kept(tmp_path: Path) -> None:
    expert = make_expert(tmp_path / "expert-demo", manifest())
    first = Registry.scan([tmp_path])
    (expert / "manifest.json").unlink()
    assert "expert-demo" not in Registry.scan([tmp_path], previous=first)


def _broken(root: Path, name: str) -> Path:
    return make_expert(root / name, manifest(name=name))


def test_each_kind_of_broken_file_makes_the_expert_unservable_with_the_reason(tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(_broken(tmp_path, "expert-noadapter") / "adapter")
    config = _broken(tmp_path, "expert-bigrank") / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 64, "target_modules": ["q_proj"]}))
    config = _broken(tmp_path, "expert-badtarget") / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "fc9_proj"]}))
    wide = _broken(tmp_path, "expert-wide") / "soft_prompts" / "style.safetensors"
    write_safetensors(wide, {"prompt_embeddings": ([4, 16], "F32")})
    rows = _broken(tmp_path, "expert-rows") / "soft_prompts" / "style.safetensors"
    write_safetensors(rows, {"prompt_embeddings": ([5, 8], "F32")})
    make_expert(tmp_path / "expert-good", manifest(name="expert-good"))
    registry = Registry.scan([tmp_path], check=check)
    reasons = {r.name: r.unservable_reason(BASE) for r in registry}
    assert reasons.pop("expert-good") is None
    assert "adapter directory not found" in reasons["expert-noadapter"]
    assert "rank 64 is above the running engine's max_lora_rank 8" in reasons["expert-bigrank"]
    assert "fc9_proj" in reasons["expert-badtarget"]
    assert "16 wide; the base model's hidden size is 8" in reasons["expert-wide"]
    assert "5 rows but tokens is 4" in reasons["expert-rows"]
    assert [r.name for r in registry.servable(BASE)] == ["expert-good"]
    assert len(registry.problems) == 5 and all("is not servable" in p for p in registry.problems)


def test_grammars_are_compiled_by_the_given_compiler(tmp_path: Path) -> None:
    make_expert(tmp_path / "expert-demo", manifest())
    seen = []

    def compiler(kind: str, text: str) -> str | None:
        seen.append((kind, text))
        return "unbalanced quote at 1:9"

    record = Registry.scan([tmp_path]).get("expert-demo")
    assert expert_problems(record, CTX, compiler) == [
        "output constraint does not compile: unbalanced quote at 1:9"
    ]
    assert seen == [("grammar", 'root ::= "SELECT" [a-z]+\n')]


def test_a_broken_newer_version_leaves_the_older_one_serving(tmp_path: Path) -> None:
    make_expert(tmp_path / "expert-demo" / "0.1.0", manifest())
    newer = make_expert(tmp_path / "expert-demo" / "0.2.0", {**manifest(), "version": "0.2.0"})
    (newer / "adapter" / "adapter_model.safetensors").unlink()
    registry = Registry.scan([tmp_path], check=check)
    assert registry.get("expert-demo").version == "0.1.0" and registry.versions("expert-demo") == [
        "0.1.0",
        "0.2.0",
    ]
    assert registry.get("expert-demo", "0.2.0").broken


def test_the_serving_context_reads_the_base_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    write_safetensors(
        tmp_path / "model.safetensors",
        {"model.layers.0.self_attn.q_proj.weight": ([2, 2], "F32"), "model.norm.weight": ([2], "F32")},
    )
    ctx = ServingContext.of(tmp_path, BASE, max_lora_rank=12)
    assert (ctx.hidden_size, ctx.max_lora_rank, ctx.modules) == (64, 16, frozenset({"q_proj", "norm"}))


def test_an_expert_that_needs_prefix_caching_is_not_servable_on_engines_without_it(tmp_path: Path) -> None:
    import dataclasses

    make_expert(
        tmp_path / "expert-cache",
        manifest(name="expert-cache", runtime={"requires_kv_cache_persistence": True}),
    )
    record = Registry.scan([tmp_path]).get("expert-cache")
    off = dataclasses.replace(CTX, prefix_caching=False)
    assert any("prefix caching off" in p and "restart the server" in p for p in expert_problems(record, off))
    assert expert_problems(record, dataclasses.replace(CTX, prefix_caching=True)) == []
    assert expert_problems(record, CTX) == []  # unknown engine settings: nothing claimed


def test_an_adapter_whose_rank_pattern_is_above_the_engines_rank_is_not_servable(tmp_path: Path) -> None:
    """The check reads the same rank the engines are sized by: `r` and every `rank_pattern` value."""
    expert = make_expert(tmp_path / "expert-demo", manifest())
    config_file = expert / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 4, "rank_pattern": {"q_proj": 32}}))
    record = Registry.scan([tmp_path]).get("expert-demo")
    assert record.adapter_rank(BASE) == 32
    assert any("adapter rank 32 is above the running engine's max_lora_rank 8" in p for p in check(record))
