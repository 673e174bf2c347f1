"""The expert manifest: every field of the reference (HiveLLM) schema, v1.0 and v2.0, validated strictly.

Differences from the reference schema are deliberate and listed in `docs/manifest.md`: fields we add
(marked "expertserve extension" in their description), rules we tighten so a manifest cannot fail later at
serving time, and the few top-level sections we make optional for experts that are not trained yet.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from expertserve.manifest.base import Bool, Int, Num, OpenMap, Str, StrictModel

NAME_PATTERN = r"^expert-[a-z0-9-]+$"
VERSION_PATTERN = r"^\d+\.\d+\.\d+$"
SHA256_PATTERN = r"^(?:[a-f0-9]{64})?$"
HEX_PATTERN = r"^[0-9a-fA-F]+$"

AdapterType = Literal["lora", "dora", "ia3", "lokr", "adalora"]
ModuleName = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Quantization = Literal["int4", "int8", "fp16", "bf16", "none"]
PromptTemplate = Literal["chatml", "llama2", "alpaca", "vicuna", "custom"]
RANKED_ADAPTERS = ("lora", "dora", "lokr", "adalora")


def _non_empty(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


def _relative_path(value: str) -> str:
    """Paths inside an expert are relative and stay inside it (they are packaged and installed)."""
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"expected a path relative to the expert directory, got absolute path {value!r}")
    if ".." in re.split(r"[/\\]", value):
        raise ValueError(f"expected a path inside the expert directory, got {value!r} (contains '..')")
    return value


RelPath = Annotated[Str, Field(min_length=1)]


class Repository(StrictModel):
    """Source repository of the expert."""

    type: Literal["git"] = Field(description="Repository kind; only 'git'.")
    url: Str = Field(description="Repository URL.")


class RopeScalingConfig(StrictModel):
    """Detailed RoPE scaling (reference: NTK-by-parts for Qwen3)."""

    type: Literal["ntk-by-parts", "yarn", "dynamic", "linear"] = Field(description="Scaling algorithm.")
    factor: Num = Field(ge=1.0, description="Scaling factor (typically 2, 4 or 8).")
    max_position_embeddings: Int = Field(ge=1, description="Maximum sequence length after scaling.")
    original_max_position_embeddings: Int = Field(ge=1, description="Sequence length before scaling.")
    fine_grained: Bool = Field(description="Fine-grained scaling (Qwen3-specific).")


RopeScaling = Str | RopeScalingConfig


class Adapter(StrictModel):
    """One adapter of an expert for one base model."""

    type: AdapterType = Field(description="Adapter kind. vLLM serves 'lora' only; all kinds train with PEFT.")
    target_modules: list[ModuleName] = Field(min_length=1, description="Model layers the adapter modifies.")
    feedforward_modules: list[Str] | None = Field(
        default=None, description="IA3 only: the subset of target_modules that are feed-forward layers."
    )
    r: Int | None = Field(default=None, ge=1, le=256, description="Rank (LoRA/DoRA/LoKr/AdaLoRA; not IA3).")
    alpha: Int | None = Field(
        default=None, ge=1, description="Alpha scaling (LoRA/DoRA/LoKr/AdaLoRA; not IA3)."
    )
    scaling: Literal["default", "standard", "dora", "learned"] | None = Field(
        default=None, description="Scaling method."
    )
    dropout: Num | None = Field(default=None, ge=0.0, le=1.0, description="Dropout of adapter layers.")
    use_dora: Bool | None = Field(default=None, description="Weight-decomposed LoRA (DoRA).")
    checkpoint_step: Int | None = Field(default=None, ge=0, description="Training step of these weights.")
    size_bytes: Int | None = Field(default=None, ge=0, description="Size of the adapter weights in bytes.")
    sha256: Str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="SHA-256 of the weights file."
    )
    path: RelPath = Field(
        default=".",
        description="expertserve extension: directory of the PEFT adapter (adapter_config.json and "
        "adapter_model.safetensors), relative to the expert directory. Default: the expert root, as in the "
        "reference runtime.",
    )

    _check_path = field_validator("path")(classmethod(lambda cls, v: _relative_path(v)))

    @property
    def effective_type(self) -> str:
        """`lora` with `use_dora: true` is DoRA."""
        return "dora" if self.type == "lora" and self.use_dora else self.type

    @model_validator(mode="after")
    def _rules(self) -> Adapter:
        if self.type in RANKED_ADAPTERS and (self.r is None or self.alpha is None):
            missing = " and ".join(n for n in ("r", "alpha") if getattr(self, n) is None)
            raise ValueError(f"{missing.split()[0]}: required for type {self.type!r} (set both r and alpha)")
        if self.type == "ia3":
            given = [n for n in ("r", "alpha") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{given[0]}: type 'ia3' has no rank or alpha; remove it")
        elif self.feedforward_modules is not None:
            raise ValueError(f"feedforward_modules: applies to type 'ia3' only, not {self.type!r}")
        if self.feedforward_modules:
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                raise ValueError(f"feedforward_modules: {outside} must also be in target_modules")
        if self.use_dora is not None and self.type not in ("lora", "dora"):
            raise ValueError(f"use_dora: applies to type 'lora' or 'dora' only, not {self.type!r}")
        if self.type == "dora" and self.use_dora is False:
            raise ValueError("use_dora: false contradicts type 'dora'")
        return self


class BaseModelV1(StrictModel):
    """The single base model of a schema 1.0 manifest."""

    name: Str = Field(min_length=1, description="Base model id or path.")
    sha256: Str | None = Field(default=None, description="SHA-256 of the base model weights.")
    quantization: Quantization | None = Field(default=None, description="Quantization of the base model.")
    rope_scaling: RopeScaling | None = Field(default=None, description="RoPE scaling of the base model.")


class BaseModelV2(BaseModelV1):
    """One base model of a schema 2.0 manifest, with the expert's adapter for it."""

    prompt_template: PromptTemplate | None = Field(
        default=None,
        description="Prompt format the expert was trained with. 'qwen3' is not accepted (the reference "
        "schema rejects it too): Qwen3 uses ChatML, write 'chatml'.",
    )
    adapters: list[Adapter] = Field(
        min_length=1,
        max_length=1,
        description="The expert's adapter for this base model (exactly one: a request runs one adapter).",
    )


