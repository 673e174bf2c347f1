"""Starts a training run on Ray Train and turns its final checkpoint into a trained, packaged expert.

Runs are stored under `<storage>/<expert name>`; starting the trainer again with the same name and storage
resumes from the latest checkpoint (Ray Train V2), which is what `--resume` does. Without `--resume` an
earlier run of the same expert is cleared first.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertserve.manifest.load import MANIFEST_FILE, load_manifest
from expertserve.models import offline
from expertserve.packaging.archive import build_package
from expertserve.registry import version_key
from expertserve.settings import home_dir
from expertserve.train.faults import Faults
from expertserve.train.loop import CHECKPOINT_ADAPTER, CHECKPOINT_SOFT_PROMPTS, LoopConfig, train_loop
from expertserve.train.plan import TrainingError, TrainPlan, make_plan
from expertserve.train.plot import plot_loss
from expertserve.train.settings import TrainSettings, storage_location


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    expert_dir: Path
    package: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    seconds: float
    history: list[dict[str, Any]]
    loss_plot: Path | None = None


@dataclass(frozen=True)
class _Prepared:
    """A run ready to start: its plan, where it writes, and the version it will produce."""

    expert_dir: Path
    plan: TrainPlan
    out: Path
    version: str
    storage_path: str
    progress_file: Path
    use_tf32: bool


def train_expert(
    expert_dir: Path,
    settings: TrainSettings | None = None,
    *,
    resume: bool = False,
    progress: bool | None = None,
    log: Any = print,
) -> TrainResult:
    """Trains an expert's adapter and soft prompts with Ray Train and writes the trained expert: setup (the plan,
    checked before anything starts), build (the trainer), fit, then the expert and its package.

    Args:
        expert_dir: The expert directory (manifest and dataset).
        settings: How the run executes (workers, GPU, steps, output, base model, storage, ...); default: the
            defaults of `TrainSettings`.
        resume: Continue the latest run of this expert from its latest checkpoint.
        progress: Show a progress bar; default: when stdout is a terminal.
        log: Where the run's announcement goes.

    Raises:
        TrainingError: The plan cannot be made or the run failed.
    """
    start = time.monotonic()
    settings = settings or TrainSettings()
    prepared = _setup(expert_dir, settings, resume, log)
    trainer = _build(prepared, settings, Faults.from_env())
    result = _fit(trainer, prepared, progress)
    checkpoint = _chosen_checkpoint(result, prepared.plan)
    if checkpoint is None:
        raise TrainingError(f"training {prepared.plan.expert_name} produced no checkpoint")
    with checkpoint.as_directory() as d:
        _write_expert(prepared.expert_dir, prepared.out, Path(d), prepared.plan, prepared.version)
    package = build_package(
        prepared.out, prepared.out, sign_key=Path(settings.sign_key) if settings.sign_key else None
    )
    history = _read_progress(prepared.progress_file)
    losses = [h["loss"] for h in history if "loss" in h]
    plot = plot_loss(history, prepared.progress_file.with_name("loss.png"), _plot_title(prepared.plan))
    return TrainResult(
        prepared.out,
        package,
        prepared.plan.total_steps,
        losses[0] if losses else None,
        losses[-1] if losses else None,
        (result.metrics or {}).get("eval_loss"),
        time.monotonic() - start,
        history,
        plot,
    )


def _setup(expert_dir: Path, settings: TrainSettings, resume: bool, log: Any) -> _Prepared:
    """The plan (manifest and data checked before the base model, so their errors come first), the storage, the
    version, and a clean run directory unless resuming."""
    expert_dir = expert_dir.resolve()
    loaded = load_manifest(expert_dir)
    # Workers run in another working directory: every path they get is absolute.
    base_dir = (Path(settings.base_model) if settings.base_model else offline.model_dir()).resolve()
    plan = make_plan(
        loaded,
        base_model_dir=base_dir,
        base_model_id=settings.base_model_id or offline.DEFAULT_MODEL.model_id,
        workers=settings.workers,
        use_gpu=settings.gpu,
        max_steps=settings.max_steps,
    )
    try:
        storage_path, local = storage_location(settings.storage, home_dir() / "runs")
    except ValueError as e:
        raise TrainingError(str(e)) from None
    out = (Path(settings.output) if settings.output else expert_dir).resolve()
    version = settings.version or _next_version(loaded.manifest.version, out, plan)
    if settings.base_model is None:
        offline.prepared_model_dir()
    elif not (base_dir / "config.json").is_file():
        raise TrainingError(f"{base_dir}: not a model directory (no config.json)")
    _announce(plan, log)
    # Progress and markers stay on this machine; checkpoints go wherever `storage` says.
    run_dir = (Path(storage_path) if local else home_dir() / "progress") / plan.expert_name
    if not resume:
        _clear_run(storage_path, local, plan.expert_name)
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return _Prepared(
        expert_dir,
        plan,
        out,
        version,
        storage_path,
        run_dir / "progress.jsonl",
        bool(loaded.manifest.training.config.use_tf32),
    )


def _build(prepared: _Prepared, settings: TrainSettings, faults: Faults) -> Any:
    """The Ray Train trainer for the run (a local Ray cluster is started when none is given)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan, workers = prepared.plan, settings.workers
    _init_ray(ray, settings.address, workers, settings.cpus_per_worker)
    loop = LoopConfig(
        plan=plan.to_dict(),
        threads_per_worker=max(1, (os.cpu_count() or 1) // workers),
        progress_file=str(prepared.progress_file),
        tf32=prepared.use_tf32,
        faults=faults,
    )
    return TorchTrainer(
        train_loop,
        train_loop_config=loop.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=settings.gpu,
            placement_strategy=settings.placement_strategy,
            resources_per_worker={"CPU": settings.cpus_per_worker or 1},
        ),
        run_config=RunConfig(
            name=plan.expert_name,
            storage_path=prepared.storage_path,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=plan.save_total_limit,
                checkpoint_score_attribute=plan.best_metric if plan.keep_best else None,
                checkpoint_score_order="max" if plan.greater_is_better else "min",
            ),
        ),
    )


