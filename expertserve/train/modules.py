"""Torch pieces of training: soft-prompt initialisation and files, tokenisation, the expert module.

The soft prompt is a trainable [tokens, hidden] tensor prepended to the input embeddings (PEFT cannot put
prompt tuning and LoRA on one model). Its file (expertserve/engine/soft_prompts.py) holds exactly that tensor,
which serving feeds to vLLM as the first rows of `prompt_embeds`; training and serving share one definition.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def init_soft_prompt(
    method: str,
    tokens: int,
    embeddings: torch.Tensor,
    tokenizer: Any,
    init_text: str | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Initial [tokens, hidden] soft prompt.

    Args:
        method: `text` (embed init_text, repeated or cut to `tokens`), `random` (normal with the embedding
            matrix's std), or `vocab_sample` (rows of randomly chosen vocabulary entries).
        embeddings: The base model's input embedding matrix [vocab, hidden].
    """
    vocab, hidden = embeddings.shape
    if method == "text":
        ids = tokenizer(init_text or "", add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("init_text tokenizes to nothing")
        ids = (ids * (tokens // len(ids) + 1))[:tokens]
        return embeddings[torch.tensor(ids)].detach().clone().float()
    if method == "vocab_sample":
        ids = torch.randint(0, vocab, (tokens,), generator=generator)
        return embeddings[ids].detach().clone().float()
    if method == "random":
        std = embeddings.float().std().item()
        return torch.randn(tokens, hidden, generator=generator) * std
    raise ValueError(f"unknown init_method {method!r}")


def encode(example: dict[str, Any], tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    """Token ids of a chat example, with labels only on the answer (the prompt is masked).

    The prompt is formatted with the base model's own chat template, exactly as serving formats requests.
    """
    messages = example["messages"]
    prompt_ids = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the chat template does not extend the prompt with the answer; cannot mask the prompt"
        )
    ids = full_ids[:max_len]
    labels = [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
    return {"input_ids": ids, "labels": labels}


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class ExpertModule(nn.Module):
    """A PEFT model with the expert's soft prompts prepended to every input."""

    def __init__(self, peft_model: nn.Module, soft_prompts: list[torch.Tensor]):
        super().__init__()
        self.peft_model = peft_model
        self.soft_prompts = nn.ParameterList([nn.Parameter(t) for t in soft_prompts])

    @property
    def prefix_tokens(self) -> int:
        """Rows prepended to every input."""
        return sum(p.shape[0] for p in self.soft_prompts)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens."""
        embed = self.peft_model.get_input_embeddings()
        inputs = embed(input_ids)
        if len(self.soft_prompts):
            batch = input_ids.shape[0]
            prefix = torch.cat(list(self.soft_prompts)).to(inputs.dtype).unsqueeze(0).expand(batch, -1, -1)
            inputs = torch.cat([prefix, inputs], dim=1)
            n = prefix.shape[1]
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
            labels = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
        return self.peft_model(inputs_embeds=inputs, attention_mask=attention_mask, labels=labels).loss
