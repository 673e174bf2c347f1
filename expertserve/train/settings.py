"""How a training run executes (not what it learns: that is the manifest's training.config). Pure Python.

Precedence, written once: command line > `--config FILE` > the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from expertserve.manifest.base import StrictModel


class TrainSettings(StrictModel):
    """Options of `expertserve train` / `python -m expertserve.train`, also readable from a YAML file."""

    workers: int = Field(default=1, ge=1, description="Ray Train workers (data parallel).")
    gpu: bool = Field(default=False, description="One GPU per worker.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many steps (overrides the manifest)."
    )
    output: str | None = Field(
        default=None, description="Receives the trained expert and its package; default: the expert."
    )
    base_model: str | None = Field(
        default=None, description="Base model directory; default: the prepared SmolLM2."
    )
    base_model_id: str | None = Field(default=None, description="The id the manifest names for base_model.")
    storage: str | None = Field(
        default=None, description="Runs and checkpoints; shared storage on multi-node clusters."
    )
    max_failures: int = Field(
        default=2, ge=0, description="Restarts from the latest checkpoint after a lost worker."
    )
    cpus_per_worker: float | None = Field(
        default=None, gt=0, description="CPUs Ray reserves per worker (default 1)."
    )
    address: str | None = Field(
        default=None, description="Ray cluster to join; default: RAY_ADDRESS or a local one."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="Where Ray puts the workers (STRICT_SPREAD: one per node)."
    )

    @classmethod
    def resolve(cls, cli: dict[str, Any], file: str | Path | None) -> TrainSettings:
        """Command-line values that were given (not None) over the file's over the defaults.

        Raises:
            ValueError: The file is unreadable or has unknown or invalid keys (the message names them).
        """
        import yaml

        data: dict[str, Any] = {}
        if file is not None:
            loaded = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{file}: expected a mapping of train options")
            data.update({k: v for k, v in loaded.items() if not str(k).startswith("_")})
        data.update({k: v for k, v in cli.items() if v is not None})
        return cls.model_validate(data)
