"""What the catalog lists: `GET /v1/models` (OpenAI model objects: the base model, the routed names, the servable
experts) and `GET /v1/experts` (every registered expert with its version, status, adapter, decoding and hints)."""

from __future__ import annotations

import time
from typing import Any

from expertserve.decoding import resolve
from expertserve.errors import ExpertNotFound
from expertserve.manifest.status import RuntimeContext, field_statuses
from expertserve.registry import ExpertRecord
from expertserve.serve.catalog import ExpertCatalog
from expertserve.tenancy.config import Tenant


def _model(model_id: str, created: int, parent: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "expertserve",
        "parent": parent,
        **extra,
    }


def models(catalog: ExpertCatalog, tenant: Tenant | None = None) -> dict[str, Any]:
    """`GET /v1/models`: the base model, the routed names (when routing is on), the servable experts; for a
    `tenant`, only those it may use (the routed names when it may use an expert or the base model)."""
    created = int(time.time())
    base = catalog.model_id
    permits = tenant.permits if tenant is not None else (lambda name: True)
    experts = [record for record in catalog.registry.servable(base) if permits(record.name)]
    data = [_model(base, created, None, root=base)] if permits(None) else []
    if catalog.router is not None and (experts or permits(None)):
        data += [
            _model(name, created, None, root=base, routed=True)
            for name in catalog.config.routing.routed_names
        ]
    data += [_model(record.name, created, base, root=base, version=record.version) for record in experts]
    return {"object": "list", "data": data}


def model(catalog: ExpertCatalog, model_id: str, tenant: Tenant | None = None) -> dict[str, Any]:
    """One model object, as `GET /v1/models` lists it (for `tenant`).

    Raises:
        ExpertNotFound: There is none by that id (or the tenant may not use it: the same answer).
    """
    found = next((m for m in models(catalog, tenant)["data"] if m["id"] == model_id), None)
    if found is None:
        raise ExpertNotFound(
            f"model {model_id!r} does not exist; GET /v1/models lists the base model and the servable experts"
        )
    return found


def experts(catalog: ExpertCatalog, tenant: Tenant | None = None) -> dict[str, Any]:
    """`GET /v1/experts`: every registered expert, the scan's problems and shadowing warnings; for a tenant
    limited to some experts, only those, and no problems or warnings (they name other experts and paths)."""
    ctx = RuntimeContext.detect()
    scoped = tenant is not None and "*" not in tenant.experts
    records = [r for r in catalog.registry if tenant is None or tenant.permits(r.name)]
    return {
        "object": "list",
        "data": [expert_info(catalog, record, ctx) for record in records],
        "problems": [] if scoped else catalog.registry.problems,
        "warnings": [] if scoped else catalog.registry.shadowing(),
    }


def expert_info(catalog: ExpertCatalog, record: ExpertRecord, ctx: RuntimeContext) -> dict[str, Any]:
    """One entry of `GET /v1/experts`."""
    base = catalog.model_id
    reason = record.unservable_reason(base)
    adapter = record.adapter_for(base)
    defaults = resolve(
        {}, record.decoding, catalog.defaults, ignore_manifest=catalog.config.ignore_manifest_decoding
    )
    hints = [
        {"field": s.path, "value": s.value, "status": s.status, "detail": s.detail}
        for s in field_statuses(record.manifest, ctx)
        if s.path.startswith("runtime.")
    ]
    return {
        "name": record.name,
        "version": record.version,
        "versions": catalog.registry.versions(record.name),
        "servable": reason is None,
        "reason": reason,
        "adapter": {"type": adapter[0].effective_type, "r": adapter[0].r, "path": str(adapter[1])}
        if adapter
        else None,
        "soft_prompts": [{"name": sp.name, "tokens": sp.tokens} for sp, _ in record.soft_prompts],
        "decoding": {k: {"value": v.value, "source": v.source} for k, v in defaults.items()},
        "source": record.source,
        "signer": (record.provenance or {}).get("signer"),
        "tools": [t.name for t in record.decoding.tools or []],
        "tool_choice": record.decoding.tool_choice,
        "hints": hints,
    }
