"""The training plan: command line > manifest > defaults, and the report of what training does not apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from expertserve.datasets.common import DatasetError
from expertserve.manifest import load_manifest
from expertserve.train.plan import TrainingError, TrainPlan, make_plan
from tests.helpers import make_expert, manifest

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def plan_for(tmp_path: Path, config: dict[str, Any] | None = None, n: int = 40, **kw: Any) -> TrainPlan:
    data = manifest()
    data["training"]["config"].update(config or {})
    root = make_expert(tmp_path / "expert-demo", data)
    line = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (root / "data" / "train.jsonl").write_text("\n".join([line] * n) + "\n")
    return make_plan(load_manifest(root), base_model_dir=Path("/m"), base_model_id=BASE, **kw)


def test_length_from_epochs(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, {"epochs": 2, "batch_size": 4, "gradient_accumulation_steps": 2}, n=40)
    assert plan.total_steps == 2 * 40 // (4 * 2)


def test_workers_share_an_epoch(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, {"epochs": 1, "batch_size": 4}, n=40, workers=2)
    assert plan.total_steps == 5


def test_command_line_beats_manifest_beats_default(tmp_path: Path) -> None:
    assert plan_for(tmp_path, {"max_steps": 30}, max_steps=7).total_steps == 7
    assert plan_for(tmp_path / "b", {"max_steps": 30}).total_steps == 30
    plan = plan_for(tmp_path / "c")
    assert (plan.scheduler, plan.logging_steps, plan.seed) == ("linear", 10, 0)


def test_warmup_ratio_wins_over_steps(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, {"max_steps": 50, "warmup_ratio": 0.1, "warmup_steps": 20})
    assert plan.warmup_steps == 5


def test_adapter_and_soft_prompts_come_from_the_manifest(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, {"dropout": 0.2})
    assert (plan.adapter_type, plan.rank, plan.alpha, plan.dropout) == ("lora", 4, 8, 0.2)
    assert plan.target_modules == ["q_proj", "v_proj"] and plan.adapter_path == "adapter"
    assert [(s.name, s.tokens, s.init_method) for s in plan.soft_prompts] == [("style", 4, "random")]
    assert TrainPlan.from_dict(plan.to_dict()) == plan


def test_unapplied_options_are_reported(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, {"use_unsloth": True, "packing": True, "optim": "adamw_bnb_8bit"})
    reported = "\n".join(plan.ignored)
    assert "training.config.use_unsloth" in reported and "training.config.packing" in reported
    assert "training.config.optim" in reported and plan.optimizer == "adamw_torch"


def test_cuda_precision_only_on_gpu(tmp_path: Path) -> None:
    assert plan_for(tmp_path, {"fp16": True}).precision == "fp32"
    assert plan_for(tmp_path / "g", {"fp16": True}, use_gpu=True).precision == "fp16"
    assert plan_for(tmp_path / "b", {"bf16": True}).precision == "bf16"


def test_best_checkpoint_needs_a_reported_metric(tmp_path: Path) -> None:
    data_cfg = {"load_best_model_at_end": True, "metric_for_best_model": "eval_accuracy"}
    root = tmp_path / "x"
    plan = plan_for(root, data_cfg)
    assert plan.keep_best is False
    assert any("metric_for_best_model" in line for line in plan.ignored)


def test_wrong_base_model_is_an_error(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo")
    with pytest.raises(TrainingError, match="no adapter for base model other/model"):
        make_plan(load_manifest(root), base_model_dir=Path("/m"), base_model_id="other/model")


def test_malformed_dataset_names_file_and_line(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo")
    (root / "data" / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(DatasetError, match=r"train.jsonl:1: the last message must be the assistant's answer"):
        make_plan(load_manifest(root), base_model_dir=Path("/m"), base_model_id=BASE)


def test_more_workers_than_examples_is_an_error_before_ray(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="3 training examples for 4 workers.*--workers 3"):
        plan_for(tmp_path, n=3, workers=4)


def test_a_dataset_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo", manifest())
    line = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (root / "data" / "train.jsonl").write_bytes(f"{line}\n".encode() + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"train.jsonl:2: not UTF-8"):
        make_plan(load_manifest(root), base_model_dir=Path("/m"), base_model_id=BASE)


@pytest.mark.parametrize("where", ["/etc/passwd", "../outside.jsonl", "data/link.jsonl"])
def test_dataset_paths_stay_inside_the_expert(tmp_path: Path, where: str) -> None:
    data = manifest()
    root = make_expert(tmp_path / "expert-demo", data)
    (tmp_path / "outside.jsonl").write_text("{}\n")
    (root / "data" / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    data["training"]["dataset"]["path"] = where
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(
        TrainingError, match=r"training.dataset.path: .*(inside|outside) the expert directory"
    ):
        make_plan(load_manifest(root), base_model_dir=Path("/m"), base_model_id=BASE)


def test_storage_takes_what_ray_train_takes_and_refuses_other_schemes(tmp_path: Path) -> None:
    from expertserve.train.settings import storage_location

    assert storage_location(None, tmp_path) == (str(tmp_path.resolve()), True)
    assert storage_location("s3://bucket/runs", tmp_path) == ("s3://bucket/runs", False)
    assert storage_location("gs://bucket", tmp_path) == ("gs://bucket", False)
    assert storage_location(f"file://{tmp_path}/r", tmp_path) == (str(tmp_path / "r"), True)
    assert storage_location(str(tmp_path / "x"), tmp_path) == (str(tmp_path / "x"), True)
    for bad in ("ftp://host/runs", "s3://", "mystore://x"):
        with pytest.raises(ValueError, match="storage: .*expected a directory or a URI of s3://"):
            storage_location(bad, tmp_path)


def test_a_retrained_expert_takes_the_next_patch_version_never_the_old_one(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from expertserve.train.launch import _next_version

    plan: Any = SimpleNamespace(adapter_path="adapter")
    out = tmp_path / "out"
    assert _next_version("0.1.0", out, plan) == "0.1.0"  # nothing trained there yet
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "manifest.json").write_text(json.dumps({"version": "0.1.0"}))
    assert _next_version("0.1.0", out, plan) == "0.1.1"
    (out / "manifest.json").write_text(json.dumps({"version": "0.3.2"}))
    assert _next_version("0.1.0", out, plan) == "0.3.3"  # above the higher of the two
    assert _next_version("1.0.0", out, plan) == "1.0.1"
    (out / "manifest.json").write_text("{not json")
    assert _next_version("0.2.0", out, plan) == "0.2.1"
