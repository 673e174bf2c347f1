"""Soft-prompt files: one fp32 [tokens, hidden] tensor named `prompt_embeddings` per file.

Training writes them; serving, evaluation and the parity tests read them. The tensor is exactly what the engine
prepends to the prompt's embedding rows (see `expertserve.engine.embeddings`), so all of them share one
definition, kept here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from expertserve.manifest.files import SOFT_PROMPT_TENSOR


def save_soft_prompt(path: Path, tensor: torch.Tensor) -> None:
    """Writes the soft-prompt file (one fp32 tensor named `prompt_embeddings`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({SOFT_PROMPT_TENSOR: tensor.detach().float().contiguous().cpu()}, str(path))


def load_soft_prompt(path: Path) -> torch.Tensor:
    """Reads one soft-prompt file."""
    from safetensors.torch import load_file

    return load_file(str(path))[SOFT_PROMPT_TENSOR]


def load_soft_prompts(paths: Sequence[Path], hidden_size: int | None = None) -> torch.Tensor | None:
    """The expert's soft prompts, in manifest order, as one [tokens, hidden] tensor; None for none.

    Args:
        paths: The soft-prompt files.
        hidden_size: The base model's hidden size, when known: every file must be that wide.

    Raises:
        ValueError: A file is not as wide as the base model's hidden size (the message names the file).
    """
    if not paths:
        return None
    tensors = []
    for path in paths:
        tensor = load_soft_prompt(Path(path))
        if hidden_size is not None and tensor.shape[1] != hidden_size:
            raise ValueError(
                f"{path}: soft prompt is {tensor.shape[1]} wide; the base model's hidden size is "
                f"{hidden_size}"
            )
        tensors.append(tensor)
    return torch.cat(tensors)
