"""The manifest model: each field's rule, unknown keys, comments, the reference manifests."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from expertserve.errors import ManifestError
from expertserve.manifest import load_manifest, validate_manifest
from expertserve.manifest.load import parse_json
from tests.helpers import REFERENCE, manifest


def problems_of(data: dict[str, Any]) -> list[str]:
    try:
        validate_manifest(data, "test")
    except ManifestError as e:
        return e.problems
    return []


def mutate(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = manifest()
    fn(data)
    return data


def adapter(d: dict[str, Any]) -> dict[str, Any]:
    return d["base_models"][0]["adapters"][0]


def decoding(d: dict[str, Any]) -> dict[str, Any]:
    return d["training"]["decoding"]


def config(d: dict[str, Any]) -> dict[str, Any]:
    return d["training"]["config"]


def test_minimal_manifest_is_valid() -> None:
    assert problems_of(manifest()) == []


# (case id, mutation, expected start of the single problem line)
RULE_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("name pattern", lambda d: d.update(name="SQL expert"), "name: string should match pattern"),
    ("version semver", lambda d: d.update(version="1.0"), "version: string should match pattern"),
    ("description empty", lambda d: d.update(description=" "), "description: value must not be empty"),
    ("description missing", lambda d: d.pop("description"), "description: required field is missing"),
    ("license missing", lambda d: d.pop("license"), "license: required field is missing"),
    ("capabilities empty", lambda d: d.update(capabilities=[]), "capabilities: list should have at least 1"),
    ("homepage not url", lambda d: d.update(homepage="example.com"), "homepage: string should match"),
    ("schema_version enum", lambda d: d.update(schema_version="3.0"), "schema_version: input should be"),
    (
        "schema_version mismatch",
        lambda d: d.update(schema_version="1.0"),
        "schema_version: '1.0' does not match",
    ),
    ("both base model forms", lambda d: d.update(base_model={"name": "x"}), "base_model: set base_model"),
    ("no base model", lambda d: d.pop("base_models"), "base_models: required"),
    (
        "v1 needs adapters",
        lambda d: (d.pop("base_models"), d.update(base_model={"name": "m"})),
        "adapters: required in schema 1.0",
    ),
    (
        "v2 forbids top adapters",
        lambda d: d.update(adapters=copy.deepcopy(d["base_models"][0]["adapters"])),
        "adapters: top-level adapters is schema 1.0",
    ),
    (
        "quantization enum",
        lambda d: d["base_models"][0].update(quantization="int3"),
        "base_models[0].quantization: input should be",
    ),
    (
        "prompt_template qwen3",
        lambda d: d["base_models"][0].update(prompt_template="qwen3"),
        "base_models[0].prompt_template: input should be 'chatml'",
    ),
    (
        "rope object needs factor",
        lambda d: d["base_models"][0].update(
            rope_scaling={
                "type": "yarn",
                "max_position_embeddings": 8,
                "original_max_position_embeddings": 4,
                "fine_grained": False,
            }
        ),
        "base_models[0].rope_scaling.factor: required field is missing",
    ),
    (
        "two adapters",
        lambda d: d["base_models"][0]["adapters"].append(adapter(d)),
        "base_models[0].adapters: list should have at most 1",
    ),
    ("adapter type enum", lambda d: adapter(d).update(type="prefix"), "base_models[0].adapters[0].type"),
    (
        "target module enum",
        lambda d: adapter(d).update(target_modules=["lm_head"]),
        "base_models[0].adapters[0].target_modules[0]: input should be",
    ),
    ("lora needs r", lambda d: adapter(d).pop("r"), "base_models[0].adapters[0].r: required for type 'lora'"),
    ("lora needs alpha", lambda d: adapter(d).pop("alpha"), "base_models[0].adapters[0].alpha: required"),
    ("r range", lambda d: adapter(d).update(r=512), "base_models[0].adapters[0].r: input should be less"),
    (
        "ia3 has no rank",
        lambda d: (
            adapter(d).update(type="ia3"),
            config(d).update(adapter_type="ia3"),
            config(d).pop("rank"),
            config(d).pop("alpha"),
        ),
        "base_models[0].adapters[0].r: type 'ia3' has no rank or alpha",
    ),
    (
        "feedforward outside targets",
        lambda d: (
            adapter(d).update(type="ia3", feedforward_modules=["down_proj"]),
            adapter(d).pop("r"),
            adapter(d).pop("alpha"),
            config(d).update(adapter_type="ia3"),
            config(d).pop("rank"),
            config(d).pop("alpha"),
        ),
        "base_models[0].adapters[0].feedforward_modules: ['down_proj'] must also be in target_modules",
    ),
    ("dropout range", lambda d: adapter(d).update(dropout=1.5), "base_models[0].adapters[0].dropout"),
    ("sha256 pattern", lambda d: adapter(d).update(sha256="xyz"), "base_models[0].adapters[0].sha256"),
    (
        "adapter path escapes",
        lambda d: adapter(d).update(path="../other"),
        "base_models[0].adapters[0].path: expected a path inside the expert directory",
    ),
    (
        "adapter path absolute",
        lambda d: adapter(d).update(path="/etc"),
        "base_models[0].adapters[0].path: expected a path relative",
    ),
    (
        "dora with use_dora false",
        lambda d: (adapter(d).update(type="dora", use_dora=False), config(d).update(adapter_type="dora")),
        "base_models[0].adapters[0].use_dora: false contradicts type 'dora'",
    ),
    ("soft prompt tokens min", lambda d: d["soft_prompts"][0].update(tokens=0), "soft_prompts[0].tokens"),
    ("soft prompt tokens max", lambda d: d["soft_prompts"][0].update(tokens=513), "soft_prompts[0].tokens"),
    (
        "soft prompt init enum",
        lambda d: d["soft_prompts"][0].update(init_method="zeros"),
        "soft_prompts[0].init_method: input should be 'random', 'text' or 'vocab_sample'",
    ),
    (
        "text init needs text",
        lambda d: d["soft_prompts"][0].update(init_method="text"),
        "soft_prompts[0].init_text: required (non-empty) when init_method is 'text'",
    ),
    (
        "init_text only for text",
        lambda d: d["soft_prompts"][0].update(init_text="hi"),
        "soft_prompts[0].init_text: applies to init_method 'text' only",
    ),
    (
        "soft prompt name unique",
        lambda d: d["soft_prompts"].append(dict(d["soft_prompts"][0])),
        "soft_prompts: duplicate name(s) ['style']",
    ),
    ("temperature max", lambda d: decoding(d).update(temperature=2.5), "training.decoding.temperature"),
    ("temperature min", lambda d: decoding(d).update(temperature=-0.1), "training.decoding.temperature"),
    (
        "temperature string",
        lambda d: decoding(d).update(temperature="0.1"),
        "training.decoding.temperature: input should be a valid number, got '0.1'",
    ),
    ("top_p zero", lambda d: decoding(d).update(top_p=0), "training.decoding.top_p: input should be greater"),
    ("top_p above 1", lambda d: decoding(d).update(top_p=1.2), "training.decoding.top_p"),
    ("top_k negative", lambda d: decoding(d).update(top_k=-1), "training.decoding.top_k"),
    (
        "top_k float",
        lambda d: decoding(d).update(top_k=2.5),
        "training.decoding.top_k: input should be a valid",
    ),
    (
        "stop sequences type",
        lambda d: decoding(d).update(stop_sequences=";"),
        "training.decoding.stop_sequences",
    ),
    (
        "empty stop sequence",
        lambda d: decoding(d).update(stop_sequences=[""]),
        "training.decoding.stop_sequences[0]",
    ),
    ("grammar type enum", lambda d: decoding(d).update(grammar_type="xml"), "training.decoding.grammar_type"),
    (
        "two output constraints",
        lambda d: decoding(d).update(json_schema={"type": "object"}),
        "training.decoding.json_schema: grammar_file and json_schema are both set",
    ),
    (
        "grammar file escapes",
        lambda d: decoding(d).update(grammar_file="../g.gbnf"),
        "training.decoding.grammar_file: expected a path inside",
    ),
    ("use_grammar bool", lambda d: decoding(d).update(use_grammar=1), "training.decoding.use_grammar"),
    ("method enum", lambda d: config(d).update(method="ppo"), "training.config.method"),
    ("learning rate max", lambda d: config(d).update(learning_rate=2), "training.config.learning_rate"),
    ("batch size min", lambda d: config(d).update(batch_size=0), "training.config.batch_size"),
    ("epochs needed", lambda d: config(d).pop("epochs"), "training.config.epochs: required"),
    (
        "epochs alias differs",
        lambda d: config(d).update(num_epochs=3),
        "training.config.num_epochs: 3.0 differs from its alias epochs",
    ),
    (
        "fp16 and bf16",
        lambda d: config(d).update(fp16=True, bf16=True),
        "training.config.bf16: fp16 and bf16",
    ),
    (
        "config rank matches adapter",
        lambda d: config(d).update(rank=16),
        "training.config.rank: 16 differs from base_models[0].adapters[0].r (4)",
    ),
    (
        "config type matches adapter",
        lambda d: config(d).update(adapter_type="dora"),
        "training.config.adapter_type: 'dora' differs from base_models[0].adapters[0].type 'lora'",
    ),
    ("optim enum", lambda d: config(d).update(optim="adafactor"), "training.config.optim"),
    (
        "save_total_limit min",
        lambda d: config(d).update(save_total_limit=0),
        "training.config.save_total_limit",
    ),
    (
        "dataset format enum",
        lambda d: d["training"]["dataset"].update(format="xml"),
        "training.dataset.format",
    ),
    ("trained_on date", lambda d: d["training"].update(trained_on="yesterday"), "training.trained_on"),
    (
        "packaging checkpoint",
        lambda d: d["training"].update(packaging_checkpoint="best"),
        "training.packaging_checkpoint",
    ),
    ("routing keywords min", lambda d: d.update(routing={"keywords": []}), "routing.keywords"),
    (
        "routing blank keyword",
        lambda d: d.update(routing={"keywords": ["sql", " "]}),
        "routing.keywords: item 1 is empty",
    ),
    (
        "routing priority",
        lambda d: d.update(routing={"keywords": ["a"], "priority": 1.5}),
        "routing.priority",
    ),
    ("constraints load_order", lambda d: d.update(constraints={"load_order": -1}), "constraints.load_order"),
    (
        "perf batch sizes",
        lambda d: d.update(
            perf={"latency_ms_overhead": 1, "vram_mb_overhead": 1, "supported_batch_sizes": [0]}
        ),
        "perf.supported_batch_sizes[0]",
    ),
    (
        "runtime kernel enum",
        lambda d: d.update(runtime={"attention_kernel": "flash-v3"}),
        "runtime.attention_kernel",
    ),
    ("runtime bool", lambda d: d.update(runtime={"candle_compatible": "yes"}), "runtime.candle_compatible"),
    (
        "integrity hex",
        lambda d: d.update(
            integrity={"timestamp": "2025-01-01T00:00:00Z", "public_key": "zz", "signature": "00"}
        ),
        "integrity.public_key",
    ),
    (
        "quality extra type",
        lambda d: d.update(quality_metrics={"sql_valid": [1]}),
        "quality_metrics.sql_valid: expected a number/string",
    ),
    ("limitation object", lambda d: d.update(limitations=[{"pattern": "x"}]), "limitations[0]"),
    ("repository type", lambda d: d.update(repository={"type": "svn", "url": "u"}), "repository.type"),
]


@pytest.mark.parametrize(
    ("mutation", "expected"), [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES]
)
def test_field_rule(mutation: Callable[[dict[str, Any]], None], expected: str) -> None:
    problems = problems_of(mutate(mutation))
    assert problems, "the manifest should be invalid"
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(
    "where",
    [
        lambda d: d,
        lambda d: d["base_models"][0],
        lambda d: adapter(d),
        lambda d: d["training"],
        lambda d: config(d),
        lambda d: decoding(d),
        lambda d: d["soft_prompts"][0],
    ],
)
def test_unknown_key_is_an_error_with_its_path(where: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    data = manifest()
    where(data)["temprature"] = 0.2
    problems = problems_of(data)
    assert len(problems) == 1
    assert problems[0].split(":")[0].endswith("temprature")
    assert "unknown field" in problems[0]


def test_unknown_key_suggests_the_close_field() -> None:
    data = manifest()
    decoding(data)["temprature"] = 0.2
    assert "did you mean 'temperature'?" in problems_of(data)[0]


def test_comment_keys_are_ignored_at_every_level() -> None:
    data = manifest(_comment="top")
    for obj in (data["base_models"][0], adapter(data), data["training"], config(data), decoding(data)):
        obj["_note"] = {"any": "value"}
    assert problems_of(data) == []


def test_comment_keys_are_kept_in_free_form_values() -> None:
    data = manifest()
    decoding(data).pop("grammar_file")
    decoding(data)["json_schema"] = {"type": "object", "properties": {"_id": {"type": "string"}}}
    m = validate_manifest(data, "t")
    assert m.decoding.json_schema["properties"] == {"_id": {"type": "string"}}


def test_duplicate_json_keys_are_an_error() -> None:
    with pytest.raises(ManifestError, match="duplicate key 'name'"):
        parse_json('{"name": "expert-a", "name": "expert-b"}', "m.json")


def test_bad_json_names_line_and_column(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text('{"name": "expert-a",\n  oops}')
    with pytest.raises(ManifestError, match="not valid JSON: .* line 2, column 3"):
        load_manifest(tmp_path)


def test_missing_manifest_names_the_file(tmp_path) -> None:
    with pytest.raises(ManifestError, match="manifest.json: file not found"):
        load_manifest(tmp_path)


def test_several_problems_are_all_reported() -> None:
    data = manifest(version="x")
    decoding(data)["temperature"] = 9
    assert len(problems_of(data)) == 2


def test_schema_v1_manifest_is_valid() -> None:
    data = manifest()
    base = data.pop("base_models")[0]
    data["adapters"] = base.pop("adapters")
    base.pop("prompt_template", None)
    data["base_model"] = base
    m = validate_manifest(data, "t")
    assert m.effective_schema_version == "1.0"
    assert [a.r for _, a in m.adapter_entries] == [4]


def test_use_lora_with_use_dora_counts_as_dora() -> None:
    data = manifest()
    adapter(data)["use_dora"] = True
    config(data)["adapter_type"] = "dora"
    m = validate_manifest(data, "t")
    assert m.adapter_entries[0][1].effective_type == "dora"


def test_grammar_enabled_follows_use_grammar() -> None:
    data = manifest()
    assert validate_manifest(data, "t").decoding.grammar_enabled
    decoding(data)["use_grammar"] = False
    assert not validate_manifest(data, "t").decoding.grammar_enabled


@pytest.mark.parametrize("name", ["expert-json", "expert-typescript"])
def test_reference_manifests_that_follow_their_schema_validate(name: str) -> None:
    loaded = load_manifest(REFERENCE / f"{name}.manifest.json")
    assert loaded.manifest.name == name


@pytest.mark.parametrize("name", ["expert-sql", "expert-neo4j"])
def test_reference_manifests_with_qwen3_template_name_the_field(name: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(REFERENCE / f"{name}.manifest.json")
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert problem.startswith("base_models[0].prompt_template:")
    assert "got 'qwen3'" in problem and "write 'chatml'" in problem


def test_reference_sql_manifest_is_otherwise_valid() -> None:
    data = json.loads((REFERENCE / "expert-sql.manifest.json").read_text())
    data["base_models"][0]["prompt_template"] = "chatml"
    m = validate_manifest(data, "t")
    assert m.decoding.min_p == 0
    assert m.quality_metrics.model_extra["sql_valid"] == "16/18"


def test_shipped_experts_validate() -> None:
    from tests.helpers import REPO

    for d in sorted((REPO / "experts").iterdir()):
        loaded = load_manifest(d)
        assert loaded.manifest.name == d.name


def test_replica_minimums_are_bounded() -> None:
    """Finding 15 of the security issue: an unbounded `runtime.min_replicas` set the warmer asking the engines for
    loads without end."""
    problems = problems_of(manifest(runtime={"min_replicas": 10**9}))
    assert any("runtime.min_replicas" in p and "64" in p for p in problems), problems
    assert problems_of(manifest(runtime={"min_replicas": 2})) == []


def test_manifests_nested_too_deep_are_refused_naming_the_bound(tmp_path) -> None:
    """Finding 3: a nested manifest raised RecursionError out of every scan."""
    (tmp_path / "manifest.json").write_text('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ManifestError, match="nested deeper than 64 levels"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"name": ' + "[" * 80 + "]" * 80 + "}")
    with pytest.raises(ManifestError, match="nested deeper than 64 levels"):
        load_manifest(tmp_path)