class SoftPrompt(StrictModel):
    """A trained soft prompt: `tokens` embedding rows prepended to the input."""

    name: Str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Identifier, unique within the expert.")
    path: RelPath = Field(
        description="Weights file relative to the expert directory (safetensors, tensor [tokens, hidden])."
    )
    tokens: Int = Field(ge=1, le=512, description="Number of virtual tokens.")
    init_method: Literal["random", "text", "vocab_sample"] | None = Field(
        default=None, description="How training initialises the embeddings."
    )
    init_text: Str | None = Field(default=None, description="Initial text when init_method is 'text'.")
    purpose: Str | None = Field(default=None, description="What the soft prompt is for.")

    _check_path = field_validator("path")(classmethod(lambda cls, v: _relative_path(v)))

    @model_validator(mode="after")
    def _rules(self) -> SoftPrompt:
        if self.init_method == "text" and not (self.init_text or "").strip():
            raise ValueError("init_text: required (non-empty) when init_method is 'text'")
        if self.init_text is not None and self.init_method != "text":
            raise ValueError(f"init_text: applies to init_method 'text' only, not {self.init_method!r}")
        return self


class Routing(StrictModel):
    """What the router matches requests against."""

    keywords: list[Str] = Field(min_length=1, description="Words or phrases that point to this expert.")
    exclude_keywords: list[Str] = Field(
        default_factory=list, description="Phrases that rule this expert out."
    )
    router_hint: Str | None = Field(
        default=None, description="Boolean expression hint of the reference router, e.g. 'task=text2sql'."
    )
    priority: Num | None = Field(default=None, ge=0.0, le=1.0, description="Tie-breaker, higher preferred.")
    examples: list[Str] = Field(
        default_factory=list,
        description="expertserve extension: example prompts this expert should answer (semantic routing).",
    )

    patterns: list[Str] = Field(
        default_factory=list,
        description="expertserve extension: regular expressions (Python syntax, matched case-insensitively on the "
        "normalised prompt); each match counts as a keyword hit, for evidence words cannot express (a pasted "
        "table signature `name(col, col)`).",
    )

    @field_validator("keywords", "exclude_keywords", "examples")
    @classmethod
    def _no_blank(cls, values: list[str]) -> list[str]:
        for i, v in enumerate(values):
            if not v.strip():
                raise ValueError(f"item {i} is empty")
        return values

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, values: list[str]) -> list[str]:
        for i, v in enumerate(values):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"item {i}: not a regular expression ({e}): {v!r}") from None
        return values


