"""Training on real Ray Train with 2 CPU workers: LoRA + soft prompt, a lost worker, --resume, the package."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from expertserve.manifest.files import soft_prompt_shape
from expertserve.packaging.archive import verify_package
from tests.helpers import make_expert, manifest

pytestmark = pytest.mark.cluster

TINY_ID = "tiny-test-model"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """The local cluster train_expert starts, shut down after the module's tests."""
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from expertserve.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("train")
    base = build_tiny_model(root / "tiny")
    data = manifest()
    data["base_models"][0]["name"] = TINY_ID
    data["base_models"][0]["adapters"][0].update(r=8, alpha=16, target_modules=MODULES)
    data["soft_prompts"][0].update(init_method="text", init_text="SELECT name FROM users")
    data["training"]["config"].update(
        rank=8,
        alpha=16,
        target_modules=MODULES,
        learning_rate=0.03,
        batch_size=4,
        max_steps=12,
        save_steps=4,
        logging_steps=1,
        lr_scheduler="constant",
    )
    data["training"]["decoding"].pop("grammar_file")
    expert = make_expert(root / "expert-demo", data)
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "soft_prompts/style.safetensors",
    ):
        (expert / name).unlink()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"SELECT {w}"},
                {"role": "assistant", "content": f"{w} FROM users WHERE age > {i}"},
            ]
        }
        for i, w in enumerate(["name", "age", "email", "city"] * 4)
    ]
    (expert / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expert, base


def test_two_workers_survive_a_lost_worker_resume_and_package(
    ray_cluster: None, tiny_expert: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from expertserve.train.faults import ENV as FAULTS_ENV
    from expertserve.train.launch import train_expert
    from expertserve.train.settings import TrainSettings

    expert, base = tiny_expert
    storage, out = tmp_path / "runs", tmp_path / "out"
    settings = TrainSettings(
        workers=2,
        base_model=str(base),
        base_model_id=TINY_ID,
        storage=str(storage),
        cpus_per_worker=0.5,
        output=str(out),
    )
    quiet = dict(progress=False, log=lambda line: None)

    # A worker fails at step 7; FailureConfig restarts the group from the step-4 checkpoint.
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"fail_once_at_step": 7}))
    result = train_expert(expert, settings, **quiet)
    monkeypatch.delenv(FAULTS_ENV)
    steps = [h["step"] for h in result.history if "step" in h]
    assert steps[-1] == 12
    assert steps.count(5) == 2 and steps.count(6) == 2, f"expected a restart from step 4: {steps}"
    first = [h["loss"] for h in result.history[:2]]
    last = [h["loss"] for h in result.history if h.get("step") in (11, 12)][-2:]
    assert sum(last) / 2 < sum(first) / 2 - 0.1, (first, last)
    assert result.loss_plot == storage / "expert-demo" / "loss.png"
    assert result.loss_plot.read_bytes()[:4] == b"\x89PNG"

    # The trained expert and its package hold the adapter and the soft prompt.
    assert result.package == out / "expert-demo-0.1.0.expert"
    info = verify_package(result.package)
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "soft_prompts/style.safetensors",
        "manifest.json",
    } <= set(info.files)
    with tarfile.open(result.package) as tar:
        config = json.load(tar.extractfile("adapter/adapter_config.json"))
    assert config["base_model_name_or_path"] == TINY_ID and config["r"] == 8
    assert soft_prompt_shape(out / "soft_prompts" / "style.safetensors") == (4, 64)
    trained = json.loads((out / "manifest.json").read_text())
    assert trained["training"]["checkpoint"] == "checkpoint-12"
    assert not (expert / "adapter" / "adapter_model.safetensors").exists(), (
        "the source expert stays untouched"
    )

    # --resume continues the same run from its latest readable checkpoint. The latest (step 12) is replaced by one
    # crafted to run code: resuming must not run it, must say which checkpoint it skipped, and must continue from
    # the one before (step 8) to a longer length. The retrained expert gets the version asked for, its package a
    # new name, and no quality figures of the older weights. (One resumed run for both: each run costs a Ray Train
    # start, about 35 s here.)
    import torch

    from expertserve.train.loop import CHECKPOINT_STATE

    checkpoints = sorted(
        (d for d in (storage / "expert-demo").glob("checkpoint_*") if d.is_dir()),
        key=lambda d: json.loads((d / "step.json").read_text())["step"],
    )
    assert [json.loads((d / "step.json").read_text())["step"] for d in checkpoints][-2:] == [8, 12]
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _RunsCode(marker)}, checkpoints[-1] / CHECKPOINT_STATE)
    longer = settings.model_copy(update={"max_steps": 14, "version": "2.0.0"})
    resumed = train_expert(expert, longer, resume=True, **quiet)
    steps = [h["step"] for h in resumed.history if "step" in h]  # the run's whole history, the first part too
    assert not marker.exists()
    assert steps.count(9) == 2 and steps[-6:] == [9, 10, 11, 12, 13, 14], (
        f"expected a resume from step 8: {steps}"
    )
    retrained = json.loads((out / "manifest.json").read_text())
    # The version asked for (without one, the next patch version: tests/unit/test_plan.py).
    assert retrained["training"]["checkpoint"] == "checkpoint-14" and retrained["version"] == "2.0.0"
    assert "quality_metrics" not in retrained and resumed.package.name == "expert-demo-2.0.0.expert"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "runs"], "no staging directory left"


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_non_finite_loss_stops_the_run_and_writes_nothing(
    ray_cluster: None, tiny_expert: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from expertserve.train.faults import ENV as FAULTS_ENV
    from expertserve.train.launch import train_expert
    from expertserve.train.plan import TrainingError
    from expertserve.train.settings import TrainSettings

    expert, base = tiny_expert
    out = tmp_path / "out"
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"nan_at_step": 3}))
    settings = TrainSettings(
        workers=2,
        cpus_per_worker=0.5,
        base_model=str(base),
        base_model_id=TINY_ID,
        storage=str(tmp_path / "runs"),
        output=str(out),
        max_steps=6,
    )
    with pytest.raises(TrainingError, match="loss is not finite .* at step 3; nothing was written"):
        train_expert(expert, settings, progress=False, log=lambda line: None)
    assert not out.exists()


def test_training_errors_are_reported_not_raised_as_tracebacks(
    ray_cluster: None, tiny_expert: tuple[Path, Path], tmp_path: Path
) -> None:
    from expertserve.train.launch import train_expert
    from expertserve.train.plan import TrainingError
    from expertserve.train.settings import TrainSettings

    expert, base = tiny_expert
    with pytest.raises(TrainingError, match="no adapter for base model other-model"):
        train_expert(
            expert,
            TrainSettings(base_model=str(base), base_model_id="other-model", storage=str(tmp_path)),
            log=print,
        )
