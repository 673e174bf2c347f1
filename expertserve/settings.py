"""Process-wide paths. Precedence: explicit argument > environment variable > default."""

from __future__ import annotations

import os
from pathlib import Path

# The base model clients and manifests name by default (the offline SmolLM2, see expertserve/models/offline.py).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOME_ENV = "EXPERTSERVE_HOME"
INSTALL_ENV = "EXPERTSERVE_INSTALL_DIR"
STORE_CACHE_ENV = "EXPERTSERVE_STORE_CACHE"


def home_dir() -> Path:
    """Root of expertserve's own files: converted models and installed experts."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "expertserve").expanduser()


def install_dir(explicit: str | Path | None = None) -> Path:
    """Where `expertserve install` puts experts from `.expert` packages (`<dir>/<name>/<version>/`)."""
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get(INSTALL_ENV) or home_dir() / "experts").expanduser()


def store_cache_dir() -> Path:
    """Where this node mirrors expert stores (shared storage URIs; see packaging/store.py). Per node, never shared."""
    return Path(os.environ.get(STORE_CACHE_ENV) or home_dir() / "stores").expanduser()


def models_dir() -> Path:
    """Where converted base models are cached."""
    return home_dir() / "models"


def repo_experts_dir() -> Path:
    """The `experts/` directory of a source checkout (the shipped experts)."""
    return Path(__file__).resolve().parent.parent / "experts"


def default_expert_roots() -> list[Path]:
    """The expert roots searched when none are given: the repository's `experts/`, then the install directory."""
    return [repo_experts_dir(), install_dir()]
