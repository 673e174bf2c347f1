"""Evaluation on the real vLLM engine with a tiny fp32 model: parity with transformers + PEFT, the report,
and quality_metrics written back into a manifest that still validates."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from expertserve.manifest import load_manifest
from tests.helpers import make_expert, manifest
from tests.reference import reference_greedy

pytestmark = pytest.mark.engine

TINY_ID = "tiny-test-model"
PROMPTS = ["Extract the fields.", "SELECT name FROM users", "function add(a: number)", "hello world yes no"]


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny base model and an expert with a random (non-identity) LoRA adapter and soft prompt."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from expertserve.engine.soft_prompts import save_soft_prompt
    from expertserve.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    base = build_tiny_model(root / "tiny", seed=1)
    data = manifest()
    data["base_models"][0]["name"] = TINY_ID
    data["training"]["decoding"] = {"temperature": 0.0, "max_tokens": 12}
    data["evaluation"] = {"scorer": "json-exact"}
    data["training"]["dataset"]["test_path"] = "data/test.jsonl"
    data["training"]["dataset"]["validation_path"] = "data/valid.jsonl"
    expert = make_expert(root / "expert-demo", data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(expert / "adapter")
    save_soft_prompt(
        expert / "soft_prompts" / "style.safetensors",
        torch.randn(4, model.config.hidden_size) * model.get_input_embeddings().weight.std(),
    )
    rows = [
        {
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": '{"a": 1}'}],
            "meta": {"gold": {"a": 1}},
        }
        for p in PROMPTS
    ]
    (expert / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (expert / "data" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return expert, base


@pytest.fixture(scope="module")
def engine(tiny_expert: tuple[Path, Path]) -> Iterator[Any]:
    from expertserve.engine.batch import BatchEngine

    engine = BatchEngine(tiny_expert[1], max_lora_rank=8, dtype="float32")
    yield engine
    engine.close()


@pytest.mark.parametrize(("adapter", "soft"), [(False, False), (True, False), (False, True), (True, True)])
def test_engine_matches_transformers_and_peft(
    engine: Any, tiny_expert: tuple[Path, Path], adapter: bool, soft: bool
) -> None:
    from vllm import SamplingParams

    from expertserve.engine.batch import GenerationRequest
    from expertserve.engine.soft_prompts import load_soft_prompt

    expert, base = tiny_expert
    sampling = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=True)
    soft_prompt = load_soft_prompt(expert / "soft_prompts" / "style.safetensors") if soft else None
    lora = ("expert-demo", 1, str(expert / "adapter")) if adapter else None
    outputs = engine.llm.generate(
        [
            engine.prompt(GenerationRequest([{"role": "user", "content": p}], sampling, lora, soft_prompt))
            for p in PROMPTS[:2]
        ],
        sampling,
        lora_request=_lora(lora),
        use_tqdm=False,
    )
    for prompt, output in zip(PROMPTS[:2], outputs, strict=True):
        assert list(output.outputs[0].token_ids) == reference_greedy(base, expert, prompt, adapter, soft, 8)


def _lora(lora: tuple[str, int, str] | None) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(*lora) if lora else None


def test_adapter_and_soft_prompt_change_the_output(engine: Any, tiny_expert: tuple[Path, Path]) -> None:
    from vllm import SamplingParams

    from expertserve.engine.batch import GenerationRequest
    from expertserve.engine.soft_prompts import load_soft_prompt

    expert, _ = tiny_expert
    sampling = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    soft = load_soft_prompt(expert / "soft_prompts" / "style.safetensors")
    lora = ("expert-demo", 1, str(expert / "adapter"))
    messages = [{"role": "user", "content": PROMPTS[0]}]
    texts = {
        name: engine.generate([GenerationRequest(messages, sampling, lo, sp)])[0]
        for name, (lo, sp) in {"base": (None, None), "adapter": (lora, None), "soft": (None, soft)}.items()
    }
    assert texts["adapter"] != texts["base"] and texts["soft"] != texts["base"]


def test_evaluate_reports_scores_and_writes_quality_metrics(
    engine: Any, tiny_expert: tuple[Path, Path]
) -> None:
    from expertserve.eval.runner import EvalSettings, evaluate

    expert, base = tiny_expert
    report = evaluate(
        expert, EvalSettings(base_model_dir=base, base_model_id=TINY_ID, limit=3), engine=engine
    )
    assert (report.n, report.metric) == (3, "exact_match")
    assert 0 <= report.base_score <= 1 and 0 <= report.expert_score <= 1
    assert set(report.ablation) == {"adapter_only", "soft_prompt_only"}
    assert report.well_formed_metric == "valid_json"
    assert set(report.well_formed) == {"base", "expert", "adapter_only", "soft_prompt_only"}
    assert all(0 <= share <= 1 for share in report.well_formed.values())
    assert "temperature=0.0 (manifest)" in report.decoding and "max_tokens=12 (manifest)" in report.decoding
    qm = load_manifest(expert).manifest.quality_metrics
    assert qm.test_queries == 3 and qm.benchmark_score == round(report.expert_score, 4)
    assert qm.model_extra["metric"] == "exact_match" and "adapter_only_score" in qm.model_extra
    assert qm.model_extra["valid_json"] == round(report.well_formed["expert"], 4)
    assert json.loads((expert / "manifest.json").read_text())["_comment"] == "kept"


def test_the_validation_split_is_scored_apart_and_never_written(
    engine: Any, tiny_expert: tuple[Path, Path]
) -> None:
    from expertserve.eval.runner import EvalError, EvalSettings, evaluate

    expert, base = tiny_expert
    before = (expert / "manifest.json").read_text()
    tiny = EvalSettings(base_model_dir=base, base_model_id=TINY_ID)
    report = evaluate(expert, dataclasses.replace(tiny, split="valid", expert_only=True), engine=engine)
    assert (report.n, report.split) == (2, "valid")
    assert report.base_score is None and report.improvement is None and report.ablation == {}
    assert 0 <= report.expert_score <= 1
    assert (expert / "manifest.json").read_text() == before, "quality_metrics come from the test split only"
    with pytest.raises(EvalError, match="split 'train'"):
        evaluate(expert, dataclasses.replace(tiny, split="train"), engine=engine)


@pytest.fixture(autouse=True)
def _comment_in_manifest(tiny_expert: tuple[Path, Path]) -> None:
    """A comment key that write-back must keep."""
    path = tiny_expert[0] / "manifest.json"
    raw = json.loads(path.read_text())
    raw["_comment"] = "kept"
    path.write_text(json.dumps(raw, indent=2))


def test_seeded_sampling_with_chunked_prefill_keeps_the_engine_alive(engine: Any) -> None:
    """vLLM 0.32 on CPU crashed ("CPU Generator does not use offset") when a seeded request's prefill was split
    across steps; expertserve's vLLM plugin stops that (expertserve/engine/vllm_patches/json_whitespace.py)."""
    from vllm import SamplingParams

    from expertserve.engine.batch import GenerationRequest

    sampling = SamplingParams(temperature=0.8, max_tokens=4, seed=7)
    prompt = "SELECT name FROM users WHERE age > 30 ORDER BY name LIMIT 10; " * 12
    outputs = engine.generate(
        [GenerationRequest([{"role": "user", "content": f"{prompt}{i}"}], sampling) for i in range(60)]
    )
    assert len(outputs) == 60


