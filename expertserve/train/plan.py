"""The resolved training plan: manifest `training.config` plus command-line overrides. Pure Python.

Precedence, written once: command line > manifest > the defaults below. Fields of `training.config` that
training does not apply are listed in `ignored` with the reason (from the field-status table), and printed
at start, so nothing in the manifest is skipped silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertserve.datasets.common import read_jsonl
from expertserve.errors import ExpertserveError
from expertserve.manifest.files import outside_reason
from expertserve.manifest.load import LoadedManifest
from expertserve.manifest.status import RuntimeContext, field_statuses

DEFAULT_WARMUP_STEPS = 0
DEFAULT_SCHEDULER = "linear"
DEFAULT_MAX_SEQ_LENGTH = 1024
DEFAULT_LOGGING_STEPS = 10
DEFAULT_SAVE_STEPS = 50
DEFAULT_SEED = 0
# Metrics the training loop reports, so the only ones that can pick the best checkpoint.
REPORTED_METRICS = ("eval_loss", "loss")


class TrainingError(ExpertserveError):
    """Training cannot start or did not finish."""


@dataclass(frozen=True)
class SoftPromptPlan:
    """One soft prompt to train."""

    name: str
    tokens: int
    init_method: str
    init_text: str | None
    path: str


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training worker needs, as plain values (it is shipped to Ray workers)."""

    expert_name: str
    base_model_id: str
    base_model_dir: str
    train_file: str
    valid_file: str | None
    adapter_type: str
    target_modules: list[str]
    feedforward_modules: list[str] | None
    rank: int | None
    alpha: int | None
    dropout: float
    adapter_path: str
    soft_prompts: list[SoftPromptPlan]
    learning_rate: float
    batch_size: int
    grad_accum: int
    total_steps: int
    warmup_steps: int
    scheduler: str
    max_seq_length: int
    logging_steps: int
    save_steps: int
    save_total_limit: int | None
    eval_steps: int | None
    keep_best: bool
    best_metric: str
    greater_is_better: bool
    gradient_checkpointing: bool
    precision: str
    optimizer: str
    attn_implementation: str
    seed: int
    workers: int
    use_gpu: bool
    ignored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for Ray's train_loop_config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainPlan:
        """Inverse of to_dict."""
        data = dict(data)
        data["soft_prompts"] = [SoftPromptPlan(**sp) for sp in data["soft_prompts"]]
        return cls(**data)


def _inside(loaded: LoadedManifest, field: str, rel: str) -> Path:
    """A dataset path, which must stay inside the expert directory (no absolute paths, no `..` out of it,
    no symbolic link pointing elsewhere): training reads what the manifest names, nothing else on the machine."""
    reason = outside_reason(loaded.root, rel)
    if reason is not None:
        raise TrainingError(f"{loaded.path}: {field}: {reason}")
    return (loaded.root / rel).resolve()


def _precision_and_optimizer(cfg: Any, use_gpu: bool) -> tuple[str, str]:
    """fp16 only on a GPU; an 8-bit optimizer (not installed) and the fused one without a GPU fall back to AdamW."""
    precision = "fp16" if use_gpu and cfg.fp16 else "bf16" if cfg.bf16 else "fp32"
    optimizer = cfg.optim or "adamw_torch"
    if optimizer == "adamw_bnb_8bit" or (optimizer == "adamw_torch_fused" and not use_gpu):
        optimizer = "adamw_torch"
    return precision, optimizer