class Constraints(StrictModel):
    """Loading and composition constraints."""

    max_chain: Int | None = Field(default=None, ge=1, description="Maximum chain depth of composed experts.")
    load_order: Int = Field(default=0, ge=0, description="Loading priority (lower loads first).")
    incompatible_with: list[Str] = Field(
        default_factory=list, description="Experts that cannot load with it."
    )
    requires: list[Str] = Field(default_factory=list, description="Experts it depends on.")


class Performance(StrictModel):
    """Resource figures for planning."""

    latency_ms_overhead: Num = Field(ge=0, description="Added latency with the expert (ms).")
    vram_mb_overhead: Int = Field(ge=0, description="Added accelerator memory (MB).")
    supported_batch_sizes: list[Annotated[Int, Field(ge=1)]] = Field(
        min_length=1, description="Batch sizes that work without running out of memory."
    )


class Runtime(StrictModel):
    """Runtime hints."""

    candle_compatible: Bool | None = Field(default=None, description="Works with the Candle (Rust) runtime.")
    requires_kv_cache_persistence: Bool | None = Field(
        default=None, description="Conversations should reuse their KV cache across turns."
    )
    attention_kernel: Literal["sdpa", "flash-v1", "flash-v2", "xformers", "vanilla"] | None = Field(
        default=None, description="Preferred attention kernel."
    )
    min_replicas: Int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Engine replicas that keep this expert loaded (warm), so its traffic is never pinned to one "
        "replica (expertserve extension; the server config's replicas.expert_min_replicas overrides it). At most "
        "64: every replica it asks for is a load the warmer keeps asking the engines for.",
    )


class DatasetSource(OpenMap):
    """One source of a dataset, with counts (extra keys: numbers or strings)."""

    name: Str | None = Field(default=None, description="Source name.")
    original_examples: Int | None = Field(default=None, ge=0, description="Examples before processing.")
    processed_examples: Int | None = Field(default=None, ge=0, description="Examples after processing.")
    duplicates_removed: Int | None = Field(default=None, ge=0, description="Duplicates removed.")
    invalid_removed: Int | None = Field(default=None, ge=0, description="Invalid examples removed.")


class DatasetPreprocessing(OpenMap):
    """Preprocessing statistics (extra keys: numbers, strings, booleans or objects)."""

    extra_types: ClassVar[tuple[type, ...]] = (int, float, str, bool, dict)

    total_examples: Int | None = Field(default=None, ge=0, description="Total examples.")
    total_raw_examples: Int | None = Field(default=None, ge=0, description="Raw examples.")
    processed_examples: Int | None = Field(default=None, ge=0, description="Processed examples.")
    duplicates_removed: Int | None = Field(default=None, ge=0, description="Duplicates removed.")
    invalid_cypher_removed: Int | None = Field(default=None, ge=0, description="Invalid Cypher removed.")
    validation: Str | None = Field(default=None, description="Validation applied.")
    format: Str | None = Field(default=None, description="Text format.")
    deduplication: Str | None = Field(default=None, description="Deduplication method.")
    schema_extraction: Str | None = Field(default=None, description="Schema extraction method.")
    generic_ratio: Num | None = Field(default=None, description="Share of generic examples.")
    rebalanced: Bool | Str | None = Field(default=None, description="Whether the data was rebalanced.")
    target_total: Int | None = Field(default=None, ge=0, description="Target number of examples.")
    size_filter: Str | Num | None = Field(default=None, description="Size filter applied.")
    portuguese_filtered: Int | None = Field(default=None, ge=0, description="Portuguese examples removed.")
    corrections_balanced: Bool | Str | Num | None = Field(default=None, description="Correction balancing.")
    splits: dict[str, Annotated[Int, Field(ge=0)]] | None = Field(default=None, description="Split sizes.")
    task_distribution: dict[str, Num | Str] | None = Field(default=None, description="Examples per task.")
    by_source: dict[str, Num | Str] | None = Field(default=None, description="Examples per source.")


class DatasetTask(StrictModel):
    """One task of a multi-task dataset."""

    train: Str = Field(description="Training file.")
    valid: Str | None = Field(default=None, description="Validation file.")
    test: Str | None = Field(default=None, description="Test file.")
    weight: Num = Field(ge=0.0, le=1.0, description="Sampling weight.")
    format: Str = Field(description="Format of the task's files.")


class DatasetValidation(StrictModel):
    """Checks applied to dataset examples."""

    validate_json: Bool | None = Field(default=None, description="Parse JSON outputs.")
    validate_schema: Bool | None = Field(default=None, description="Check outputs against their schema.")
    deduplicate: Bool | None = Field(default=None, description="Drop duplicate examples.")
    min_length: Int | None = Field(default=None, ge=0, description="Minimum example length (chars).")
    max_length: Int | None = Field(default=None, ge=1, description="Maximum example length (chars).")


