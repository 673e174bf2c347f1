"""The lifecycle transitions of an expert scan, logged and counted (`expertserve_expert_lifecycle_total`):
discovered (a new name, version or content), then servable or broken; invalid manifests, kept last valid versions,
removed experts."""

from __future__ import annotations

import logging

from expertserve.manifest.status import RuntimeContext, field_statuses
from expertserve.registry import ExpertRecord, Registry
from expertserve.serve.metrics import Metrics

logger = logging.getLogger("ray.serve")


def log_changes(
    fresh: Registry, before: dict[str, tuple[str, str]], metrics: Metrics, base_model: str
) -> None:
    """Logs and counts what changed from `before` (name -> (version, content id)) to `fresh`."""
    count = metrics.lifecycle.labels
    for problem in fresh.problems:
        if "is not servable" not in problem:  # broken experts are counted below, with their record
            count("kept" if "still serving" in problem else "invalid").inc()
        logger.warning("expert problem: %s", problem)
    for warning in fresh.shadowing():
        logger.warning("expert shadowed: %s", warning)
    for name in sorted(set(before) - {r.name for r in fresh}):
        count("removed").inc()
        logger.info("expert %s removed", name)
    ctx = RuntimeContext.detect()
    for record in fresh:
        if before.get(record.name) != (record.version, record.content_id):
            _log_discovered(record, metrics, base_model, ctx)


def _log_discovered(record: ExpertRecord, metrics: Metrics, base_model: str, ctx: RuntimeContext) -> None:
    count = metrics.lifecycle.labels
    count("discovered").inc()
    reason = record.unservable_reason(base_model)
    count("broken" if record.broken else "servable" if reason is None else "not_servable").inc()
    if reason:
        logger.warning("expert %s %s is not servable here: %s", record.name, record.version, reason)
    else:
        logger.info("expert %s %s servable (content %s)", record.name, record.version, record.content_id[:12])
    for status in field_statuses(record.manifest, ctx):
        if status.path.startswith("runtime.") and status.status == "not applicable":
            logger.info(
                "expert %s: %s = %s not applicable: %s",
                record.name,
                status.path,
                status.value,
                status.detail,
            )