def test_a_killed_eval_leaves_no_engine_processes(tiny_expert: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL of `expertserve eval` while its vLLM engine runs: the watchdog ends the engine's processes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    expert, base = tiny_expert
    env = {k: v for k, v in os.environ.items() if k != "EXPERTSERVE_WATCHDOG"}
    cmd = [
        sys.executable,
        "-m",
        "expertserve",
        "eval",
        str(expert),
        "--base-model",
        str(base),
        "--base-model-id",
        TINY_ID,
        "--no-write",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            children = psutil.Process(proc.pid).children(recursive=True)
            seen.update({c.pid: c for c in children})
            if any("VLLM" in _name(c) for c in children):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "eval ended before its engine could be seen; nothing was tested"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        engines = [p for p in seen.values() if "VLLM" in _name(p) or "python" in _name(p)]
        assert engines, "no engine process was seen"
        gone_by = time.monotonic() + 15
        while time.monotonic() < gone_by and any(_running(p) for p in seen.values()):
            time.sleep(0.2)
        assert not [p.pid for p in seen.values() if _running(p)], "engine processes outlived the killed eval"
    finally:
        for p in seen.values():
            if _running(p):
                p.kill()


def _name(process: Any) -> str:
    try:
        return process.name() + " " + " ".join(process.cmdline()[:2])
    except Exception:
        return ""


def _running(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