class DatasetAugmentation(StrictModel):
    """Data augmentation settings."""

    schema_injection_prob: Num | None = Field(default=None, ge=0, le=1, description="Schema injection rate.")
    table_aliases: Bool | None = Field(default=None, description="Generate table aliases.")
    comment_stripping: Bool | None = Field(default=None, description="Strip SQL comments.")
    case_normalization: Literal["preserve", "upper", "lower"] | None = Field(
        default=None, description="SQL case normalisation."
    )


class Dataset(StrictModel):
    """Where the training data is and what it holds."""

    path: Str | None = Field(default=None, description="Training file, relative to the expert directory.")
    type: Literal["single", "multi_task"] | None = Field(default=None, description="Single or multi-task.")
    format: Literal["jsonl", "huggingface", "csv", "parquet"] | None = Field(
        default=None, description="Format."
    )
    streaming: Bool | None = Field(default=None, description="Stream the data during training.")
    source: Str | None = Field(default=None, description="Provenance, free text.")
    sources: list[DatasetSource] | None = Field(default=None, description="Breakdown by source.")
    field_mapping: dict[str, Str] | None = Field(default=None, description="Dataset field -> expected field.")
    tasks: dict[str, DatasetTask] | None = Field(default=None, description="Multi-task configuration.")
    validation: DatasetValidation | None = Field(default=None, description="Validation rules.")
    augmentation: DatasetAugmentation | None = Field(default=None, description="Augmentation settings.")
    preprocessing: DatasetPreprocessing | None = Field(default=None, description="Preprocessing statistics.")
    format_distribution: dict[str, Num | Str] | None = Field(default=None, description="Examples per format.")
    task_distribution: dict[str, Num | Str] | None = Field(default=None, description="Examples per task.")
    splits: dict[str, Annotated[Int, Field(ge=0)]] | None = Field(default=None, description="Split sizes.")
    test_path: Str | None = Field(default=None, description="Held-out test file.")
    validation_path: Str | None = Field(default=None, description="Validation file.")


