"""`expertserve eval`: base model and expert on the held-out test split, with the expert's own decoding and
grammar, an objective scorer, and an ablation (adapter alone, soft prompt alone, both)."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertserve.datasets.common import prompt_messages, read_jsonl
from expertserve.decoding import describe, load_defaults, resolve, resolve_constraint
from expertserve.errors import ExpertserveError
from expertserve.eval.scorers import SCORERS
from expertserve.manifest.load import load_manifest
from expertserve.models import offline

# --split name -> the dataset field naming its file.
SPLITS = {"test": "test_path", "valid": "validation_path"}


class EvalError(ExpertserveError):
    """The expert cannot be evaluated (no scorer, no test split, no trained adapter)."""


@dataclass
class EvalReport:
    """Scores of one evaluation (fractions 0-1)."""

    expert: str
    metric: str
    n: int
    base_score: float | None  # None with expert_only
    expert_score: float
    improvement: float | None
    ablation: dict[str, float]
    decoding: str
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list)
    split: str = "test"
    # The scorer's well-formedness check (e.g. valid_json): its name, and its share per condition.
    well_formed_metric: str | None = None
    well_formed: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (`--json`)."""
        return asdict(self)


@dataclass(frozen=True)
class EvalSettings:
    """How `expertserve eval` runs (the command's options)."""

    limit: int | None = None  # score the first N examples only
    base_model_dir: Path | None = None  # default: the prepared offline model
    base_model_id: str | None = None  # the id the manifest names for that base; default: the offline model's
    write: bool = True  # write quality_metrics (test split, with the base model only)
    split: str = "test"  # or "valid", the split to choose settings on
    expert_only: bool = False  # skip the base model and the ablation


@dataclass(frozen=True)
class _Task:
    """What one evaluation scores: the expert's examples, its scorer, its adapter and decoding."""

    loaded: Any  # LoadedManifest
    scorer: Any
    test_file: Path
    examples: list[dict[str, Any]]
    adapter_dir: Path
    adapter_rank: int


def evaluate(
    expert_dir: Path,
    settings: EvalSettings | None = None,
    *,
    engine: Any = None,
    log: Callable[[str], None] | None = None,
) -> EvalReport:
    """Scores base model and expert; writes quality_metrics into the manifest when `settings.write`.

    `split="valid"` scores the validation split, the one to choose settings on; quality_metrics are never
    written from it (they report the test split). `expert_only` skips the base model and the ablation.

    Raises:
        EvalError: No scorer, no such split, or no trained adapter for the base model.
    """
    from expertserve.engine.batch import BatchEngine

    settings = settings or EvalSettings()
    start = time.monotonic()
    task = _task(expert_dir, settings)
    own_engine = engine is None
    if own_engine:
        model_dir = settings.base_model_dir or offline.prepared_model_dir()
        engine = BatchEngine(model_dir, max_lora_rank=task.adapter_rank)
    try:
        report = _run(task, engine, settings, log)
    finally:
        if own_engine:
            engine.close()
    report.seconds = time.monotonic() - start
    if settings.write and settings.split == "test" and not settings.expert_only:
        write_quality_metrics(task.loaded.path, report)
    return report


def _task(expert_dir: Path, settings: EvalSettings) -> _Task:
    """The expert's scorer, split and trained adapter, each checked with an error that names what is missing."""
    loaded = load_manifest(expert_dir)
    m = loaded.manifest
    scorer_name = m.evaluation.scorer if m.evaluation else None
    if scorer_name is None:
        raise EvalError(f"{loaded.path}: evaluation.scorer is not set (one of {', '.join(SCORERS)})")
    if settings.split not in SPLITS:
        raise EvalError(f"split {settings.split!r}: expected one of {', '.join(SPLITS)}")
    split_path = getattr(m.training.dataset, SPLITS[settings.split])
    if not split_path:
        raise EvalError(f"{loaded.path}: training.dataset.{SPLITS[settings.split]} is not set")
    test_file = loaded.root / split_path
    base_id = settings.base_model_id or offline.DEFAULT_MODEL.model_id
    entry = m.adapter_for(base_id)
    if entry is None:
        raise EvalError(f"{loaded.path}: no adapter for base model {base_id}")
    adapter_dir = loaded.root / entry.path
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise EvalError(f"{adapter_dir}: no trained adapter; run `expertserve train {expert_dir}` first")
    examples = read_jsonl(test_file)[: settings.limit]
    return _Task(loaded, SCORERS[scorer_name], test_file, examples, adapter_dir, entry.r or 8)


