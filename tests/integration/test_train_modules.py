"""The torch side of training without Ray: every adapter type learns jointly with a soft prompt, every init
method gives the right rows, and the prompt is masked out of the loss."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytestmark = pytest.mark.model
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from expertserve.models.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")
    return path, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("adapter_type", ["lora", "dora", "ia3"])
def test_adapter_and_soft_prompt_train_jointly(tiny: tuple[Path, Any], adapter_type: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from expertserve.train.loop import _peft
    from expertserve.train.modules import ExpertModule, collate, encode, init_soft_prompt

    path, tok = tiny
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    plan = SimpleNamespace(
        adapter_type=adapter_type,
        rank=8,
        alpha=16,
        dropout=0.0,
        target_modules=MODULES,
        feedforward_modules=["gate_proj", "up_proj", "down_proj"],
    )
    soft = init_soft_prompt(
        "vocab_sample", 4, model.get_input_embeddings().weight, tok, None, torch.Generator().manual_seed(0)
    )
    module = ExpertModule(_peft(model, plan), [soft])
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert "soft_prompts.0" in trainable and len(trainable) > 1
    example = {
        "messages": [
            {"role": "user", "content": "SELECT name"},
            {"role": "assistant", "content": "FROM users"},
        ]
    }
    batch = collate([encode(example, tok, 128)] * 4, tok.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.05)
    before = soft.clone()
    losses = []
    for _ in range(15):
        loss = module(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert not torch.equal(module.soft_prompts[0].detach(), before), "the soft prompt did not train"


@pytest.mark.parametrize("method", ["text", "random", "vocab_sample"])
def test_soft_prompt_init_methods(tiny: tuple[Path, Any], method: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from expertserve.train.modules import init_soft_prompt

    path, tok = tiny
    embeddings = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight
    rows = init_soft_prompt(method, 7, embeddings, tok, "SELECT name", torch.Generator().manual_seed(0))
    assert rows.shape == (7, embeddings.shape[1])
    if method == "text":
        ids = tok("SELECT name", add_special_tokens=False)["input_ids"]
        assert torch.equal(rows[0], embeddings[ids[0]].detach()) and torch.equal(rows[len(ids)], rows[0])
    if method == "vocab_sample":
        assert all(any(torch.equal(r, e) for e in embeddings.detach()) for r in rows)


def test_prompt_tokens_are_masked(tiny: tuple[Path, Any]) -> None:
    from expertserve.train.modules import IGNORE_INDEX, encode

    _, tok = tiny
    example = {
        "messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "yes"}]
    }
    encoded = encode(example, tok, 128)
    answer = [
        i for i, lab in zip(encoded["input_ids"], encoded["labels"], strict=True) if lab != IGNORE_INDEX
    ]
    assert tok.decode(answer).startswith("yes") and tok.decode(answer).endswith("<|im_end|>\n")
    assert encoded["labels"][0] == IGNORE_INDEX


class _RunsCode:
    """Unpickling this runs a command: what a checkpoint planted on shared storage could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_crafted_to_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    import json
    import pickle

    import torch

    from expertserve.train.loop import CHECKPOINT_STATE, _load_state

    marker = tmp_path / "pwned"
    (tmp_path / "step.json").write_text(json.dumps({"step": 3}))
    torch.save({"optimizer": _RunsCode(marker)}, tmp_path / CHECKPOINT_STATE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _load_state(tmp_path, None, None, None, None)
    assert not marker.exists()