def make_plan(
    loaded: LoadedManifest,
    *,
    base_model_dir: Path,
    base_model_id: str,
    workers: int = 1,
    use_gpu: bool = False,
    max_steps: int | None = None,
) -> TrainPlan:
    """Resolves the plan for one expert.

    Raises:
        TrainingError: The expert has no adapter for the base model, or its dataset is missing or malformed.
    """
    m = loaded.manifest
    cfg, ds = m.training.config, m.training.dataset
    adapter = m.adapter_for(base_model_id)
    if adapter is None:
        trained = ", ".join(b.name for b in m.base_model_entries)
        raise TrainingError(
            f"{loaded.path}: no adapter for base model {base_model_id} (manifest names {trained})"
        )
    if cfg.method != "sft":
        raise TrainingError(
            f"{loaded.path}: training.config.method {cfg.method!r}: only 'sft' is implemented"
        )
    if adapter.effective_type not in ("lora", "dora", "ia3"):
        raise TrainingError(
            f"{loaded.path}: adapter type {adapter.effective_type!r} cannot be trained "
            "(expertserve trains lora, dora and ia3)"
        )
    if not ds.path:
        raise TrainingError(f"{loaded.path}: training.dataset.path is not set")
    train_file = _inside(loaded, "training.dataset.path", ds.path)
    n_train = len(read_jsonl(train_file))
    valid_file = (
        _inside(loaded, "training.dataset.validation_path", ds.validation_path)
        if ds.validation_path
        else None
    )
    if valid_file is not None:
        read_jsonl(valid_file)
    if n_train < workers:
        raise TrainingError(
            f"{train_file}: {n_train} training examples for {workers} workers; every worker needs at least one "
            f"(use --workers {n_train} or fewer)"
        )

    batch, accum = cfg.batch_size, cfg.gradient_accumulation_steps or 1
    steps_per_epoch = max(1, math.ceil(n_train / (batch * workers * accum)))
    epochs = cfg.epochs if cfg.epochs is not None else cfg.num_epochs
    total = max_steps or cfg.max_steps or max(1, math.ceil((epochs or 1) * steps_per_epoch))
    warmup = (
        round(cfg.warmup_ratio * total)
        if cfg.warmup_ratio is not None
        else (cfg.warmup_steps or DEFAULT_WARMUP_STEPS)
    )
    save_steps = steps_per_epoch if cfg.save_strategy == "epoch" else (cfg.save_steps or DEFAULT_SAVE_STEPS)
    if cfg.save_strategy == "no":
        save_steps = total  # only the final checkpoint, which the package needs
    evaluating = valid_file is not None and cfg.evaluation_strategy != "no"
    eval_steps = (
        (steps_per_epoch if cfg.evaluation_strategy == "epoch" else cfg.eval_steps or save_steps)
        if evaluating
        else None
    )
    precision, optimizer = _precision_and_optimizer(cfg, use_gpu)
    ctx = RuntimeContext(device="cuda" if use_gpu else "cpu")
    ignored = [
        f"{s.path}: {s.detail}"
        for s in field_statuses(m, ctx)
        if s.path.startswith("training.") and s.status == "not applicable"
    ]
    return TrainPlan(
        expert_name=m.name,
        base_model_id=base_model_id,
        base_model_dir=str(base_model_dir),
        train_file=str(train_file),
        valid_file=str(valid_file) if evaluating else None,
        adapter_type=adapter.effective_type,
        target_modules=list(cfg.target_modules or adapter.target_modules),
        feedforward_modules=cfg.feedforward_modules or adapter.feedforward_modules,
        rank=cfg.rank or adapter.r,
        alpha=cfg.alpha or adapter.alpha,
        dropout=cfg.dropout if cfg.dropout is not None else (adapter.dropout or 0.0),
        adapter_path=adapter.path,
        soft_prompts=[
            SoftPromptPlan(sp.name, sp.tokens, sp.init_method or "random", sp.init_text, sp.path)
            for sp in m.soft_prompts
        ],
        learning_rate=cfg.learning_rate,
        batch_size=batch,
        grad_accum=accum,
        total_steps=total,
        warmup_steps=min(warmup, total),
        scheduler=cfg.lr_scheduler or DEFAULT_SCHEDULER,
        max_seq_length=cfg.max_seq_length or DEFAULT_MAX_SEQ_LENGTH,
        logging_steps=cfg.logging_steps or DEFAULT_LOGGING_STEPS,
        save_steps=min(save_steps, total),
        save_total_limit=cfg.save_total_limit,
        eval_steps=eval_steps,
        keep_best=bool(cfg.load_best_model_at_end)
        and evaluating
        and (cfg.metric_for_best_model or "eval_loss") in REPORTED_METRICS,
        best_metric=cfg.metric_for_best_model or "eval_loss",
        greater_is_better=bool(cfg.greater_is_better),
        gradient_checkpointing=bool(cfg.gradient_checkpointing),
        precision=precision,
        optimizer=optimizer,
        attn_implementation="eager" if cfg.use_sdpa is False else "sdpa",
        seed=cfg.seed if cfg.seed is not None else DEFAULT_SEED,
        workers=workers,
        use_gpu=use_gpu,
        ignored=ignored,
    )
