"""What a running server checks on every expert it scans, so an expert it cannot serve is never listed as servable.

Beyond the manifest (validated on load) and its files (`validate --strict`'s checks), the running engine sets
limits: the LoRA rank it was started with, the modules the base model has, the base model's hidden size, and the
grammars its structured-output backend can compile. An expert that breaks any of them is registered as broken:
not in `/v1/models`, with the reason in `/v1/experts` and in the reload response.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from expertserve.engine.args import lora_rank_slot
from expertserve.manifest.files import ADAPTER_CONFIG, read_safetensors_header, soft_prompt_shape
from expertserve.packaging.archive import verify_installed
from expertserve.packaging.trust import TrustPolicy
from expertserve.registry import ExpertRecord, config_rank

GrammarCompiler = Callable[[str, str], str | None]  # (kind, text) -> problem or None


@dataclass(frozen=True)
class ServingContext:
    """The limits of the engine a server runs.

    Attributes:
        base_model: The served base model id.
        max_lora_rank: The largest adapter rank the engine holds.
        hidden_size: The base model's hidden size (the width every soft prompt must have); None when unknown.
        modules: Names of the base model's weight-carrying modules (`q_proj`, ...), the targets an adapter may
            name; empty when unknown.
        template_uses_name: Whether the base model's chat template renders a message's author `name`.
        template_has_tools: Whether the base model's chat template renders a `tools` list.
        prefix_caching: Whether the engines run with prefix caching (None: not known, nothing checked).
    """

    base_model: str
    max_lora_rank: int
    hidden_size: int | None = None
    modules: frozenset[str] = frozenset()
    template_uses_name: bool = False
    template_has_tools: bool = False
    prefix_caching: bool | None = None

    @classmethod
    def of(
        cls, model_dir: Path, base_model: str, max_lora_rank: int, *, prefix_caching: bool | None = None
    ) -> ServingContext:
        """Read from the base model's config.json and safetensors headers (no weights are loaded)."""
        hidden = None
        config = model_dir / "config.json"
        if config.is_file():
            hidden = json.loads(config.read_text(encoding="utf-8")).get("hidden_size")
        modules: set[str] = set()
        for weights in sorted(model_dir.glob("*.safetensors")):
            for key in read_safetensors_header(weights):
                parts = key.split(".")
                if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
                    modules.add(parts[-2])
        template = _chat_template(model_dir)
        return cls(
            base_model,
            lora_rank_slot(max_lora_rank),
            hidden,
            frozenset(modules),
            bool(re.search(r"message(\.name|\[['\"]name['\"]\])", template)),
            bool(re.search(r"\btools\b", template)),
            prefix_caching,
        )


def _chat_template(model_dir: Path) -> str:
    """The base model's chat template text (tokenizer_config.json and chat_template.jinja), "" when none."""
    texts = []
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        texts.append(str(json.loads(config.read_text(encoding="utf-8")).get("chat_template") or ""))
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        texts.append(jinja.read_text(encoding="utf-8"))
    return "\n".join(texts)


def expert_problems(
    record: ExpertRecord, ctx: ServingContext, compile_grammar: GrammarCompiler | None = None
) -> list[str]:
    """Why this server cannot serve the expert's files, one line each (empty: it can)."""
    found = record.adapter_for(ctx.base_model)
    if found is None:
        return []  # not trained for this base model: `unservable_reason` says so already
    problems = record.file_problems(datasets=False)
    if problems:
        return problems
    adapter, adapter_dir = found
    problems += _adapter_problems(adapter_dir, ctx)
    runtime = record.manifest.runtime
    if ctx.prefix_caching is False and runtime is not None and runtime.requires_kv_cache_persistence:
        problems.append(
            "runtime.requires_kv_cache_persistence: the running engines have prefix caching off (they were "
            "started before this expert was added; restart the server, or set engine.prefix_caching: true)"
        )
    for sp, path in record.soft_prompts:
        width = soft_prompt_shape(path)[1]
        if ctx.hidden_size is not None and width != ctx.hidden_size:
            problems.append(
                f"soft prompt {sp.name!r} is {width} wide; the base model's hidden size is "
                f"{ctx.hidden_size} ({path})"
            )
    if compile_grammar is not None:
        problems += _constraint_problems(record, compile_grammar)
    return problems


