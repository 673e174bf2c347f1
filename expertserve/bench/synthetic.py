"""Synthetic experts for benchmarks: random LoRA weights with the shapes, rank and targets of a shipped
adapter, and optionally a soft prompt. Each is a valid expert directory the registry serves like any other."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from expertserve.manifest.files import SOFT_PROMPT_TENSOR
from expertserve.registry import ExpertRecord


def _manifest(name: str, template: ExpertRecord, model_id: str, soft_tokens: int) -> dict:
    source = template.manifest.model_dump(mode="json", exclude_none=True)
    adapter = source["base_models"][0]["adapters"][0]
    adapter["path"] = "adapter"
    # Never trained: the template's training config stands for how it would be; no grammar or stop sequences,
    # so a benchmark request costs the same whichever synthetic expert it names.
    training = {
        "dataset": {"path": "data/train.jsonl", "format": "jsonl", "source": "synthetic placeholder"},
        "config": source["training"]["config"],
        "decoding": {"temperature": 0.7},
    }
    data = {
        "name": name,
        "version": "0.1.0",
        "schema_version": "2.0",
        "license": "Apache-2.0",
        "description": f"Synthetic benchmark expert with random LoRA weights shaped like {template.name}'s.",
        "base_models": [{"name": model_id, "prompt_template": "chatml", "adapters": [adapter]}],
        "capabilities": ["task:benchmark"],
        "training": training,
    }
    if soft_tokens:
        data["soft_prompts"] = [
            {
                "name": "bench",
                "path": "soft_prompts/bench.safetensors",
                "tokens": soft_tokens,
                "init_method": "random",
            }
        ]
    return data


def make_experts(
    root: Path,
    names: list[str],
    template: ExpertRecord,
    model_id: str,
    *,
    seed: int = 0,
    soft_tokens: int = 0,
    hidden_size: int | None = None,
    distinct_weights: int | None = None,
) -> list[Path]:
    """Writes one expert directory per name under `root` (replacing earlier copies) and returns them.

    Weights: A like PEFT's initialisation scale, B small but non-zero, so every adapter changes the output and
    costs what a trained one costs. With `soft_tokens`, each expert also gets a random soft prompt of that many
    rows of `hidden_size`. With `distinct_weights`, only that many weight files are drawn and the other experts'
    are hard links to them (a thousand experts without gigabytes of random numbers; the engine still loads each
    expert's file as its own adapter).
    """
    from safetensors.numpy import load_file, save_file

    if soft_tokens and hidden_size is None:
        raise ValueError("hidden_size: needed for soft prompts")

    tensors = load_file(str(template.root / "adapter" / "adapter_model.safetensors"))
    config = json.loads((template.root / "adapter" / "adapter_config.json").read_text())
    rng = np.random.default_rng(seed)
    out: list[Path] = []
    for index, name in enumerate(names):
        expert = root / name
        shutil.rmtree(expert, ignore_errors=True)
        (expert / "adapter").mkdir(parents=True)
        weights_file = expert / "adapter" / "adapter_model.safetensors"
        if distinct_weights and index >= distinct_weights:
            os.link(out[index % distinct_weights] / "adapter" / "adapter_model.safetensors", weights_file)
        else:
            weights = {
                k: (rng.standard_normal(v.shape) * (0.02 if "lora_A" in k else 0.005)).astype(v.dtype)
                for k, v in tensors.items()
            }
            save_file(weights, str(weights_file))
        (expert / "adapter" / "adapter_config.json").write_text(
            json.dumps({**config, "base_model_name_or_path": model_id}, indent=2)
        )
        if soft_tokens:
            (expert / "soft_prompts").mkdir()
            embeds = (rng.standard_normal((soft_tokens, hidden_size)) * 0.02).astype(np.float32)
            save_file({SOFT_PROMPT_TENSOR: embeds}, str(expert / "soft_prompts" / "bench.safetensors"))
        (expert / "data").mkdir()
        (expert / "data" / "train.jsonl").write_text(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "placeholder"},
                        {"role": "assistant", "content": "placeholder"},
                    ]
                }
            )
            + "\n"
        )
        (expert / "manifest.json").write_text(
            json.dumps(_manifest(name, template, model_id, soft_tokens), indent=2)
        )
        out.append(expert)
    return out
