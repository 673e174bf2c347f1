"""The tenants an ingress replica serves: the server config's `tenants` and `api_keys`, and the tenants file, read
at start and again at every reload (control/plane.py), swapped as one object; a reload that finds a bad file keeps
the last good tenants and says why in its answer. Installs the key check the auth middleware applies."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from expertserve.serve.config import ServeConfig
from expertserve.serve.errors import RequestError
from expertserve.serve.http import auth
from expertserve.tenancy.config import DEFAULT_TENANT, Tenant, Tenants, TenantsError, build, read_file

logger = logging.getLogger("ray.serve")


def load(config: ServeConfig) -> Tenants:
    """The tenants of `config` and its tenants file.

    Raises:
        TenantsError: A bad file, a tenant in both the config and the file, a key in two tenants.
    """
    section: dict[str, Tenant] = dict(config.tenants)
    if config.tenants_file:
        from_file = read_file(config.tenants_file)
        both = sorted(set(section) & set(from_file))
        if both:
            raise TenantsError(
                config.tenants_file,
                [
                    f"tenants.{n}: also defined in the server config's tenants; define a tenant in one place"
                    for n in both
                ],
            )
        section.update(from_file)
    tenants = build(section, config.api_keys, config.admin_key, source=config.tenants_file or "tenants")
    if tenants.open and config.tenants_file and not config.allow_no_auth:
        # The file turned auth on at config time (ServeConfig.has_keys): an empty one must not open the server.
        raise TenantsError(
            config.tenants_file,
            [
                "no tenant has a key and api_keys is empty: inference would need no key; add a tenant with keys "
                "(or set allow_no_auth to serve every expert to anyone who reaches the port)"
            ],
        )
    return tenants


class TenantsSource:
    """The current tenants of this replica (`current`), installed in the auth middleware.

    Raises:
        TenantsError: At start, a bad tenants file (the replica must not serve without its tenants).
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.current = load(config)
        auth.install(auth.KeyCheck(self.current, config.admin_key))

    def reload(self) -> dict[str, Any]:
        """Reads the tenants again; the reload answer's `tenants` entry: whether they loaded, and why not."""
        try:
            fresh = load(self.config)
        except TenantsError as e:
            logger.warning("tenants: keeping the last good tenants: %s", e)
            return {
                "loaded": False,
                "problems": e.problems,
                "serving": self.current.digest(),
                "count": len(self.current.by_name),
            }
        digest = fresh.digest()
        changed = digest != self.current.digest()
        self.current = fresh
        auth.install(auth.KeyCheck(fresh, self.config.admin_key))
        if changed:
            logger.info(
                "tenants: now serving %d tenants (%s)", len(fresh.by_name), ", ".join(sorted(fresh.by_name))
            )
        return {"loaded": True, "changed": changed, "serving": digest, "count": len(fresh.by_name)}

    def caller(self, scope: Mapping[str, Any]) -> TenantCaller:
        """The tenant of a request, from what the auth middleware left in its ASGI `scope`.

        Raises:
            RequestError: 401 when the key's tenant is gone (a reload removed it after the key was checked).
        """
        caller = (scope.get("state") or {}).get("caller")
        name = caller.tenant if caller is not None and caller.tenant else DEFAULT_TENANT
        tenant = self.current.by_name.get(name)
        if tenant is None:
            if name == DEFAULT_TENANT and self.current.open:
                return TenantCaller(DEFAULT_TENANT, EVERYONE)
            raise RequestError(401, "missing or invalid API key ('Authorization: Bearer <key>')")
        return TenantCaller(name, tenant)


@dataclass(frozen=True)
class TenantCaller:
    """The tenant a request comes from, by name, with its scope and limits."""

    name: str
    tenant: Tenant


EVERYONE = Tenant(keys=["(no keys configured)"])  # every expert and the base model, no limits