def trust_problems(record: ExpertRecord, policy: TrustPolicy, install_root: Path | None = None) -> list[str]:
    """An expert installed from a package is served only when a trusted key signed it (or untrusted packages are
    allowed), checked again at every scan against the package's signed checksums (the files as they are now, the
    signer from the signature); an expert directory the server config names directly is the operator's own and
    needs no signer, except inside `install_root` (the install directory: only packages are put there, so a
    directory without a package's record, a training output say, is not served)."""
    if record.provenance is None:
        if install_root is not None and record.root.resolve().is_relative_to(install_root.resolve()):
            return [
                f"{record.root} is in the install directory {install_root} but was not installed from a package "
                "(package and sign it, then `expertserve install` it)"
            ]
        return []
    package = record.provenance.get("package")
    signer, problem = verify_installed(record.root, record.name, record.version)
    if problem is not None:
        return [f"installed from package {package}: {problem}"]
    refusal = policy.refusal(signer)
    return [f"installed from package {package}: {refusal}"] if refusal else []


def _adapter_problems(adapter_dir: Path, ctx: ServingContext) -> list[str]:
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [f"{adapter_dir / ADAPTER_CONFIG}: unreadable ({e})"]
    problems = []
    rank = config_rank(config)  # the same rank the engines are sized by (registry.py)
    if rank > ctx.max_lora_rank:
        problems.append(
            f"adapter rank {rank} is above the running engine's max_lora_rank {ctx.max_lora_rank} "
            "(restart the server, or set engine.max_lora_rank, to serve it)"
        )
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    missing = sorted(t for t in targets if isinstance(t, str) and ctx.modules and t not in ctx.modules)
    if missing:
        problems.append(f"adapter targets {missing}, which the base model {ctx.base_model} does not have")
    return problems


def _tool_problems(record: ExpertRecord, compile_grammar: GrammarCompiler) -> list[str]:
    """Each declared tool's arguments schema must compile: it is the output constraint of a call."""
    problems = []
    for tool in record.decoding.tools or []:
        problem = compile_grammar("json_schema", json.dumps(tool.parameters))
        if problem:
            problems.append(f"tool {tool.name!r}: parameters schema does not compile: {problem}")
    return problems


def _constraint_problems(record: ExpertRecord, compile_grammar: GrammarCompiler) -> list[str]:
    decoding = record.decoding
    problems = _tool_problems(record, compile_grammar)
    if not decoding.grammar_enabled:
        return problems
    try:
        if decoding.grammar_file:
            problem = compile_grammar(
                "grammar", (record.root / decoding.grammar_file).read_text(encoding="utf-8")
            )
        elif decoding.json_schema is not None:
            problem = compile_grammar("json_schema", json.dumps(decoding.json_schema))
        elif decoding.json_schema_file:
            problem = compile_grammar(
                "json_schema", (record.root / decoding.json_schema_file).read_text("utf-8")
            )
        else:
            return problems
    except (OSError, UnicodeDecodeError) as e:
        return [*problems, f"output constraint unreadable: {e}"]
    return [*problems, f"output constraint does not compile: {problem}"] if problem else problems


def xgrammar_compiler(kind: str, text: str) -> str | None:
    """Compiles a GBNF grammar or a JSON schema with xgrammar, the engine's structured-output backend."""
    import xgrammar

    try:
        if kind == "grammar":
            xgrammar.Grammar.from_ebnf(text)
        else:
            xgrammar.Grammar.from_json_schema(text)
    except (RuntimeError, ValueError) as e:
        # "[01:03:01] /project/cpp/grammar_parser.cc:106: EBNF lexer error at ...": keep what follows the source.
        return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip().splitlines()[-1])[:300]
    return None