def _run(task: _Task, engine: Any, settings: EvalSettings, log: Callable[[str], None] | None) -> EvalReport:
    """Generates and scores every condition (base, expert, and the ablation) with the expert's decoding."""
    from expertserve.engine.sampling import sampling_params
    from expertserve.engine.soft_prompts import load_soft_prompts

    m, root, scorer = task.loaded.manifest, task.loaded.root, task.scorer
    resolved = resolve({}, m.decoding, load_defaults())
    constraint = resolve_constraint(None, m.decoding, root)
    params = sampling_params({k: v.value for k, v in resolved.items()}, constraint, seed=0)
    soft = load_soft_prompts([root / sp.path for sp in m.soft_prompts])
    conditions = _conditions((m.name, 1, str(task.adapter_dir)), soft, settings.expert_only)
    scores: dict[str, float] = {}
    well_formed: dict[str, float] = {}
    failures: list[dict[str, str]] = []
    for step, (name, (lora, prompt)) in enumerate(conditions.items(), 1):
        label = f"[{step}/{len(conditions)}] {m.name} {name}"
        if log:
            log(f"{label}: generating {len(task.examples)} {settings.split} examples ...")
        started = time.monotonic()
        outputs, ok = _generate_and_score(task, engine, params, lora, prompt)
        scores[name] = sum(ok) / len(ok)
        if scorer.well_formed:
            well_formed[name] = sum(map(scorer.well_formed[1], outputs)) / len(outputs)
        if log:
            log(f"{label}: {scorer.metric} {scores[name]:.1%} ({time.monotonic() - started:.0f} s)")
        if name == "expert":
            failures = _failures(task.examples, outputs, ok)
    return EvalReport(
        m.name,
        scorer.metric,
        len(task.examples),
        scores.get("base"),
        scores["expert"],
        scores["expert"] - scores["base"] if "base" in scores else None,
        {k: v for k, v in scores.items() if k not in ("base", "expert")},
        describe(resolved, constraint),
        0.0,
        failures,
        settings.split,
        scorer.well_formed[0] if scorer.well_formed else None,
        well_formed,
    )


def _conditions(lora: Any, soft: Any, expert_only: bool) -> dict[str, tuple[Any, Any]]:
    """The conditions scored: (LoRA, soft prompt) for the base model, the expert, and the ablation."""
    if expert_only:
        return {"expert": (lora, soft)}
    conditions: dict[str, tuple[Any, Any]] = {"base": (None, None), "expert": (lora, soft)}
    if soft is not None:
        conditions["adapter_only"] = (lora, None)
        conditions["soft_prompt_only"] = (None, soft)
    return conditions


def _generate_and_score(
    task: _Task, engine: Any, params: Any, lora: Any, soft: Any
) -> tuple[list[str], list[bool]]:
    from expertserve.engine.batch import GenerationRequest

    outputs = engine.generate(
        [GenerationRequest(prompt_messages(e), params, lora, soft) for e in task.examples]
    )
    metas = [e["meta"] for e in task.examples]
    return outputs, task.scorer.score_many(outputs, metas, task.test_file.parent)


def _failures(examples: list[dict[str, Any]], outputs: list[str], ok: list[bool]) -> list[dict[str, str]]:
    """The first five examples the expert got wrong: prompt (tail), output and gold."""
    return [
        {"prompt": e["messages"][-2]["content"][-200:], "output": o, "gold": e["messages"][-1]["content"]}
        for e, o, good in zip(examples, outputs, ok, strict=True)
        if not good
    ][:5]


def write_quality_metrics(manifest_file: Path, report: EvalReport) -> None:
    """Puts the scores into `quality_metrics`, keeping the rest of the manifest (comments included) as is."""
    if report.base_score is None or report.improvement is None:
        raise EvalError("quality_metrics need the base model's score (this report was made with expert_only)")
    raw = json.loads(manifest_file.read_text())
    qm = raw.setdefault("quality_metrics", {})
    qm.update(
        {
            "benchmark_score": round(report.expert_score, 4),
            "base_model_score": round(report.base_score, 4),
            "improvement_percent": round(100 * report.improvement / report.base_score, 1)
            if report.base_score
            else None,
            "improvement_points": round(100 * report.improvement, 1),
            "test_queries": report.n,
            "test_date": dt.date.today().isoformat(),
            "metric": report.metric,
        }
    )
    if qm["improvement_percent"] is None:
        del qm["improvement_percent"]
    for name, score in report.ablation.items():
        qm[f"{name}_score"] = round(score, 4)
    if report.well_formed_metric and "expert" in report.well_formed:
        qm[report.well_formed_metric] = round(report.well_formed["expert"], 4)
    checkpoint = raw.get("training", {}).get("checkpoint")
    if checkpoint:
        qm["checkpoint"] = checkpoint
        qm["training_steps"] = int(checkpoint.rsplit("-", 1)[-1])
    tmp = manifest_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    load_manifest(tmp)  # never write a manifest that would not validate
    tmp.replace(manifest_file)
