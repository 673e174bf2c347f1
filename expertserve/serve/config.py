"""What users write to configure the server (`expertserve serve --config FILE`, `serve run` args). Pure Python.

Precedence for process settings: command line > config file > the defaults below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from expertserve.engine.config import EngineConfig
from expertserve.manifest.base import StrictModel
from expertserve.settings import DEFAULT_MODEL_ID


class ReplicaConfig(StrictModel):
    """Replicas and autoscaling of the engine deployment."""

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (when autoscaling is off).")
    autoscaling: bool = Field(default=False, description="Scale between min_replicas and max_replicas.")
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(default=2, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(default=8, gt=0, description="Autoscaling target per replica.")
    max_ongoing_requests: int = Field(default=64, ge=1, description="Requests a replica runs at once.")
    max_queued_requests: int = Field(
        default=128, ge=1, description="Queued requests before 503 + Retry-After."
    )
    num_cpus: float = Field(default=1, gt=0, description="CPUs Ray reserves per engine replica.")
    num_gpus: float = Field(default=0, ge=0, description="GPUs per engine replica.")
    engine_retry_s: float = Field(
        default=120,
        ge=0,
        description="How long a request whose engine replica died before it produced output waits for a restarted "
        "or another replica (retried with backoff) before it gets 503 + Retry-After.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ReplicaConfig:
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas: larger than max_replicas")
        return self


class RoutingConfig(StrictModel):
    """`model: "auto"`: the router picks the expert (or the base model)."""

    enabled: bool = Field(default=True, description="Offer routed model names (needs the offline embedder).")
    routed_names: list[str] = Field(
        default_factory=lambda: ["auto"], description="Model names that are routed."
    )
    min_confidence: float = Field(default=0.5, ge=0, le=1, description="Below this, the base model answers.")
    base_score: float = Field(default=0.42, description="The base model's score among the candidates.")


class ServeConfig(StrictModel):
    """The whole server."""

    model_dir: str | None = Field(
        default=None, description="Base model directory; default: the prepared SmolLM2."
    )
    model_id: str = Field(
        default=DEFAULT_MODEL_ID,
        description="The id clients use for the base model, and that manifests name.",
    )
    experts_dirs: list[str] | None = Field(
        default=None,
        description="Expert roots; default: the repository's experts/ and the install directory.",
    )
    decoding_defaults: str | None = Field(default=None, description="JSON file of server decoding defaults.")
    ignore_manifest_decoding: bool = Field(
        default=False, description="Ignore manifest decoding (request > server defaults), for comparisons."
    )
    host: str = Field(default="127.0.0.1", description="HTTP host of Ray Serve's proxy.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Largest request body (413 above).")
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys for inference; empty: no auth."
    )
    admin_key: str | None = Field(
        default=None, description="Bearer key for /admin endpoints; unset: loopback only."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig, description="Replicas and autoscaling.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Routing of `model: auto`.")

    @classmethod
    def from_file(cls, path: str | Path) -> ServeConfig:
        """Loads YAML or JSON.

        Raises:
            ValueError: Unreadable file, or a config that does not validate (pydantic names the field).
        """
        import yaml

        text = Path(path).read_text(encoding="utf-8")
        data: Any = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data or {})
