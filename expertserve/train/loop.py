"""The per-worker training loop that Ray Train runs (`TorchTrainer(train_loop_per_worker=train_loop)`).

Every worker calls `ray.train.report` equally often (it is a barrier): at each logging step without a
checkpoint, and at each save step with one from rank 0. A restarted worker group (FailureConfig) or a
resumed run finds the latest checkpoint through `ray.train.get_checkpoint()` and continues from its step.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertserve.train.faults import Faults

CHECKPOINT_ADAPTER = "adapter"
CHECKPOINT_SOFT_PROMPTS = "soft_prompts"
CHECKPOINT_STATE = "optimizer.pt"
CHECKPOINT_SCHEDULER = "scheduler.json"


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (Ray passes `train_loop_config` as a dict: `to_dict` / `from_dict`)."""

    plan: dict[str, Any]  # TrainPlan.to_dict()
    threads_per_worker: int = 1
    progress_file: str | None = None
    tf32: bool = False
    faults: Faults = field(default_factory=Faults)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "faults": self.faults.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        return cls(**{**data, "faults": Faults(**data.get("faults") or {})})


@dataclass
class _Run:
    """One worker's training state, built by `_build` and advanced by `_fit`."""

    plan: Any  # TrainPlan
    config: LoopConfig
    rank: int
    world: int
    module: Any  # the (DDP-wrapped) ExpertModule
    inner: Any  # the ExpertModule itself
    optimizer: Any
    scheduler: Any
    scaler: Any
    autocast: Any
    device: Any
    pad: int
    shard: list[dict[str, list[int]]]
    valid: list[dict[str, list[int]]]
    step: int = 0


def train_loop(config: dict[str, Any]) -> None:
    """Trains the adapter and soft prompts of one expert (runs inside each Ray Train worker): setup, build, fit
    (which validates at the eval steps)."""
    import ray.train

    from expertserve.train.plan import TrainPlan

    loop = LoopConfig.from_dict(config)
    plan = TrainPlan.from_dict(loop.plan)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup(plan, loop, rank)
    run = _build(plan, loop, rank, world)
    _fit(run)


def _setup(plan: Any, loop: LoopConfig, rank: int) -> None:
    """Seeds, threads and the offline hub, before anything is loaded."""
    import torch

    # No hub at run time: a wrong model path must fail at once, not after network timeouts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _record_worker(loop.progress_file, rank)
    torch.manual_seed(plan.seed)
    random.seed(plan.seed)
    if not plan.use_gpu:
        torch.set_num_threads(max(1, loop.threads_per_worker))
    elif loop.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True


def _build(plan: Any, loop: LoopConfig, rank: int, world: int) -> _Run:
    """The model with its adapter and soft prompts, the optimizer and schedule (resumed from the latest checkpoint
    if there is one), and this worker's data."""
    import ray.train
    import torch
    from ray.train.torch import prepare_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from expertserve.train.modules import ExpertModule, init_soft_prompt

    tokenizer = AutoTokenizer.from_pretrained(plan.base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        plan.base_model_dir, dtype=torch.float32, attn_implementation=plan.attn_implementation
    )
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    peft_model = _peft(model, plan)
    generator = torch.Generator().manual_seed(plan.seed)
    embeddings = model.get_input_embeddings().weight
    soft = [
        init_soft_prompt(sp.init_method, sp.tokens, embeddings, tokenizer, sp.init_text, generator)
        for sp in plan.soft_prompts
    ]
    module = prepare_model(ExpertModule(peft_model, soft))
    inner: ExpertModule = getattr(module, "module", module)
    optimizer = _optimizer([p for p in module.parameters() if p.requires_grad], plan)
    scheduler = get_scheduler(
        plan.scheduler, optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps
    )
    checkpoint = ray.train.get_checkpoint()
    step = _resume(checkpoint, inner, optimizer, scheduler, plan, rank) if checkpoint is not None else 0
    shard, valid = _data(plan, tokenizer, rank, world)
    device = next(module.parameters()).device
    return _Run(
        plan=plan,
        config=loop,
        rank=rank,
        world=world,
        module=module,
        inner=inner,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda") if plan.precision == "fp16" else None,
        autocast=_autocast(plan, device),
        device=device,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        shard=shard,
        valid=valid,
        step=step,
    )


def _optimizer(params: list[Any], plan: Any) -> Any:
    import torch

    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.learning_rate, momentum=0.9)
    return torch.optim.AdamW(params, lr=plan.learning_rate, fused=plan.optimizer == "adamw_torch_fused")


