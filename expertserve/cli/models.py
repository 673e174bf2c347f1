"""`expertserve models`: the offline default base model and tiny test models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from expertserve.models import offline


def run_prepare(args: Any) -> int:
    """Converts (once) and verifies the default base model."""
    if offline.is_prepared() and not args.force:
        print(f"{offline.DEFAULT_MODEL.model_id}: ready at {offline.model_dir()}")
        return 0
    start = time.monotonic()
    print(
        f"{offline.DEFAULT_MODEL.model_id}: converting {offline.gguf_path().name} (about 30 s, once)...",
        flush=True,
    )
    path = offline.prepare(force=args.force)
    print(
        f"{offline.DEFAULT_MODEL.model_id}: ready at {path} ({time.monotonic() - start:.0f} s, verified: "
        f"rope_theta {offline.DEFAULT_MODEL.rope_theta:g}, greedy answer mentions "
        f"{offline.DEFAULT_MODEL.probe_answer!r})"
    )
    return 0


def run_path(args: Any) -> int:
    """Prints the prepared model directory (fails when not prepared)."""
    print(offline.prepared_model_dir())
    return 0


def run_tiny(args: Any) -> int:
    """Writes a tiny random model."""
    from expertserve.models.tiny import build_tiny_model

    path = build_tiny_model(Path(args.output), arch=args.arch, seed=args.seed)
    print(f"tiny {args.arch} model written to {path}")
    return 0
