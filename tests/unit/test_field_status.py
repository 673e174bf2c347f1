"""Every manifest field has a verdict, and verdicts say what applies a field or why nothing does."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from expertserve.manifest import load_manifest, validate_manifest
from expertserve.manifest import model as m
from expertserve.manifest.status import RULES, RuntimeContext, all_rule_paths, field_statuses, judge
from tests.helpers import REFERENCE, manifest

CPU, GPU = RuntimeContext(device="cpu"), RuntimeContext(device="cuda")


def test_every_field_of_the_model_has_a_rule() -> None:
    paths = set(all_rule_paths())
    assert sorted(p for p in paths if p not in RULES) == []
    assert sorted(p for p in RULES if p not in paths) == [], "stale rules for fields that no longer exist"


def test_every_model_field_has_a_description() -> None:
    models = [
        c
        for c in vars(m).values()
        if isinstance(c, type) and issubclass(c, BaseModel) and c.__module__ == m.__name__
    ]
    missing = [f"{c.__name__}.{n}" for c in models for n, f in c.model_fields.items() if not f.description]
    assert missing == []


@pytest.mark.parametrize("name", ["expert-json", "expert-typescript"])
def test_every_set_field_of_a_reference_manifest_gets_a_status(name: str) -> None:
    loaded = load_manifest(REFERENCE / f"{name}.manifest.json")
    statuses = field_statuses(loaded.manifest, CPU)
    assert {s.status for s in statuses} <= {"active", "planned", "not applicable"}
    assert all(s.detail for s in statuses)
    set_top_level = {k for k in loaded.raw if not k.startswith("_") and loaded.raw[k] not in ([], None)}
    reported_top_level = {s.path.split(".")[0].split("[")[0] for s in statuses}
    assert set_top_level <= reported_top_level


def status_of(data: dict[str, Any], path: str, ctx: RuntimeContext = CPU) -> tuple[str, str]:
    statuses = {s.path: s for s in field_statuses(validate_manifest(data, "t"), ctx)}
    return statuses[path].status, statuses[path].detail


def test_candle_compatible_is_not_applicable_on_vllm() -> None:
    status, detail = status_of(manifest(runtime={"candle_compatible": True}), "runtime.candle_compatible")
    assert status == "not applicable" and "vLLM" in detail


def test_attention_kernel_depends_on_the_device() -> None:
    data = manifest(runtime={"attention_kernel": "flash-v2"})
    status, detail = status_of(data, "runtime.attention_kernel", CPU)
    assert status == "not applicable" and "cpu" in detail
    status, detail = status_of(data, "runtime.attention_kernel", GPU)
    assert status == "not applicable" and "picks its attention backend" in detail


def test_dora_adapter_reported_as_not_servable() -> None:
    verdict = judge("base_models[0].adapters[0].type", "dora", CPU)
    assert "not servable" in verdict.detail and "LoRA" in verdict.detail


def test_unsupported_adapter_types_are_not_applicable() -> None:
    assert judge("base_models[0].adapters[0].type", "lokr", CPU).status == "not applicable"


def test_cuda_only_training_options_depend_on_the_device() -> None:
    assert judge("training.config.use_tf32", True, CPU).status == "not applicable"
    assert judge("training.config.use_tf32", True, GPU).status == "active"
    assert judge("training.config.optim", "adamw_bnb_8bit", GPU).status == "not applicable"


def test_status_follows_the_components_that_exist() -> None:
    data = manifest(routing={"keywords": ["sql"]})
    assert status_of(data, "name")[0] == "active"
    status, detail = status_of(data, "training.decoding.temperature")
    assert status == "active" and "the server" in detail and "`expertserve eval`" in detail
    assert status_of(data, "routing.keywords")[0] == "active"
    assert (
        status_of(
            manifest(perf={"latency_ms_overhead": 1, "vram_mb_overhead": 1, "supported_batch_sizes": [1]}),
            "perf.vram_mb_overhead",
        )[0]
        == "not applicable"
    )


def test_best_checkpoint_metric_training_does_not_report_is_not_applicable() -> None:
    assert judge("training.config.metric_for_best_model", "eval_loss", CPU).status == "active"
    assert judge("training.config.metric_for_best_model", "eval_accuracy", CPU).status == "not applicable"


def test_empty_reference_hashes_are_reported_as_empty() -> None:
    verdict = judge("base_models[0].adapters[0].sha256", "", CPU)
    assert verdict.status == "not applicable" and "empty" in verdict.detail


def test_device_can_be_forced_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTSERVE_DEVICE", "cuda")
    assert RuntimeContext.detect().device == "cuda"


def test_declared_tools_are_reported_and_auto_is_not_applicable() -> None:
    data = manifest()
    data["training"]["decoding"] = {"tools": [{"name": "lookup"}], "tool_choice": "lookup"}
    assert status_of(data, "training.decoding.tools[0].name")[0] == "active"
    status, detail = status_of(data, "training.decoding.tool_choice")
    assert status == "active" and "'lookup'" in detail
    data["training"]["decoding"]["tool_choice"] = "auto"
    status, detail = status_of(data, "training.decoding.tool_choice")
    assert status == "not applicable" and "'required'" in detail