def _fit(trainer: Any, prepared: _Prepared, progress: bool | None) -> Any:
    """Runs the trainer (with a progress bar on a terminal); its result, or a TrainingError."""
    plan = prepared.plan
    show = progress if progress is not None else sys.stdout.isatty()
    bar = _ProgressBar(prepared.progress_file, plan.total_steps) if show else None
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; report them as a training failure
        raise TrainingError(f"training {plan.expert_name} failed: {e}") from e
    finally:
        if bar:
            bar.stop()
    bad_step = (result.metrics or {}).get("non_finite_loss_step")
    if bad_step is not None:
        raise TrainingError(
            f"training {plan.expert_name} stopped: the loss is not finite (NaN or infinite) at step {bad_step}; "
            "nothing was written. Lower training.config.learning_rate, or check the data for empty answers"
        )
    return result


def _plot_title(plan: TrainPlan) -> str:
    modules = ",".join(m.removesuffix("_proj") for m in plan.target_modules)
    soft = f", soft prompt {sum(s.tokens for s in plan.soft_prompts)} tokens" if plan.soft_prompts else ""
    return (
        f"{plan.expert_name}: {plan.adapter_type} r={plan.rank} on {modules}{soft}\n"
        f"{plan.total_steps} steps x {plan.batch_size * plan.grad_accum} examples, lr {plan.learning_rate}, "
        f"{plan.precision}, {plan.workers} worker(s)"
    )


def _announce(plan: TrainPlan, log: Any) -> None:
    sp = ", ".join(f"{s.name} ({s.tokens} tokens, {s.init_method})" for s in plan.soft_prompts) or "none"
    log(
        f"training {plan.expert_name}: {plan.adapter_type} r={plan.rank} alpha={plan.alpha} on {plan.base_model_id}; "
        f"soft prompts: {sp}; {plan.total_steps} steps x {plan.batch_size} x {plan.grad_accum} accumulation x "
        f"{plan.workers} worker(s); lr {plan.learning_rate} {plan.scheduler}, warm-up {plan.warmup_steps}; "
        f"{plan.precision}; checkpoint every {plan.save_steps} steps"
    )
    for line in plan.ignored:
        log(f"  not applied: {line}")


