"""Tenants: who may call which expert, and how much. The `tenants:` section of the server config, or the same
section in the file `EXPERTSERVE_TENANTS_FILE` names (a Kubernetes Secret). Pure (no ray, vllm or torch).

A tenant is found by the key it presents: plain keys are hashed at load, so a running server and this module only
ever hold SHA-256 digests, and a key is looked up by the digest of what a client sent (a dict lookup on a digest
leaks nothing about the key). The server config's `api_keys` list is one tenant named `default` with every expert
and no limits. The admin key is never a tenant key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from expertserve.config_files import UnreadableFile, read_structured, validation_problems
from expertserve.errors import ExpertserveError
from expertserve.manifest.base import StrictModel

DEFAULT_TENANT = "default"
NAME = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
)  # a tenant name is a Prometheus label value and a log word
HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_TENANTS = 10_000
MAX_KEYS = 1_000  # per tenant
MAX_LIMIT = 10**12
# Values an empty or templated Secret leaves behind; never a key.
NOT_KEYS = {"null", "none", "nil", "undefined"}


class Limits(StrictModel):
    """What a tenant (or a tenant on one expert) may use; an unset limit is no limit."""

    requests_per_minute: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, description="Requests admitted in any 60-second window."
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        le=MAX_LIMIT,
        description="Prompt + completion tokens in any 60-second window (a request counts its prompt estimate and "
        "max_tokens x n at admission, corrected to what it used when it ends).",
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, description="Requests running at once."
    )

    def is_set(self) -> bool:
        """Whether any limit is set."""
        return any(
            v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent)
        )


class Tenant(StrictModel):
    """One tenant: its keys, the experts it may use, its limits and its share of the engines."""

    keys: list[str] = Field(
        default_factory=list, max_length=MAX_KEYS, description="Bearer keys of the tenant, in plain text."
    )
    key_sha256: list[str] = Field(
        default_factory=list,
        max_length=MAX_KEYS,
        description="SHA-256 digests (64 lowercase hex) of the tenant's keys, so a leaked config leaks no key.",
    )
    experts: list[str] = Field(
        default_factory=lambda: ["*"],
        description='Expert names or shell-style patterns (fnmatch, case-sensitive) the tenant may use; "*" = all.',
    )
    base_model: bool = Field(default=True, description="Whether the tenant may call the base model.")
    limits: Limits = Field(default_factory=Limits, description="The tenant's limits over all its requests.")
    expert_limits: dict[str, Limits] = Field(
        default_factory=dict,
        description="Limits of the tenant's requests to one expert (by exact name), on top of `limits`.",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="The tenant's share of the engines while they are saturated (weighted-fair admission).",
    )

    @field_validator("keys")
    @classmethod
    def _plain(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            if not key.strip() or key.strip().lower() in NOT_KEYS:
                raise ValueError(f"keys[{i}]: an empty or null key (an empty Secret value?)")
            if key != key.strip():
                raise ValueError(f"keys[{i}]: a key with spaces around it (a trailing newline from a file?)")
        return keys

    @field_validator("key_sha256")
    @classmethod
    def _hashes(cls, digests: list[str]) -> list[str]:
        for i, digest in enumerate(digests):
            if not HEX64.match(digest):
                raise ValueError(
                    f"key_sha256[{i}]: expected 64 lowercase hex characters (sha256sum of the key)"
                )
        return digests

    @field_validator("experts")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            if not pattern or len(pattern) > 200 or not pattern.isprintable():
                raise ValueError(
                    f"experts[{i}]: an expert name or pattern is printable text of 1-200 characters"
                )
        return patterns

    def digests(self) -> list[str]:
        """Every key of the tenant as a digest."""
        return [*(key_digest(k) for k in self.keys), *self.key_sha256]

    def permits(self, expert: str | None) -> bool:
        """Whether the tenant may use `expert` (None: the base model)."""
        if expert is None:
            return self.base_model
        return any(fnmatch.fnmatchcase(expert, p) for p in self.experts)


class TenantsSection(StrictModel):
    """The `tenants:` section alone: what a tenants file holds."""

    tenants: dict[str, Tenant] = Field(
        default_factory=dict, max_length=MAX_TENANTS, description="Tenants by name."
    )


def key_digest(key: str) -> str:
    """The SHA-256 hex digest of a key as a client sends it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class TenantsError(ExpertserveError):
    """A tenants section or file that does not validate: one line per problem, naming the tenant and field."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__("\n".join(f"{source}: {p}" for p in problems))
        self.source, self.problems = source, problems


@dataclass(frozen=True)
class Tenants:
    """The tenants a server serves, resolved: each key digest to its tenant.

    `open` is true when no key is configured at all (inference needs no key; every caller is the `default` tenant
    with every expert).
    """

    by_name: Mapping[str, Tenant]
    by_digest: Mapping[str, str]

    @property
    def open(self) -> bool:
        return not self.by_digest

    def find(self, token: bytes | None) -> str | None:
        """The tenant whose key `token` is, as the bytes a client sent (None: no such key)."""
        if self.open:
            return DEFAULT_TENANT
        if token is None:
            return None
        return self.by_digest.get(hashlib.sha256(token).hexdigest())

    def get(self, name: str) -> Tenant:
        return self.by_name[name]

    def digest(self) -> str:
        """Identifies this set of tenants (what a reload changed)."""
        body = json.dumps(
            {n: t.model_dump(mode="json", exclude={"keys"}) for n, t in sorted(self.by_name.items())},
            sort_keys=True,
        )
        keys = json.dumps(sorted(self.by_digest.items()))
        return hashlib.sha256((body + keys).encode()).hexdigest()[:16]


def build(
    section: Mapping[str, Tenant], api_keys: Iterable[str] = (), admin_key: str | None = None, *, source: str
) -> Tenants:
    """The resolved tenants: the section's, plus `api_keys` as the tenant `default` (every expert, no limits).

    Raises:
        TenantsError: A bad tenant name, a key in two tenants (or twice in one), an admin key used as a tenant key,
            `default` both in the section and from `api_keys`.
    """
    problems: list[str] = []
    tenants = dict(section)
    api_keys = list(api_keys)
    if api_keys:
        if DEFAULT_TENANT in tenants:
            problems.append(
                f"tenants.{DEFAULT_TENANT}: the name is taken by api_keys (they are the tenant '{DEFAULT_TENANT}'); "
                "rename the tenant or move the keys into it"
            )
        else:
            tenants[DEFAULT_TENANT] = Tenant(keys=api_keys)
    owner: dict[str, str] = {}
    admin = key_digest(admin_key) if admin_key else None
    for name, tenant in tenants.items():
        if not NAME.match(name):
            problems.append(
                f"tenants.{name[:64]}: a tenant name is 1-64 letters, digits, '_', '.' or '-', starting with a "
                "letter or digit (it is a metrics label)"
            )
        where = (
            "api_keys"
            if name == DEFAULT_TENANT and api_keys and DEFAULT_TENANT not in section
            else f"tenants.{name}"
        )
        if not tenant.digests():
            problems.append(f"{where}: no keys (keys or key_sha256): nobody could call as this tenant")
        for digest in tenant.digests():
            if digest == admin:
                problems.append(f"{where}: a key is the admin key; the admin key is never a tenant key")
            elif digest in owner:
                other = owner[digest]
                problems.append(
                    f"{where}: a key appears twice in this tenant"
                    if other == name
                    else f"{where}: a key is also a key of tenant '{other}'; a key belongs to one tenant"
                )
            else:
                owner[digest] = name
    if problems:
        raise TenantsError(source, problems)
    return Tenants(tenants, owner)


def section_problems(error: ValidationError) -> list[str]:
    """One line per problem, naming the tenant and field (`tenants.team-a.limits.requests_per_minute: ...`); values
    under `keys` are never shown."""
    return validation_problems(
        error, unknown="unknown field", secret=lambda loc: "keys" in (str(p) for p in loc), max_value_chars=64
    )


def parse_section(data: Any, *, source: str) -> dict[str, Tenant]:
    """The tenants of a `{"tenants": {...}}` mapping.

    Raises:
        TenantsError: Not such a mapping, or a tenant that does not validate.
    """
    if not isinstance(data, dict):
        raise TenantsError(source, [f"expected a mapping with a 'tenants' key, got {type(data).__name__}"])
    try:
        return dict(TenantsSection.model_validate(data).tenants)
    except ValidationError as e:
        raise TenantsError(source, section_problems(e)) from None


def read_file(path: str | Path) -> dict[str, Tenant]:
    """The tenants of a YAML or JSON tenants file (`tenants:` at the top).

    Raises:
        TenantsError: Unreadable, not YAML/JSON, or not valid (one line per problem).
    """
    path = Path(path)
    try:
        data = read_structured(path, what="tenants file")
    except UnreadableFile as e:
        raise TenantsError(str(path), [str(e)]) from None
    return parse_section(data, source=str(path))


def check_file(path: str | Path, *, api_keys: Iterable[str] = (), admin_key: str | None = None) -> Tenants:
    """A tenants file checked offline, as the server would load it (`expertserve tenants check FILE`).

    Raises:
        TenantsError: Every problem, one per line.
    """
    return build(read_file(path), api_keys, admin_key, source=str(path))
