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
        default=None,
        description="Runs and checkpoints: a directory (a mounted shared file system on multi-node clusters) or "
        "a URI Ray Train stores to (s3://, gs://, hdfs://, abfs://, file://).",
    )
    version: str | None = Field(
        default=None,
        pattern=r"^\d+\.\d+\.\d+$",
        description="Version of the trained expert; default: the manifest's, with the patch number raised when "
        "the output already holds a trained version.",
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
    sign_key: str | None = Field(
        default=None,
        description="Ed25519 private key file (`expertserve keygen`): the package is signed with it.",
    )
    publish: str | None = Field(
        default=None,
        description="Install the package, once trained, into this directory or expert store URI (as `expertserve "
        "install`): servers serve packages, never a training output in place.",
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


# The URI schemes Ray Train's storage (pyarrow.fs) takes; anything else is refused before Ray starts.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def storage_location(value: str | None, default: Path) -> tuple[str, bool]:
    """Where runs are stored, as Ray Train's `storage_path`, and whether it is a local directory.

    Raises:
        ValueError: A URI with a scheme Ray Train cannot store to (named, with the ones it can).
    """
    if value is None:
        return str(default.resolve()), True
    scheme, sep, rest = value.partition("://")
    if not sep:
        return str(Path(value).expanduser().resolve()), True
    if scheme.lower() not in STORAGE_SCHEMES or not rest.strip("/"):
        raise ValueError(
            f"storage: {value!r}: expected a directory or a URI of {', '.join(s + '://' for s in STORAGE_SCHEMES)} "
            "with a bucket or path"
        )
    if scheme.lower() == "file":
        return str(Path("/" + rest.lstrip("/")).resolve()), True
    return value, False
