"""Soft prompts as vLLM `prompt_embeds`: the expert's [tokens, hidden] rows, then the base model's embedding
rows of the prompt tokens. Built server-side only; clients never send embeddings (wrongly shaped ones can
crash the engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight")


def load_input_embeddings(model_dir: Path) -> torch.Tensor:
    """The base model's input embedding matrix [vocab, hidden], read from its safetensors files.

    Raises:
        FileNotFoundError: No safetensors file holds a known embedding tensor.
    """
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    files = (
        [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if index.exists()
        else sorted(model_dir.glob("*.safetensors"))
    )
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in EMBED_KEYS:
                if key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    return f.get_tensor(key)
    raise FileNotFoundError(
        f"{model_dir}: no input embedding tensor ({', '.join(EMBED_KEYS)}) in its safetensors"
    )


class PromptEmbedder:
    """Builds `prompt_embeds` for prompts that carry a soft prompt."""

    def __init__(self, embeddings: torch.Tensor, dtype: torch.dtype):
        self.embeddings = embeddings.to(dtype)
        self.dtype = dtype

    @property
    def hidden_size(self) -> int:
        """Width of an embedding row."""
        return self.embeddings.shape[1]

    def embed(self, token_ids: list[int], soft_prompt: torch.Tensor) -> torch.Tensor:
        """[soft tokens + prompt tokens, hidden].

        Raises:
            ValueError: The soft prompt's width differs from the base model's hidden size.
        """
        if soft_prompt.shape[1] != self.hidden_size:
            raise ValueError(
                f"soft prompt is {soft_prompt.shape[1]} wide; the base model's hidden size is "
                f"{self.hidden_size}"
            )
        return torch.cat(
            [soft_prompt.to(self.dtype), self.embeddings[torch.tensor(token_ids, dtype=torch.long)]]
        )

    def prompt(self, token_ids: list[int], soft_prompt: torch.Tensor | None) -> dict[str, Any]:
        """The vLLM prompt: token ids, or embeddings when the expert has a soft prompt (the one place that
        decides, for the server, `expertserve eval` and the parity tests alike)."""
        if soft_prompt is None:
            return {"prompt_token_ids": token_ids}
        return {"prompt_embeds": self.embed(token_ids, soft_prompt)}


def chat_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to `messages`, ready for the assistant's turn."""
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
