"""What happens to each manifest field: `active` (a component applies it), `planned`, or `not applicable`.

This table is the answer to "manifests that lie": every field of the model has a rule here (a test walks the
model and fails on a field without one), and `expertserve validate` prints the rule's verdict for every field
an expert sets. A rule names the components that apply the field; the field is `active` once one of them
exists (`IMPLEMENTED`), `planned` before. Fields nothing will apply are `not applicable`, with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from expertserve.manifest.base import OpenMap
from expertserve.manifest.model import ExpertManifest

Status = Literal["active", "planned", "not applicable"]

# Components that exist in this build, and the ones still to come. Adding a component here turns every
# field it applies from `planned` into `active`.
IMPLEMENTED: frozenset[str] = frozenset(
    {"registry", "package", "validate", "train", "eval", "serve", "router"}
)
COMPONENTS: dict[str, str] = {
    "registry": "the expert registry",
    "package": "`.expert` packaging",
    "validate": "`expertserve validate`",
    "train": "`expertserve train`",
    "eval": "`expertserve eval`",
    "serve": "the server",
    "router": "the router",
}


@dataclass(frozen=True)
class RuntimeContext:
    """Where the expert would run; some verdicts depend on it (attention kernels, CUDA-only options)."""

    engine: str = "vllm"
    device: str = "cpu"

    @classmethod
    def detect(cls) -> RuntimeContext:
        """Detects a CUDA device without importing torch (validate must stay fast)."""
        forced = os.environ.get("EXPERTSERVE_DEVICE")
        if forced:
            return cls(device=forced)
        has_gpu = os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None
        return cls(device="cuda" if has_gpu else "cpu")


@dataclass(frozen=True)
class FieldStatus:
    """The verdict on one set field."""

    path: str
    value: Any
    status: Status
    detail: str


@dataclass(frozen=True)
class Uses:
    """The field is applied by these components."""

    components: tuple[str, ...]
    what: str


@dataclass(frozen=True)
class NotApplicable:
    """Nothing applies the field here, for this reason."""

    reason: str


Verdict = Uses | NotApplicable
Rule = Verdict | Callable[[Any, RuntimeContext], Verdict]

META = Uses(("registry", "package"), "metadata: listed by validate and the registry, kept in packages")
BASE_HASH = (
    "not checked per expert: the served base model is set by the server config and verified when "
    "prepared (`expertserve models prepare`)"
)


def _uses(*components: str) -> Callable[[str], Uses]:
    return lambda what: Uses(components, what)


TRAIN, SERVE, ROUTER = _uses("train"), _uses("serve"), _uses("router")
TRAIN_SERVE, SERVE_EVAL = _uses("train", "serve"), _uses("serve", "eval")
CUDA_ONLY = "needs an NVIDIA GPU"


def _cuda_only(what: str) -> Rule:
    def rule(value: Any, ctx: RuntimeContext) -> Verdict:
        if ctx.device != "cuda":
            return NotApplicable(f"{what} {CUDA_ONLY}; this device is {ctx.device}")
        return TRAIN(f"{what} on the GPU")

    return rule


def _empty_or(rule: Verdict) -> Rule:
    def check(value: Any, ctx: RuntimeContext) -> Verdict:
        if value in ("", 0, None, []):
            return NotApplicable("empty: nothing to check")
        return rule

    return check


def _adapter_type(value: str, ctx: RuntimeContext) -> Verdict:
    if value == "lora":
        return TRAIN_SERVE("PEFT LoRA in training; vLLM multi-LoRA in serving")
    if value in ("dora", "ia3"):
        return TRAIN(
            f"PEFT {value.upper()} in training; serving: not servable, vLLM serves LoRA adapters only"
        )
    return NotApplicable(f"{value!r} adapters are not supported: expertserve trains lora, dora and ia3")


def _scaling(value: str, ctx: RuntimeContext) -> Verdict:
    if value == "learned":
        return NotApplicable("PEFT has no learned adapter scaling; alpha / r is used")
    return TRAIN(f"{value} scaling (alpha / r; DoRA adds its magnitude vector)")


def _attention_kernel(value: str, ctx: RuntimeContext) -> Verdict:
    if ctx.device != "cuda":
        return NotApplicable(
            f"{value!r} cannot be chosen on {ctx.device}: vLLM's CPU backend has a single attention implementation"
        )
    return NotApplicable(
        f"vLLM picks its attention backend for the GPU itself (FLASH_ATTN where supported); one "
        f"engine serves every expert, so an expert's {value!r} preference is not applied"
    )


def _grammar_type(value: str, ctx: RuntimeContext) -> Verdict:
    if value == "json":
        return SERVE("without grammar_file/json_schema: any JSON object (structured outputs json_object)")
    if value == "gbnf":
        return SERVE("grammar_file is a GBNF grammar (xgrammar)")
    return Uses(
        ("validate",),
        f"label of grammar_file; expertserve has no built-in {value!r} grammar, "
        "so without grammar_file nothing is enforced",
    )


def _tool_choice(value: str, ctx: RuntimeContext) -> Verdict:
    if value == "auto":
        return NotApplicable(
            "'auto' lets the model decide whether to call, which needs a chat template with tools and a "
            "tool-call parser for its family; expertserve ships neither, so requests relying on it get a 400: "
            "use 'required' or a function name"
        )
    if value == "none":
        return SERVE("no call unless the request asks for one")
    what = "one of tools" if value == "required" else f"function {value!r}"
    return SERVE(f"chat requests without tool_choice call {what} (request > manifest)")


def _method(value: str, ctx: RuntimeContext) -> Verdict:
    if value == "sft":
        return TRAIN("supervised fine-tuning on chat examples (loss on the answer tokens)")
    return NotApplicable(f"only 'sft' is implemented; {value!r} training is not")


def _optim(value: str, ctx: RuntimeContext) -> Verdict:
    if value == "adamw_bnb_8bit":
        return NotApplicable(f"bitsandbytes 8-bit optimizers {CUDA_ONLY}; AdamW (torch) is used instead")
    if value == "adamw_torch_fused" and ctx.device != "cuda":
        return NotApplicable(f"the fused AdamW {CUDA_ONLY}; plain AdamW is used on {ctx.device}")
    return TRAIN(f"optimizer {value}")


def _dataset_format(value: str, ctx: RuntimeContext) -> Verdict:
    if value == "jsonl":
        return TRAIN("JSONL chat examples")
    return NotApplicable(f"train reads JSONL chat files; {value!r} is not read")


def _method_flag(what: str, on: Verdict) -> Rule:
    return lambda value, ctx: on if value else Uses(("validate",), f"{what} off")


RULES: dict[str, Rule] = {
    "name": Uses(("registry", "package"), "identity: registry key, package file name, served model name"),
    "version": Uses(("registry", "package"), "registry keeps versions side by side; package file name"),
    "schema_version": Uses(("validate",), "selects the 1.0 (base_model) or 2.0 (base_models) rules"),
    "description": META,
    "author": META,
    "homepage": META,
    "repository.type": META,
    "repository.url": META,
    "license": META,
    "tags": META,
    "limitations": META,
    "capabilities": ROUTER("capability tags (after the ':') are matched as keywords against the request"),
    # Base models and adapters
    "base_model.name": Uses(("registry",), "the expert is offered only on a server running this base model"),
    "base_models[].name": Uses(
        ("registry",), "the expert is offered only on a server running this base model"
    ),
    "base_model.sha256": _empty_or(NotApplicable(BASE_HASH)),
    "base_models[].sha256": _empty_or(NotApplicable(BASE_HASH)),
    "base_model.quantization": NotApplicable(
        "one engine serves every expert: the base model's precision is a "
        "server setting that an expert cannot change"
    ),
    "base_models[].quantization": NotApplicable(
        "one engine serves every expert: the base model's precision is "
        "a server setting that an expert cannot change"
    ),
    "base_model.rope_scaling": NotApplicable(
        "RoPE scaling comes from the base model's config.json; an adapter cannot change it"
    ),
    "base_models[].rope_scaling": NotApplicable(
        "RoPE scaling comes from the base model's config.json; an adapter cannot change it"
    ),
    "base_models[].prompt_template": NotApplicable(
        "training and serving both format prompts with the base "
        "model's own chat template, so they always match"
    ),
    "adapters[].type": _adapter_type,
    "adapters[].target_modules": TRAIN("PEFT target_modules; the server reads them from adapter_config.json"),
    "adapters[].feedforward_modules": TRAIN("PEFT IA3 feedforward_modules"),
    "adapters[].r": TRAIN_SERVE("adapter rank; the server sizes max_lora_rank from the largest"),
    "adapters[].alpha": TRAIN("adapter alpha (scale alpha / r)"),
    "adapters[].scaling": _scaling,
    "adapters[].dropout": TRAIN("adapter dropout while training"),
    "adapters[].use_dora": TRAIN("PEFT use_dora"),
    "adapters[].checkpoint_step": META,
    "adapters[].size_bytes": _empty_or(Uses(("validate",), "validate --strict checks the weights' size")),
    "adapters[].sha256": _empty_or(Uses(("validate",), "validate --strict checks the weights' SHA-256")),
    "adapters[].path": Uses(
        ("registry", "package"), "where the adapter's files are; packaged with the expert"
    ),
    # Soft prompts
    "soft_prompts[].name": Uses(("registry",), "identifies the soft prompt"),
    "soft_prompts[].path": Uses(
        ("registry", "package"), "weights file; packaged; validate --strict checks it"
    ),
    "soft_prompts[].tokens": Uses(
        ("validate", "train", "serve"),
        "virtual tokens; validate --strict checks the tensor is [tokens, hidden]",
    ),
    "soft_prompts[].init_method": TRAIN("initialisation of the trainable embeddings"),
    "soft_prompts[].init_text": TRAIN("text embedded to initialise the soft prompt"),
    "soft_prompts[].purpose": META,
    # Routing
    "routing.keywords": ROUTER("keyword matching, whole words and phrases"),
    "routing.exclude_keywords": ROUTER("rules the expert out when present"),
    "routing.router_hint": NotApplicable(
        "the router scores keywords, examples and capabilities; it does not "
        "evaluate the reference router's hint expressions"
    ),
    "routing.priority": ROUTER("a small bonus that breaks ties between experts"),
    "routing.patterns": ROUTER("regular expressions; each match counts as a keyword hit"),
    "routing.examples": ROUTER(
        "example prompts for semantic matching (with the description and sampled training prompts)"
    ),
    # Constraints, performance, runtime
    "constraints.max_chain": NotApplicable("one expert answers a request; experts are not chained"),
    "constraints.load_order": NotApplicable(
        "adapters load on an expert's first request on each replica (Serve "
        "multiplexing); there is no preload order"
    ),
    "constraints.incompatible_with": NotApplicable("one expert answers a request; experts are not composed"),
    "constraints.requires": NotApplicable("one expert answers a request; experts are not composed"),
    "perf.latency_ms_overhead": NotApplicable("measured by `expertserve bench`, not taken from the manifest"),
    "perf.vram_mb_overhead": NotApplicable(
        "the engine sizes adapter memory from max_loras and max_lora_rank"
    ),
    "perf.supported_batch_sizes": NotApplicable("vLLM batches continuously; there are no fixed batch sizes"),
    "runtime.candle_compatible": NotApplicable("expertserve runs on vLLM, not on the Candle runtime"),
    "runtime.requires_kv_cache_persistence": SERVE(
        "turns on prefix caching; an expert's requests go to replicas "
        "that already hold it (Serve multiplexing), so its conversations "
        "find their cached prefixes"
    ),
    "runtime.attention_kernel": _attention_kernel,
    "runtime.min_replicas": SERVE(
        "kept loaded on this many engine replicas (at most the running count), checked after every reload and "
        "every 30 s; the server config's replicas.expert_min_replicas overrides it"
    ),
    # Training data
    "training.dataset.path": TRAIN("training split (JSONL chat examples)"),
    "training.dataset.validation_path": TRAIN("validation split: eval loss on its first 64 examples"),
    "training.dataset.test_path": Uses(("eval",), "held-out test split scored by `expertserve eval`"),
    "training.dataset.type": lambda v, ctx: (
        TRAIN("one dataset")
        if v == "single"
        else NotApplicable("multi-task datasets are not read; train uses path / validation_path / test_path")
    ),
    "training.dataset.format": _dataset_format,
    "training.dataset.streaming": NotApplicable("datasets are read whole; streaming is not implemented"),
    "training.dataset.source": META,
    "training.dataset.sources": META,
    "training.dataset.field_mapping": NotApplicable(
        "datasets are chat JSONL ({'messages': [...]}); fields are not remapped"
    ),
    "training.dataset.tasks": NotApplicable("multi-task datasets are not read"),
    "training.dataset.validation.validate_json": NotApplicable("dataset checks run in the generator scripts"),
    "training.dataset.validation.validate_schema": NotApplicable(
        "dataset checks run in the generator scripts"
    ),
    "training.dataset.validation.deduplicate": NotApplicable("dataset checks run in the generator scripts"),
    "training.dataset.validation.min_length": NotApplicable("dataset checks run in the generator scripts"),
    "training.dataset.validation.max_length": NotApplicable("dataset checks run in the generator scripts"),
    "training.dataset.augmentation.schema_injection_prob": NotApplicable(
        "data augmentation is not implemented"
    ),
    "training.dataset.augmentation.table_aliases": NotApplicable("data augmentation is not implemented"),
    "training.dataset.augmentation.comment_stripping": NotApplicable("data augmentation is not implemented"),
    "training.dataset.augmentation.case_normalization": NotApplicable("data augmentation is not implemented"),
    "training.dataset.preprocessing": META,
    "training.dataset.format_distribution": META,
    "training.dataset.task_distribution": META,
    "training.dataset.splits": META,
    # Training hyper-parameters
    "training.config.method": _method,
    "training.config.adapter_type": _adapter_type,
    "training.config.use_unsloth": NotApplicable("Unsloth is a CUDA-only library outside Ray Train + PEFT"),
    "training.config.rank": TRAIN("adapter rank"),
    "training.config.alpha": TRAIN("adapter alpha"),
    "training.config.target_modules": TRAIN("PEFT target_modules"),
    "training.config.feedforward_modules": TRAIN("PEFT IA3 feedforward_modules"),
    "training.config.epochs": TRAIN("passes over the training split"),
    "training.config.num_epochs": TRAIN("alias of epochs"),
    "training.config.learning_rate": TRAIN("peak learning rate"),
    "training.config.batch_size": TRAIN("examples per worker and step"),
    "training.config.gradient_accumulation_steps": TRAIN("micro-batches per optimizer step"),
    "training.config.warmup_steps": TRAIN("linear warm-up steps"),
    "training.config.warmup_ratio": TRAIN("warm-up share of all steps (wins over warmup_steps)"),
    "training.config.lr_scheduler": TRAIN("learning-rate schedule"),
    "training.config.dropout": TRAIN("adapter dropout"),
    "training.config.max_seq_length": TRAIN("examples are cut to this many tokens"),
    "training.config.dataloader_num_workers": NotApplicable(
        "examples are tokenised in memory; no loader workers"
    ),
    "training.config.dataloader_pin_memory": NotApplicable(
        "examples are tokenised in memory; no loader workers"
    ),
    "training.config.dataloader_prefetch_factor": NotApplicable(
        "examples are tokenised in memory; no loader"
    ),
    "training.config.dataloader_persistent_workers": NotApplicable(
        "examples are tokenised in memory; no loader"
    ),
    "training.config.fp16": _cuda_only("float16 training"),
    "training.config.bf16": _method_flag("bf16", TRAIN("bfloat16 autocast")),
    "training.config.use_tf32": _cuda_only("TF32 matmuls"),
    "training.config.use_sdpa": _method_flag("sdpa", TRAIN("attn_implementation='sdpa'")),
    "training.config.flash_attention_2": NotApplicable(
        "flash-attn is not a dependency; sdpa is used, which picks "
        "flash kernels itself where the GPU has them"
    ),
    "training.config.memory_efficient_attention": NotApplicable("sdpa picks memory-efficient kernels itself"),
    "training.config.memory_clear_every": NotApplicable("no manual cache clearing; the runs are short"),
    "training.config.packing": NotApplicable("each example is its own sequence; packing is not implemented"),
    "training.config.optim": _optim,
    "training.config.group_by_length": NotApplicable(
        "batches are shuffled; length grouping is not implemented"
    ),
    "training.config.logging_steps": TRAIN("steps between progress lines"),
    "training.config.max_steps": TRAIN("stops after this many optimizer steps"),
    "training.config.save_strategy": TRAIN("when checkpoints are reported to Ray Train"),
    "training.config.save_steps": TRAIN("steps between checkpoints"),
    "training.config.save_total_limit": TRAIN("checkpoints kept by Ray Train"),
    "training.config.evaluation_strategy": TRAIN("when validation loss is computed"),
    "training.config.eval_steps": TRAIN("steps between validation losses"),
    "training.config.load_best_model_at_end": TRAIN("keeps the checkpoint with the best metric"),
    "training.config.metric_for_best_model": lambda v, ctx: (
        TRAIN("metric that picks the best checkpoint")
        if v in ("eval_loss", "loss")
        else NotApplicable(f"training reports eval_loss and loss, not {v!r}; the last checkpoint is kept")
    ),
    "training.config.greater_is_better": TRAIN("direction of that metric"),
    "training.config.gradient_checkpointing": TRAIN("recompute activations to save memory"),
    "training.config.activation_checkpointing": NotApplicable(
        "only whole-model gradient_checkpointing is offered"
    ),
    "training.config.torch_compile": NotApplicable("torch.compile is not used in training"),
    "training.config.torch_compile_backend": NotApplicable("torch.compile is not used in training"),
    "training.config.torch_compile_mode": NotApplicable("torch.compile is not used in training"),
    "training.config.use_cuda_graphs": NotApplicable("CUDA graphs are not used in training"),
    "training.config.cuda_graph_warmup_steps": NotApplicable("CUDA graphs are not used in training"),
    "training.config.pretokenized_cache": NotApplicable("datasets are tokenised in memory at start"),
    "training.config.seed": TRAIN("seed of initialisation and shuffling"),
    # Decoding
    "training.decoding.use_grammar": SERVE_EVAL("switches the output constraint on or off"),
    "training.decoding.grammar_type": _grammar_type,
    "training.decoding.grammar_file": SERVE_EVAL("GBNF grammar enforced with xgrammar structured outputs"),
    "training.decoding.json_schema": SERVE_EVAL("JSON schema enforced with structured outputs"),
    "training.decoding.json_schema_file": SERVE_EVAL("JSON schema enforced with structured outputs"),
    "training.decoding.validation": NotApplicable(
        "the server does not re-run outputs through a validator; "
        "`expertserve eval` scores outputs with its own checker"
    ),
    "training.decoding.validation_cmd": NotApplicable("the server does not run commands on outputs"),
    "training.decoding.stop_sequences": SERVE_EVAL("default stop strings (request > manifest > server)"),
    "training.decoding.temperature": SERVE_EVAL("default temperature (request > manifest > server)"),
    "training.decoding.top_p": SERVE_EVAL("default top_p (request > manifest > server)"),
    "training.decoding.top_k": SERVE_EVAL("default top_k (request > manifest > server)"),
    "training.decoding.min_p": SERVE_EVAL("default min_p (request > manifest > server)"),
    "training.decoding.repetition_penalty": SERVE_EVAL(
        "default repetition_penalty (request > manifest > server)"
    ),
    "training.decoding.presence_penalty": SERVE_EVAL(
        "default presence_penalty (request > manifest > server)"
    ),
    "training.decoding.frequency_penalty": SERVE_EVAL(
        "default frequency_penalty (request > manifest > server)"
    ),
    "training.decoding.max_tokens": SERVE_EVAL("default max_tokens (request > manifest > server)"),
    "training.decoding.tools[].name": SERVE(
        "a default tool of chat requests (request > manifest): the function's name in tool_calls"
    ),
    "training.decoding.tools[].description": SERVE("shown to the model in the tool-call instruction"),
    "training.decoding.tools[].parameters": SERVE("arguments schema enforced with structured outputs"),
    "training.decoding.tool_choice": _tool_choice,
    # Training record
    "training.trained_on": META,
    "training.base_model_version": META,
    "training.packaging_checkpoint": NotApplicable(
        "packages hold the adapter at adapters[].path; pick the "
        "checkpoint when training (`--resume` / checkpoints)"
    ),
    "training.checkpoint": META,
    "training.quality_score": META,
    "training.test_scenarios": META,
    "training.alternative_checkpoints": META,
    "evaluation.test_cases": NotApplicable("`expertserve eval` scores training.dataset.test_path"),
    "evaluation.suite": NotApplicable("`expertserve eval` scores training.dataset.test_path"),
    "evaluation.metrics": META,
    "evaluation.scorer": Uses(("eval",), "objective scorer of the held-out test split"),
    "integrity.timestamp": NotApplicable(
        "packages are signed in signature.json over every file's SHA-256; a "
        "manifest cannot carry a signature over itself"
    ),
    "integrity.public_key": NotApplicable(
        "packages are signed in signature.json; pin a signer with `expertserve verify --public-key`"
    ),
    "integrity.signature": NotApplicable("packages are signed in signature.json over every file's SHA-256"),
    "quality_metrics": Uses(("registry", "eval"), "evaluation summary; `expertserve eval` writes it"),
}


def generic_path(path: str) -> str:
    """`base_models[0].adapters[0].r` -> `adapters[].r` for adapter fields, `x[3].y` -> `x[].y` otherwise."""
    path = re.sub(r"\[\d+\]", "[]", path)
    for prefix in ("base_models[].adapters[].", "adapters[]."):
        if path.startswith(prefix):
            return "adapters[]." + path[len(prefix) :]
    return path


def judge(path: str, value: Any, ctx: RuntimeContext) -> FieldStatus:
    """The verdict on one set field (path as printed, e.g. `base_models[0].adapters[0].r`)."""
    key = generic_path(path)
    rule = RULES[key]  # a field without a rule fails tests/unit/test_field_status.py
    verdict = rule(value, ctx) if callable(rule) else rule
    if isinstance(verdict, NotApplicable):
        return FieldStatus(path, value, "not applicable", verdict.reason)
    active = [c for c in verdict.components if c in IMPLEMENTED]
    status: Status = "active" if active else "planned"
    who = ", ".join(COMPONENTS[c] for c in verdict.components)
    return FieldStatus(path, value, status, f"{verdict.what} ({who})")


def field_statuses(manifest: ExpertManifest, ctx: RuntimeContext | None = None) -> list[FieldStatus]:
    """The verdict on every field the manifest sets, in manifest order."""
    ctx = ctx or RuntimeContext.detect()
    return [judge(path, value, ctx) for path, value in set_fields(manifest)]


def set_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, JSON value) of every leaf field the model sets, descending where `all_rule_paths` does."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if name not in model.model_fields_set or value is None:
            continue
        path = f"{prefix}{name}"
        if _sub_model(info.annotation) is None:
            yield path, _json(value)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from set_fields(item, f"{path}[{i}].")
        else:
            yield from set_fields(value, path + ".")


def _json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def all_rule_paths(model: type[BaseModel] = ExpertManifest, prefix: str = "") -> Iterator[str]:
    """Every generic field path the model can hold, as `generic_path` writes it (for the completeness test)."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _sub_model(info.annotation)
        if sub is not None:
            yield from all_rule_paths(sub, path + ("[]." if _is_list(info.annotation) else "."))
        else:
            yield generic_path(path)


def _is_list(annotation: Any) -> bool:
    args = [a for a in get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    return len(args) == 1 and get_origin(args[0]) is list


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, UnionType)


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds directly or as a list of, when it is the field's only non-None type."""
    args = [a for a in get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    if len(args) != 1:
        return None
    inner = args[0]
    if get_origin(inner) is list:
        (inner,) = get_args(inner)
    # Open maps (metrics, statistics) have free-form keys: they are shown as one entry.
    is_model = isinstance(inner, type) and issubclass(inner, BaseModel) and not issubclass(inner, OpenMap)
    return inner if is_model else None