class TrainingConfig(StrictModel):
    """Training hyper-parameters."""

    method: Literal["sft", "rlhf", "dpo"] = Field(description="Training method.")
    adapter_type: AdapterType = Field(description="PEFT adapter kind.")
    use_unsloth: Bool | None = Field(default=None, description="Use Unsloth (CUDA-only library).")
    rank: Int | None = Field(default=None, ge=1, le=256, description="Adapter rank (not IA3).")
    alpha: Int | None = Field(default=None, ge=1, description="Adapter alpha (not IA3).")
    target_modules: list[Str] | None = Field(default=None, min_length=1, description="Modules to adapt.")
    feedforward_modules: list[Str] | None = Field(default=None, description="IA3 feed-forward modules.")
    epochs: Num | None = Field(default=None, ge=0.0, description="Epochs (fractions allowed).")
    num_epochs: Num | None = Field(default=None, ge=0.0, description="Alias of epochs.")
    learning_rate: Num = Field(ge=0.0, le=1.0, description="Peak learning rate.")
    batch_size: Int = Field(ge=1, description="Examples per device and step.")
    gradient_accumulation_steps: Int | None = Field(default=None, ge=1, description="Steps per update.")
    warmup_steps: Int | None = Field(default=None, ge=0, description="Warm-up steps.")
    warmup_ratio: Num | None = Field(default=None, ge=0, le=1, description="Warm-up share (wins over steps).")
    lr_scheduler: Literal["linear", "cosine", "constant", "polynomial", "cosine_with_restarts"] | None = (
        Field(default=None, description="Learning-rate schedule.")
    )
    dropout: Num | None = Field(default=None, ge=0.0, le=1.0, description="Adapter dropout in training.")
    max_seq_length: Int | None = Field(default=None, ge=1, description="Longest tokenised example.")
    dataloader_num_workers: Int | None = Field(default=None, ge=0, description="Data loader processes.")
    dataloader_pin_memory: Bool | None = Field(default=None, description="Pin host memory.")
    dataloader_prefetch_factor: Int | None = Field(default=None, ge=1, description="Batches prefetched.")
    dataloader_persistent_workers: Bool | None = Field(default=None, description="Keep loader workers.")
    fp16: Bool | None = Field(default=None, description="Train in float16.")
    bf16: Bool | None = Field(default=None, description="Train in bfloat16.")
    use_tf32: Bool | None = Field(default=None, description="TF32 matmuls (NVIDIA Ampere+).")
    use_sdpa: Bool | None = Field(default=None, description="Scaled dot-product attention.")
    flash_attention_2: Bool | None = Field(default=None, description="Flash Attention 2.")
    memory_efficient_attention: Bool | None = Field(default=None, description="Memory-efficient attention.")
    memory_clear_every: Int | None = Field(default=None, ge=0, description="Steps between cache clearing.")
    packing: Bool | None = Field(default=None, description="Pack several examples per sequence.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "sgd"] | None = Field(
        default=None, description="Optimizer."
    )
    group_by_length: Bool | None = Field(default=None, description="Batch examples of similar length.")
    logging_steps: Int | None = Field(default=None, ge=1, description="Steps between progress lines.")
    max_steps: Int | None = Field(default=None, ge=0, description="Maximum optimizer steps.")
    save_strategy: Literal["no", "steps", "epoch"] | None = Field(default=None, description="When to save.")
    save_steps: Int | None = Field(default=None, ge=1, description="Steps between checkpoints.")
    save_total_limit: Int | None = Field(default=None, ge=1, description="Checkpoints kept (null: all).")
    evaluation_strategy: Literal["no", "steps", "epoch"] | None = Field(
        default=None, description="When to eval."
    )
    eval_steps: Int | None = Field(default=None, ge=1, description="Steps between evaluations.")
    load_best_model_at_end: Bool | None = Field(default=None, description="Keep the best checkpoint.")
    metric_for_best_model: Str | None = Field(default=None, description="Metric that picks the best.")
    greater_is_better: Bool | None = Field(default=None, description="Whether higher metric is better.")
    gradient_checkpointing: Bool | None = Field(default=None, description="Recompute activations.")
    activation_checkpointing: Str | None = Field(default=None, description="Activation checkpointing policy.")
    torch_compile: Bool | None = Field(default=None, description="Use torch.compile.")
    torch_compile_backend: Str | None = Field(default=None, description="torch.compile backend.")
    torch_compile_mode: Str | None = Field(default=None, description="torch.compile mode.")
    use_cuda_graphs: Bool | None = Field(default=None, description="CUDA graphs.")
    cuda_graph_warmup_steps: Int | None = Field(default=None, ge=0, description="Steps before CUDA graphs.")
    pretokenized_cache: Str | None = Field(default=None, description="Pre-tokenised dataset cache path.")
    seed: Int | None = Field(
        default=None, ge=0, description="expertserve extension: random seed of training."
    )

    @model_validator(mode="after")
    def _rules(self) -> TrainingConfig:
        if self.adapter_type in RANKED_ADAPTERS and (self.rank is None or self.alpha is None):
            missing = " and ".join(n for n in ("rank", "alpha") if getattr(self, n) is None)
            raise ValueError(f"{missing.split()[0]}: required for adapter_type {self.adapter_type!r}")
        if self.adapter_type == "ia3":
            given = [n for n in ("rank", "alpha") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{given[0]}: adapter_type 'ia3' has no rank or alpha; remove it")
        if self.epochs is None and self.num_epochs is None and self.max_steps is None:
            raise ValueError("epochs: required (or num_epochs, or max_steps): training needs a length")
        if self.epochs is not None and self.num_epochs is not None and self.epochs != self.num_epochs:
            raise ValueError(f"num_epochs: {self.num_epochs} differs from its alias epochs ({self.epochs})")
        if not self.target_modules and not self.feedforward_modules:
            raise ValueError("target_modules: required (or feedforward_modules for IA3)")
        if self.fp16 and self.bf16:
            raise ValueError("bf16: fp16 and bf16 are both true; choose one precision")
        return self


class ManifestTool(StrictModel):
    """expertserve extension: a function the expert calls by default (OpenAI's `tools[].function`, flat)."""

    name: Str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Function name (OpenAI's rules).")
    description: Str | None = Field(default=None, description="What the function does (shown to the model).")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"},
        description="JSON schema of the arguments; enforced with structured outputs when the tool is called.",
    )

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        kind = v.get("type", "object")
        if kind != "object":
            raise ValueError(
                f"expected a JSON schema of type 'object' (function arguments), got type {kind!r}"
            )
        return v


class Decoding(StrictModel):
    """Default decoding of the expert. Requests override it; it overrides the server defaults."""

    use_grammar: Bool | None = Field(
        default=None,
        description="Constrain output with the grammar. Unset: on when grammar_file or json_schema is set.",
    )
    grammar_type: (
        Literal["json", "gbnf", "sql", "sql-postgres", "sql-mysql", "cypher", "typescript", "python"] | None
    ) = Field(default=None, description="What the grammar describes; 'json' alone means any JSON object.")
    grammar_file: Str | None = Field(default=None, description="GBNF grammar file, relative to the expert.")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="expertserve extension: inline JSON schema the output must match."
    )
    json_schema_file: Str | None = Field(
        default=None, description="expertserve extension: JSON schema file the output must match."
    )
    validation: Literal["parser", "parser-strict", "tsc", "explain", "none"] | None = Field(
        default=None, description="Post-generation validation method."
    )
    validation_cmd: Str | None = Field(default=None, description="Command of the post-generation validation.")
    stop_sequences: list[Annotated[Str, Field(min_length=1)]] | None = Field(
        default=None, description="Strings that end generation."
    )
    temperature: Num | None = Field(
        default=None, ge=0.0, le=2.0, description="Sampling temperature (0: greedy)."
    )
    top_p: Num | None = Field(
        default=None, gt=0.0, le=1.0, description="Nucleus sampling mass (the engine needs more than 0)."
    )
    top_k: Int | None = Field(default=None, ge=0, description="Top-k limit (0: no limit).")
    min_p: Num | None = Field(
        default=None, ge=0.0, le=1.0, description="expertserve extension: min-p sampling."
    )
    repetition_penalty: Num | None = Field(
        default=None, gt=0.0, le=2.0, description="expertserve extension: repetition penalty (1: none)."
    )
    presence_penalty: Num | None = Field(
        default=None, ge=-2.0, le=2.0, description="expertserve extension: presence penalty."
    )
    frequency_penalty: Num | None = Field(
        default=None, ge=-2.0, le=2.0, description="expertserve extension: frequency penalty."
    )
    max_tokens: Int | None = Field(
        default=None, ge=1, description="expertserve extension: default output cap."
    )

    tools: list[ManifestTool] | None = Field(
        default=None,
        min_length=1,
        description="expertserve extension: functions the expert's chat requests may call when the request "
        "sends no `tools` (request > manifest).",
    )
    tool_choice: Str | None = Field(
        default=None,
        description="expertserve extension: 'none', 'required', 'auto' or a function name from `tools`; used "
        "when the request sends no `tool_choice`. Required with `tools`.",
    )

    @field_validator("grammar_file", "json_schema_file")
    @classmethod
    def _inside(cls, v: str | None) -> str | None:
        return None if v is None else _relative_path(v)

    @model_validator(mode="after")
    def _rules(self) -> Decoding:
        given = [
            n for n in ("grammar_file", "json_schema", "json_schema_file") if getattr(self, n) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"{given[1]}: {' and '.join(given)} are both set; an expert has one output constraint"
            )
        self._tool_rules()
        if self.validation_cmd is not None and self.validation in (None, "none"):
            raise ValueError("validation_cmd: set, but validation is unset or 'none'")
        return self

    def _tool_rules(self) -> None:
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tools: function {dup!r} is declared twice")
        if self.tools and self.tool_choice is None:
            raise ValueError(
                "tool_choice: required when tools are declared ('none', 'required', 'auto' or one of: "
                f"{', '.join(names)})"
            )
        if self.tool_choice is not None and self.tool_choice not in ("none", "auto", "required", *names):
            raise ValueError(
                f"tool_choice: expected 'none', 'required', 'auto' or a function in tools "
                f"({', '.join(names) or 'none declared'}), got {self.tool_choice!r}"
            )
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError(f"tool_choice: {self.tool_choice!r} needs tools")

    @property
    def grammar_enabled(self) -> bool:
        """Whether a grammar/schema constraint is on (explicit use_grammar wins)."""
        if self.use_grammar is not None:
            return self.use_grammar
        return any(getattr(self, n) is not None for n in ("grammar_file", "json_schema", "json_schema_file"))