def _data(
    plan: Any, tokenizer: Any, rank: int, world: int
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """This worker's shard of the training examples, and (rank 0 only) up to 64 validation examples."""
    from expertserve.datasets.common import read_jsonl
    from expertserve.train.modules import encode

    def encoded(path: str) -> list[dict[str, list[int]]]:
        return [encode(e, tokenizer, plan.max_seq_length) for e in read_jsonl(Path(path))]

    train = _answered(encoded(plan.train_file), "training", rank, plan)
    valid = (
        _answered(encoded(plan.valid_file)[:64], "validation", rank, plan)
        if plan.valid_file and rank == 0
        else []
    )
    return train[rank::world], valid


def _fit(run: _Run) -> None:
    """Steps until the plan's total, reporting (a barrier: every worker equally often) at logging steps, and with a
    checkpoint from rank 0 at save steps; validates at eval steps."""
    plan = run.plan
    progress = _Progress(plan, run.rank, run.config.progress_file, start_step=run.step)
    batches = _batches(run.shard, plan, start_step=run.step)
    run.module.train()
    while run.step < plan.total_steps:
        loss, tokens = _accumulate(run, batches)
        loss = _checked_loss(run.config.faults.loss(loss, run.step + 1), run.world, run.device)
        if not math.isfinite(loss):
            _stop_non_finite(run, progress)
            return
        _optimizer_step(run)
        run.step += 1
        run.config.faults.maybe_fail(run.step, run.config.progress_file)
        metrics = progress.update(run.step, loss, run.scheduler.get_last_lr()[0], tokens * run.world)
        _report(run, progress, metrics)
    progress.finish()


def _accumulate(run: _Run, batches: Any) -> tuple[float, int]:
    """Forward and backward over `grad_accum` batches: the step's loss and its tokens on this worker."""
    from expertserve.train.modules import collate

    loss_sum, tokens = 0.0, 0
    for _ in range(run.plan.grad_accum):
        batch = {k: v.to(run.device) for k, v in collate(next(batches), run.pad).items()}
        with run.autocast:
            loss = run.module(**batch) / run.plan.grad_accum
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
    return loss_sum, tokens


def _optimizer_step(run: _Run) -> None:
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _report(run: _Run, progress: Any, metrics: dict[str, Any]) -> None:
    """Validates at eval steps (rank 0), then reports: with a checkpoint at save steps, without at logging steps."""
    import ray.train

    plan, step = run.plan, run.step
    saving = step % plan.save_steps == 0 or step == plan.total_steps
    evaluating = plan.eval_steps is not None and (step % plan.eval_steps == 0 or saving)
    if evaluating and run.rank == 0:
        metrics["eval_loss"] = _eval_loss(run.inner, run.valid, run.pad, run.device, run.autocast)
        progress.note_eval(step, metrics["eval_loss"])
    if saving:
        with tempfile.TemporaryDirectory() as tmp:
            if run.rank == 0:
                _save_state(Path(tmp), run.inner, run.optimizer, run.scheduler, step, plan)
            ckpt = ray.train.Checkpoint.from_directory(tmp) if run.rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
    elif step % plan.logging_steps == 0:
        ray.train.report(metrics)


def _stop_non_finite(run: _Run, progress: Any) -> None:
    """Every worker stops here together (the check is all-reduced) and tells the driver, which reports it and writes
    nothing: a non-finite step would make every weight NaN from here on. Ray Train keeps metrics only with a
    checkpoint: a marker checkpoint carries the news (resuming skips it)."""
    import ray.train

    run.optimizer.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        if run.rank == 0:
            (Path(tmp) / "non_finite.json").write_text(json.dumps({"step": run.step + 1}))
        marker = ray.train.Checkpoint.from_directory(tmp) if run.rank == 0 else None
        ray.train.report({**progress.last, "non_finite_loss_step": run.step + 1}, checkpoint=marker)


def _record_worker(progress_file: str | None, rank: int) -> None:
    """Writes which node this worker runs on next to the progress file (`workers/rank-N.json`)."""
    import socket

    import ray

    if not progress_file:
        return
    folder = Path(progress_file).with_name("workers")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )
    )


def _answered(
    examples: list[dict[str, list[int]]], split: str, rank: int, plan: Any
) -> list[dict[str, list[int]]]:
    """Drops examples whose answer was cut away by max_seq_length (no label left: their loss is 0/0), saying how
    many."""
    kept = [e for e in examples if any(label != -100 for label in e["labels"])]
    dropped = len(examples) - len(kept)
    if dropped and rank == 0:
        _say(
            f"[expertserve] {plan.expert_name}: dropped {dropped} of {len(examples)} {split} examples with no answer "
            f"tokens left after truncation to max_seq_length {plan.max_seq_length}"
        )
    if not kept and split == "training":
        raise ValueError(
            f"every training example loses its answer at max_seq_length {plan.max_seq_length}; raise "
            "training.config.max_seq_length"
        )
    return kept


