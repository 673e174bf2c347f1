"""The offline base model conversion and the tiny model builder, on the real libraries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertserve.errors import ModelError
from expertserve.models import offline
from expertserve.models.tiny import build_tiny_model

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def prepared() -> Path:
    """The cached conversion (scripts/setup.sh prepares it; this converts when it is missing)."""
    return offline.prepare()


def test_conversion_keeps_rope_theta_and_answers_the_probe(prepared: Path) -> None:
    config = json.loads((prepared / "config.json").read_text())
    assert offline.config_rope_theta(config) == 100000.0
    assert config["hidden_size"] == 576 and config["vocab_size"] == 49152
    answer = offline.verify(prepared)
    assert "paris" in answer.lower()
    stamp = json.loads((prepared / offline.STAMP).read_text())
    assert stamp["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_verify_catches_a_lost_rope_theta(prepared: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in prepared.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "config.json").unlink()
    config = json.loads((prepared / "config.json").read_text())
    config.setdefault("rope_parameters", {})["rope_theta"] = 10000.0
    config.pop("rope_theta", None)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="rope_theta is 10000.0, expected 100000.0"):
        offline.verify(broken)


def test_verify_catches_wrong_weights(prepared: Path, tmp_path: Path) -> None:
    """Right tokenizer and RoPE base, random weights: only the greedy probe can tell, and it does."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(prepared).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ModelError, match="expected it to mention 'Paris'"):
        offline.verify(tmp_path)


def test_prepare_is_cached(prepared: Path) -> None:
    stamp = prepared / offline.STAMP
    before = stamp.stat().st_mtime_ns
    assert offline.prepare() == prepared
    assert stamp.stat().st_mtime_ns == before


def test_missing_distribution_is_a_clear_error() -> None:
    fake = offline.OfflineModel("x/y", "no-such-dist-expertserve", "a.gguf", 1.0, "q", "a")
    with pytest.raises(ModelError, match="no-such-dist-expertserve is not installed"):
        offline.gguf_path(fake)
    with pytest.raises(ModelError, match="not prepared"):
        offline.prepared_model_dir(fake, cache=Path("/nonexistent"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_is_deterministic_and_chat_ready(tmp_path: Path, arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outputs = []
    for run in ("a", "b"):
        path = build_tiny_model(tmp_path / run, arch=arch, seed=3)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tok.apply_chat_template(
            [{"role": "user", "content": "SELECT name FROM users"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            outputs.append(model.generate(**ids, max_new_tokens=6, do_sample=False)[0].tolist())
    assert outputs[0] == outputs[1]
    assert tok.decode(tok("SELECT name FROM users")["input_ids"]) == "SELECT name FROM users"
    assert model.config.hidden_size // model.config.num_attention_heads in (32, 64)


def test_tiny_model_refuses_head_sizes_vllm_cpu_lacks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vLLM on CPU needs one of"):
        build_tiny_model(tmp_path / "x", hidden_size=48, heads=2)