class TestScenario(OpenMap):
    """Result of one named evaluation scenario (extra keys: numbers, strings, booleans)."""

    extra_types: ClassVar[tuple[type, ...]] = (int, float, str, bool)

    total: Int | None = Field(default=None, ge=0, description="Cases run.")
    passed: Int | None = Field(default=None, ge=0, description="Cases passed.")
    success_rate: Num | None = Field(default=None, description="Success rate in percent (0-100).")
    metrics: dict[str, Num | Str] | None = Field(default=None, description="Scenario metrics.")
    notes: Str | None = Field(default=None, description="Notes.")


class CheckpointSummary(OpenMap):
    """Another checkpoint's figures (extra keys: numbers or strings)."""

    path: Str | None = Field(default=None, description="Checkpoint path.")
    step: Int | None = Field(default=None, ge=0, description="Training step.")
    score: Num | None = Field(default=None, description="Quality score.")
    win_rate: Num | None = Field(default=None, description="Win rate.")
    best_for: list[Str] | None = Field(default=None, description="Where it is best.")


class Training(StrictModel):
    """How the expert is trained."""

    dataset: Dataset = Field(description="Training data.")
    config: TrainingConfig = Field(description="Hyper-parameters.")
    decoding: Decoding | None = Field(default=None, description="Default decoding when serving.")
    trained_on: dt.date | None = Field(default=None, description="Training date (YYYY-MM-DD).")
    base_model_version: Str | None = Field(default=None, description="Base model version trained on.")
    packaging_checkpoint: Str | None = Field(
        default=None, pattern=r"^(checkpoint-\d+|final)$", description="Checkpoint to package."
    )
    checkpoint: Str | None = Field(default=None, description="Checkpoint of this release.")
    quality_score: Num | None = Field(default=None, description="Aggregate quality score.")
    test_scenarios: dict[str, TestScenario] | None = Field(default=None, description="Scenario results.")
    alternative_checkpoints: dict[str, CheckpointSummary] | None = Field(
        default=None, description="Other checkpoints' figures."
    )