def _checked_loss(loss: float, world: int, device: Any) -> float:
    """The step's loss, NaN on every worker when it is not finite on any (all-reduced), so all stop together."""
    import torch

    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
        dist.all_reduce(flag)
        if flag.item() > 0:
            return float("nan")
    return loss


def _peft(model: Any, plan: Any) -> Any:
    from peft import IA3Config, LoraConfig, get_peft_model

    if plan.adapter_type == "ia3":
        config = IA3Config(
            target_modules=plan.target_modules,
            feedforward_modules=plan.feedforward_modules or [],
            task_type="CAUSAL_LM",
        )
    else:
        config = LoraConfig(
            r=plan.rank,
            lora_alpha=plan.alpha,
            lora_dropout=plan.dropout,
            target_modules=plan.target_modules,
            use_dora=plan.adapter_type == "dora",
            task_type="CAUSAL_LM",
        )
    return get_peft_model(model, config)


def _autocast(plan: Any, device: Any) -> Any:
    import contextlib

    import torch

    if plan.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(shard: list[dict[str, list[int]]], plan: Any, start_step: int):
    """Endless batches, reshuffled each epoch with the seed; a resumed run skips what it has seen."""
    per_epoch = max(1, len(shard) // plan.batch_size)
    seen = start_step * plan.grad_accum
    epoch = seen // per_epoch
    skip = seen % per_epoch
    while True:
        order = list(range(len(shard)))
        random.Random(plan.seed + epoch).shuffle(order)
        for b in range(skip, per_epoch):
            yield [shard[i] for i in order[b * plan.batch_size : (b + 1) * plan.batch_size]]
        skip = 0
        epoch += 1


def _eval_loss(module: Any, valid: list[dict[str, list[int]]], pad: int, device: Any, autocast: Any) -> float:
    import torch

    from expertserve.train.modules import collate

    if not valid:
        return float("nan")
    module.eval()
    losses = []
    with torch.no_grad(), autocast:
        for i in range(0, len(valid), 8):
            batch = {k: v.to(device) for k, v in collate(valid[i : i + 8], pad).items()}
            losses.append(module(**batch).item())
    module.train()
    return sum(losses) / len(losses)


def _save_state(d: Path, module: Any, optimizer: Any, scheduler: Any, step: int, plan: Any) -> None:
    """A checkpoint that loads without unpickling code: adapter and soft prompts in safetensors, the optimizer's
    tensors in a `weights_only` torch file, the scheduler and the step in JSON."""
    import torch

    from expertserve.engine.soft_prompts import save_soft_prompt

    module.peft_model.save_pretrained(d / CHECKPOINT_ADAPTER)
    # The adapter names its base by the id clients use, not by this machine's cache path. (Set after saving:
    # PEFT would try to fetch the id's config from the hub while saving.)
    config_file = d / CHECKPOINT_ADAPTER / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = plan.base_model_id
    config_file.write_text(json.dumps(adapter_config, indent=2))
    for sp, tensor in zip(plan.soft_prompts, module.soft_prompts, strict=True):
        save_soft_prompt(d / CHECKPOINT_SOFT_PROMPTS / f"{sp.name}.safetensors", tensor)
    torch.save({"optimizer": optimizer.state_dict()}, d / CHECKPOINT_STATE)
    (d / CHECKPOINT_SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
    (d / "step.json").write_text(json.dumps({"step": step}))


def _load_state(d: Path, module: Any, optimizer: Any, scheduler: Any, plan: Any) -> int:
    """Restores a checkpoint written by `_save_state`. `torch.load(weights_only=True)` refuses any pickled object
    that is not a tensor or a plain container, so a checkpoint crafted to run code fails here instead.

    Raises:
        Exception: The checkpoint is unreadable (the caller falls back to an older one).
    """
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from expertserve.engine.soft_prompts import load_soft_prompt

    step = json.loads((d / "step.json").read_text())["step"]
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step.json: expected a step number, got {step!r}")
    state = torch.load(d / CHECKPOINT_STATE, weights_only=True)
    set_peft_model_state_dict(
        module.peft_model, load_file(str(d / CHECKPOINT_ADAPTER / "adapter_model.safetensors"))
    )
    with torch.no_grad():
        for sp, param in zip(plan.soft_prompts, module.soft_prompts, strict=True):
            param.copy_(load_soft_prompt(d / CHECKPOINT_SOFT_PROMPTS / f"{sp.name}.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(json.loads((d / CHECKPOINT_SCHEDULER).read_text()))
    return step


def _resume(checkpoint: Any, module: Any, optimizer: Any, scheduler: Any, plan: Any, rank: int) -> int:
    """The step to continue from: the latest checkpoint's, or, when it cannot be read, the newest older one that
    can (with a warning naming the one skipped). Raises when none can be read."""
    tried = []
    for candidate in _checkpoints_newest_first(checkpoint):
        try:
            with candidate.as_directory() as d:
                step = _load_state(Path(d), module, optimizer, scheduler, plan)
        except Exception as e:  # any unreadable part: try the one before
            tried.append(candidate.path)
            if rank == 0:
                _say(
                    f"[expertserve] warning: checkpoint {candidate.path} cannot be read ({type(e).__name__}: {e}); "
                    "trying the previous one"
                )
            continue
        if rank == 0:
            _say(f"[expertserve] resumed {plan.expert_name} from step {step} ({candidate.path})")
        return step
    raise RuntimeError(f"no checkpoint of {plan.expert_name} can be read (tried {', '.join(tried)})")


def _checkpoints_newest_first(latest: Any) -> list[Any]:
    """The latest checkpoint, then its older siblings in the run's storage (by their step)."""
    import ray.train

    found = [latest]
    try:
        fs, parent = latest.filesystem, latest.path.rstrip("/").rsplit("/", 1)[0]
        from pyarrow import fs as pafs

        infos = fs.get_file_info(pafs.FileSelector(parent))
        siblings = [
            i.path for i in infos if i.type == pafs.FileType.Directory and "checkpoint" in i.base_name
        ]
    except Exception:  # storage that cannot be listed: only the latest is known
        return found

    def step_of(path: str) -> int:
        try:
            with fs.open_input_stream(f"{path}/step.json") as f:
                return int(json.loads(f.read())["step"])
        except Exception:
            return -1

    older = sorted(
        (p for p in siblings if p.rstrip("/") != latest.path.rstrip("/")), key=step_of, reverse=True
    )
    return found + [ray.train.Checkpoint(path=p, filesystem=fs) for p in older]


class _Progress:
    """Step, loss, learning rate, tokens/s and ETA: periodic lines (job logs) and a JSON-lines file (the
    driver's progress bar)."""

    def __init__(self, plan: Any, rank: int, progress_file: str | None, start_step: int):
        self.plan, self.rank, self.start_step = plan, rank, start_step
        self.file = Path(progress_file) if progress_file and rank == 0 else None
        self.t0 = self.last_t = time.monotonic()
        self.tokens = 0
        self.last: dict[str, Any] = {"step": start_step}

    def update(self, step: int, loss: float, lr: float, tokens: int) -> dict[str, Any]:
        now = time.monotonic()
        self.tokens += tokens
        rate = self.tokens / max(now - self.t0, 1e-9)
        per_step = (now - self.t0) / max(step - self.start_step, 1)
        eta = per_step * (self.plan.total_steps - step)
        self.last = metrics = {
            "step": step,
            "total_steps": self.plan.total_steps,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": rate,
            "eta_s": eta,
        }
        if self.rank == 0:
            if (
                step % self.plan.logging_steps == 0
                or step == self.plan.total_steps
                or step == self.start_step + 1
            ):
                _say(
                    f"[expertserve] {self.plan.expert_name} step {step}/{self.plan.total_steps} loss {loss:.4f} "
                    f"lr {lr:.2e} tok/s {rate:.0f} eta {_duration(eta)}"
                )
            if self.file is not None:
                with self.file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
        return metrics

    def note_eval(self, step: int, eval_loss: float) -> None:
        """The validation loss at `step`, as its own line (the loss curve's second series); `eval_step`, not
        `step`, so readers of the step lines (the progress bar, resumption counts) see one line per step."""
        if self.rank == 0 and self.file is not None:
            with self.file.open("a") as f:
                f.write(json.dumps({"eval_step": step, "eval_loss": eval_loss}) + "\n")

    def finish(self) -> None:
        if self.rank == 0 and self.file is not None:
            with self.file.open("a") as f:
                f.write(json.dumps({"done": True}) + "\n")


def _say(line: str) -> None:
    """One progress line. Not print(): Ray Train patches print in workers to log each line twice."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