def _init_ray(ray: Any, address: str | None, workers: int, cpus_per_worker: float | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # A local cluster with enough logical CPUs for the workers and Train's controller: Train waits forever,
    # silently, when the cluster lacks the CPUs it asks for. The dashboard stays on: Train's placement-group
    # cleaner polls the controller through the State API and floods the log without it.
    need = int(workers * (cpus_per_worker or 1)) + 1
    ray.init(
        address="local",
        num_cpus=max(need, os.cpu_count() or 1),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(),
        object_store_memory=100 * 2**20,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chosen_checkpoint(result: Any, plan: TrainPlan) -> Any:
    if plan.keep_best and result.best_checkpoints:
        sign = -1 if plan.greater_is_better else 1
        scored = [(c, m) for c, m in result.best_checkpoints if m.get(plan.best_metric) is not None]
        if scored:
            return min(scored, key=lambda cm: sign * cm[1][plan.best_metric])[0]
    return result.checkpoint


def _next_version(version: str, out: Path, plan: TrainPlan) -> str:
    """The manifest's version, or, when `out` already holds a trained adapter, the next patch after the higher of
    the two (a retrained expert never reuses the version of different weights)."""
    weights = out / plan.adapter_path / "adapter_model.safetensors"
    if not weights.is_file():
        return version
    try:
        current = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))["version"]
        key = max(version_key(version), version_key(current))
    except (OSError, ValueError, KeyError, TypeError):
        key = version_key(version)
    return f"{key[0]}.{key[1]}.{key[2] + 1}"


def _clear_run(storage_path: str, local: bool, name: str) -> None:
    """Removes an earlier run of this expert, so a fresh run does not resume it."""
    if local:
        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
        return
    from pyarrow import fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(storage_path)
        run = f"{root.rstrip('/')}/{name}"
        if fs.get_file_info(run).type != pafs.FileType.NotFound:
            fs.delete_dir(run)
    except (OSError, ValueError) as e:
        raise TrainingError(f"storage {storage_path}: cannot clear the earlier run of {name}: {e}") from None


def _write_expert(source: Path, out: Path, checkpoint: Path, plan: TrainPlan, version: str) -> None:
    """Writes the trained expert into a new directory beside `out` and renames it into place: a reader (a server
    rescanning its roots) sees the old expert or the new one, never a mix, and a failure leaves `out` as it was.
    The new version drops `quality_metrics`, which described other weights, until `expertserve eval` runs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))
    new = staging / "expert"
    try:
        # In place, everything of the expert stays (its data, earlier packages); elsewhere, not stale packages.
        ignore = (
            shutil.ignore_patterns(".runs") if out == source else shutil.ignore_patterns(".runs", "*.expert")
        )
        shutil.copytree(source, new, ignore=ignore, symlinks=True)
        if out != source and out.is_dir():
            for package in out.glob("*.expert"):
                shutil.copy2(package, new / package.name)
        adapter_dir = new / plan.adapter_path
        adapter_dir.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(checkpoint / CHECKPOINT_ADAPTER / name, adapter_dir / name)
        for sp in plan.soft_prompts:
            target = new / sp.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint / CHECKPOINT_SOFT_PROMPTS / f"{sp.name}.safetensors", target)
        manifest_file = new / MANIFEST_FILE
        raw = json.loads(manifest_file.read_text(encoding="utf-8"))
        step = json.loads((checkpoint / "step.json").read_text())["step"]
        raw["version"] = version
        raw.pop("quality_metrics", None)
        raw["training"]["trained_on"] = dt.date.today().isoformat()
        raw["training"]["checkpoint"] = f"checkpoint-{step}"
        raw["training"]["base_model_version"] = plan.base_model_id
        manifest_file.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists():
            os.replace(out, staging / "old")
        os.replace(new, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_progress(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _ProgressBar:
    """A terminal progress bar fed by the rank-0 worker's progress file."""

    def __init__(self, path: Path, total: int):
        from tqdm import tqdm

        self.path, self.stop_flag = path, threading.Event()
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        offset = 0
        while not self.stop_flag.is_set():
            if self.path.exists():
                with self.path.open() as f:
                    f.seek(offset)
                    for line in f:
                        record = json.loads(line)
                        if "step" in record:
                            self.bar.n = record["step"]
                            self.bar.set_postfix(
                                loss=f"{record['loss']:.3f}",
                                lr=f"{record['lr']:.1e}",
                                tok_s=f"{record['tokens_per_s']:.0f}",
                            )
                    offset = f.tell()
            self.stop_flag.wait(0.5)

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=2)
        self.bar.close()