class Evaluation(StrictModel):
    """Evaluation material."""

    test_cases: Str | None = Field(default=None, description="Test cases file.")
    suite: Str | list[Str] | None = Field(default=None, description="Evaluation suites or files.")
    metrics: dict[str, Num | Str] | list[Str] | None = Field(default=None, description="Metrics.")
    scorer: Literal["sql-execution", "json-exact", "typescript-tests"] | None = Field(
        default=None,
        description="expertserve extension: the objective scorer `expertserve eval` applies to the test split.",
    )


class QualityMetrics(OpenMap):
    """Evaluation summary (extra keys: numbers or strings). `expertserve eval` writes it."""

    benchmark_score: Num | None = Field(default=None, description="Expert's score.")
    base_model_score: Num | None = Field(default=None, description="Base model's score.")
    improvement_percent: Num | None = Field(default=None, description="Improvement over the base model, %.")
    win_rate_vs_base: Num | None = Field(default=None, description="Win rate against the base model (0-1).")
    test_queries: Int | None = Field(default=None, ge=0, description="Test cases evaluated.")
    training_steps: Int | None = Field(default=None, ge=0, description="Steps of the evaluated checkpoint.")
    checkpoint: Str | None = Field(default=None, description="Evaluated checkpoint.")
    test_date: dt.date | None = Field(default=None, description="Evaluation date (YYYY-MM-DD).")


class Integrity(StrictModel):
    """Signature block of the reference format."""

    timestamp: dt.datetime = Field(description="Signing time (ISO 8601).")
    public_key: Str = Field(pattern=HEX_PATTERN, description="Ed25519 public key (hex).")
    signature: Str = Field(pattern=HEX_PATTERN, description="Ed25519 signature (hex).")


class Limitation(StrictModel):
    """A known weakness of the expert."""

    pattern: Str = Field(description="Identifier of the limitation.")
    description: Str = Field(description="What goes wrong.")
    example: Str | None = Field(default=None, description="Example.")
    workaround: Str | None = Field(default=None, description="Workaround.")


