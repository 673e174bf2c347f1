"""The expert manifest: model, loading, and the status of every field."""

from expertserve.manifest.load import LoadedManifest, load_manifest, validate_manifest
from expertserve.manifest.model import ExpertManifest

__all__ = ["ExpertManifest", "LoadedManifest", "load_manifest", "validate_manifest"]