class ExpertManifest(StrictModel):
    """An expert's manifest (`manifest.json`)."""

    name: Str = Field(pattern=NAME_PATTERN, description="Expert name, 'expert-' then lowercase words.")
    version: Str = Field(pattern=VERSION_PATTERN, description="Semantic version MAJOR.MINOR.PATCH.")
    schema_version: Literal["1.0", "2.0"] | None = Field(
        default=None, description="Manifest schema version; unset: inferred from base_model/base_models."
    )
    description: Str = Field(min_length=1, description="What the expert does.")
    author: Str | None = Field(default=None, description="Author or organisation.")
    homepage: Str | None = Field(default=None, pattern=r"^https?://\S+$", description="Homepage URL.")
    repository: Repository | None = Field(default=None, description="Source repository.")
    base_model: BaseModelV1 | None = Field(default=None, description="Schema 1.0: the base model.")
    base_models: list[BaseModelV2] | None = Field(
        default=None, min_length=1, description="Schema 2.0: base models, each with its adapter."
    )
    adapters: list[Adapter] | None = Field(
        default=None, min_length=1, max_length=1, description="Schema 1.0: the expert's adapter."
    )
    soft_prompts: list[SoftPrompt] = Field(default_factory=list, description="Trained soft prompts.")
    capabilities: list[Str] = Field(min_length=1, description="Capability tags (used by the router).")
    routing: Routing | None = Field(default=None, description="Router configuration.")
    constraints: Constraints | None = Field(default=None, description="Loading and composition constraints.")
    perf: Performance | None = Field(default=None, description="Performance figures.")
    runtime: Runtime | None = Field(default=None, description="Runtime hints.")
    training: Training = Field(description="Training configuration.")
    evaluation: Evaluation | None = Field(default=None, description="Evaluation material.")
    integrity: Integrity | None = Field(default=None, description="Signature block of the reference format.")
    license: Str = Field(min_length=1, description="SPDX licence identifier.")
    limitations: list[Str | Limitation] = Field(default_factory=list, description="Known limitations.")
    tags: list[Str] = Field(default_factory=list, description="Search tags.")
    quality_metrics: QualityMetrics | None = Field(default=None, description="Evaluation summary.")

    _check_description = field_validator("description", "license")(
        classmethod(lambda cls, v: _non_empty(v, "value"))
    )

    @model_validator(mode="after")
    def _rules(self) -> ExpertManifest:
        v1, v2 = self.base_model is not None, self.base_models is not None
        if v1 == v2:
            if v1:
                raise ValueError("base_model: set base_model (schema 1.0) or base_models (2.0), not both")
            raise ValueError("base_models: required (or base_model in schema 1.0)")
        inferred = "1.0" if v1 else "2.0"
        if self.schema_version is not None and self.schema_version != inferred:
            key = "base_model" if v1 else "base_models"
            raise ValueError(
                f"schema_version: {self.schema_version!r} does not match {key} (schema {inferred})"
            )
        if v2 and self.adapters is not None:
            raise ValueError(
                "adapters: top-level adapters is schema 1.0; in 2.0 they go in base_models[].adapters"
            )
        if v1 and self.adapters is None:
            raise ValueError("adapters: required in schema 1.0 (the expert's adapter)")
        names = [sp.name for sp in self.soft_prompts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"soft_prompts: duplicate name(s) {dup}")
        bases = [b.name for b in self.base_model_entries]
        if len(set(bases)) != len(bases):
            raise ValueError("base_models: the same base model is listed twice")
        paths = [a.path for _, a in self.adapter_entries]
        if len(set(paths)) != len(paths):
            raise ValueError("base_models[].adapters[].path: each base model's adapter needs its own path")
        self._check_training_matches_adapters()
        return self

    def _check_training_matches_adapters(self) -> None:
        cfg = self.training.config
        for i, (_, adapter) in enumerate(self.adapter_entries):
            where = f"base_models[{i}].adapters[0]" if self.base_models else "adapters[0]"
            if adapter.effective_type != cfg.adapter_type and adapter.type != cfg.adapter_type:
                raise ValueError(
                    f"training.config.adapter_type: {cfg.adapter_type!r} differs from {where}.type {adapter.type!r}"
                )
            for mine, theirs in (("rank", "r"), ("alpha", "alpha")):
                a, b = getattr(cfg, mine), getattr(adapter, theirs)
                if a is not None and b is not None and a != b:
                    raise ValueError(f"training.config.{mine}: {a} differs from {where}.{theirs} ({b})")

    @property
    def effective_schema_version(self) -> str:
        """The schema version, given or inferred."""
        return "1.0" if self.base_model is not None else "2.0"

    @property
    def base_model_entries(self) -> list[BaseModelV1]:
        """Base models the expert was trained for, in manifest order."""
        return [self.base_model] if self.base_model is not None else list(self.base_models or [])

    @property
    def adapter_entries(self) -> list[tuple[BaseModelV1, Adapter]]:
        """(base model, adapter) pairs, in manifest order."""
        if self.base_model is not None:
            return [(self.base_model, a) for a in (self.adapters or [])]
        return [(b, b.adapters[0]) for b in (self.base_models or [])]

    def adapter_for(self, base_model: str, aliases: Iterable[str] = ()) -> Adapter | None:
        """The adapter trained for `base_model` (matched by name or any alias); the one lookup every part uses."""
        wanted = {base_model, *aliases}
        return next((adapter for base, adapter in self.adapter_entries if base.name in wanted), None)

    @property
    def decoding(self) -> Decoding:
        """The expert's default decoding (empty when the manifest has none)."""
        return self.training.decoding or Decoding()
