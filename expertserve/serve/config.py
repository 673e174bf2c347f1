"""What users write to configure the server (`expertserve serve --config FILE`, `serve run` args). Pure Python.

Precedence for process settings, written once (`ServeConfig.load`): command line > environment > config file >
the defaults below. Every setting can come from the environment: `EXPERTSERVE_<FIELD>` for a top-level field,
`EXPERTSERVE_<SECTION>__<FIELD>` inside a section (`EXPERTSERVE_ENGINE__DTYPE=float32`); values are JSON where they
parse as JSON, text otherwise, and list settings also take comma-separated text (`EXPERTSERVE_API_KEYS=k1,k2`),
so keys can come from a Kubernetes Secret instead of the config file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from expertserve.config_files import UnreadableFile, read_structured, validation_problems
from expertserve.engine.config import EngineConfig
from expertserve.errors import ExpertserveError
from expertserve.manifest.base import StrictModel
from expertserve.settings import DEFAULT_MODEL_ID
from expertserve.tenancy.config import NOT_KEYS, Tenant


class ReplicaConfig(StrictModel):
    """Replicas and autoscaling of the engine deployment."""

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (when autoscaling is off).")
    autoscaling: bool = Field(default=False, description="Scale between min_replicas and max_replicas.")
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(default=2, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        default=8,
        gt=0,
        description="Autoscaling signal: requests running or queued per engine replica that Serve aims for.",
    )
    upscale_delay_s: float = Field(
        default=10, ge=0, description="Autoscaling: how long the signal must stay above target before adding."
    )
    downscale_delay_s: float = Field(
        default=120, ge=0, description="Autoscaling: how long it must stay below target before removing."
    )
    max_ongoing_requests: int = Field(default=64, ge=1, description="Requests a replica runs at once.")
    max_queued_requests: int = Field(
        default=128, ge=1, description="Queued requests before 503 + Retry-After."
    )
    ingress_replicas: int = Field(
        default=1,
        ge=1,
        description="Ingress (HTTP, routing) replicas; they agree on the experts through one state actor.",
    )
    ingress_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Custom Ray resources each ingress replica asks for (e.g. {head_node: 0.01}), to keep the "
        "ingress on the nodes that run Serve's HTTP proxy: the proxy answers 500 for requests in flight on an ingress "
        "replica whose node dies, while requests on a dead engine replica are re-sent by the ingress.",
    )
    expert_min_replicas: dict[str, Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=dict,
        description="Per expert name, the engine replicas that keep it loaded (over the manifest's "
        "runtime.min_replicas; default 1: loaded where its requests go).",
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


class FairnessConfig(StrictModel):
    """Weighted-fair admission: beyond `max_in_flight` requests at once, requests wait in per-tenant queues and
    are admitted by the tenants' weights (tenancy/fair.py)."""

    enabled: bool = Field(default=True, description="Queue by tenant beyond max_in_flight (off: first come).")
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Requests each ingress replica lets run at once before queueing fairly; default: the engines' "
        "batch (engine replicas x the smaller of engine.max_num_seqs and replicas.max_ongoing_requests), divided "
        "among the ingress replicas. Beyond it, as many may wait as the engines would have queued; then 503.",
    )


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
        description="Expert roots, searched in order: directories, or URIs of shared stores of .expert packages "
        "(s3://, gs://, abfs://, hdfs://, file://) that every node mirrors and verifies; default: the repository's "
        "experts/ and the install directory.",
    )
    decoding_defaults: str | None = Field(default=None, description="JSON file of server decoding defaults.")
    ignore_manifest_decoding: bool = Field(
        default=False, description="Ignore manifest decoding (request > server defaults), for comparisons."
    )
    host: str = Field(default="127.0.0.1", description="HTTP host of Ray Serve's proxy.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        description="Largest request body (413 above; refused while it streams, in Serve's proxy and the ingress).",
    )
    header_timeout_s: float = Field(
        default=10,
        gt=0,
        description="Deadline for a request's headers in Serve's proxy; a connection that misses it is closed.",
    )
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys for inference; empty: no auth."
    )
    admin_key: str | None = Field(
        default=None, description="Bearer key for /admin endpoints; unset: loopback only."
    )
    tenants: dict[str, Tenant] = Field(
        default_factory=dict,
        description="Tenants by name: their keys, the experts they may use, their limits and weights "
        "(docs/tenancy.md). `api_keys` are one more tenant, `default`, with every expert.",
    )
    tenants_file: str | None = Field(
        default=None,
        description="A YAML or JSON file with a `tenants:` section (a Kubernetes Secret), added to `tenants` and "
        "read again at every reload (a bad file keeps the last good one); EXPERTSERVE_TENANTS_FILE.",
    )
    fairness: FairnessConfig = Field(
        default_factory=lambda: FairnessConfig(), description="Weighted-fair admission by tenant."
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Trusted package signers (64-hex Ed25519 public keys or .pub files); with "
        "EXPERTSERVE_TRUSTED_KEYS. An expert installed from a package none of them signed is not served.",
    )
    allow_untrusted: bool = Field(
        default=False,
        description="Serve experts installed from unsigned or untrusted packages anyway (reported in /v1/experts).",
    )
    allow_no_auth: bool = Field(
        default=False,
        description="Listen beyond loopback with no api_keys (anyone who reaches the port may call every expert); "
        "without it such a config is refused.",
    )
    ray_dashboard: bool = Field(
        default=True,
        description="Ray's dashboard on loopback (the URL is printed) when `expertserve serve` starts Ray itself.",
    )
    grpc_data_plane: bool = Field(
        default=True,
        description="Requests and streamed chunks travel between Serve's proxy and the ingress and between the "
        "ingress and the engine replicas over Ray Serve's direct gRPC channels instead of Ray actor calls: about "
        "half the CPU per request in those processes, on the cores the engine's scheduler needs (docs/benchmarks.md, "
        "round 11). The ingress's calls follow this setting wherever Ray runs; the proxy follows "
        "RAY_SERVE_USE_GRPC_BY_DEFAULT in the environment of Ray's nodes, which `expertserve serve` sets when it "
        "starts Ray itself and the Kubernetes manifests set on every pod.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig, description="Replicas and autoscaling.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Routing of `model: auto`.")

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            if not key.strip() or key.strip().lower() in NOT_KEYS:
                raise ValueError(
                    f"api_keys[{i}]: an empty or null key (an empty Secret value?); unset api_keys to turn auth off"
                )
        return keys

    @field_validator("admin_key")
    @classmethod
    def _admin_key(cls, key: str | None) -> str | None:
        if key is not None and (not key.strip() or key.strip().lower() in NOT_KEYS):
            raise ValueError(
                "an empty or null key (an empty Secret value?); unset admin_key for loopback-only admin"
            )
        return key

    @model_validator(mode="after")
    def _tenant_keys(self) -> ServeConfig:
        from expertserve.tenancy.config import TenantsError, build

        try:
            build(self.tenants, self.api_keys, self.admin_key, source="tenants")
        except TenantsError as e:
            raise ValueError("; ".join(e.problems)) from None
        return self

    def has_keys(self) -> bool:
        """Whether inference needs a key (api_keys, tenants, or a tenants file)."""
        return bool(self.api_keys or self.tenants or self.tenants_file)

    @model_validator(mode="after")
    def _auth_beyond_loopback(self) -> ServeConfig:
        if not self.has_keys() and not self.allow_no_auth and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host} listens beyond loopback with no api_keys: set api_keys (EXPERTSERVE_API_KEYS), "
                "or allow_no_auth: true to serve every expert to anyone who reaches the port"
            )
        return self

    @field_validator("experts_dirs")
    @classmethod
    def _stores(cls, roots: list[str] | None) -> list[str] | None:
        from expertserve.packaging.store import StoreError, check_uri, is_store

        try:
            return None if roots is None else [check_uri(r) if is_store(r) else r for r in roots]
        except StoreError as e:
            raise ValueError(str(e)) from None

    @field_validator("trusted_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        from expertserve.errors import SignatureError
        from expertserve.packaging.signing import read_public_key

        try:
            return [read_public_key(k) for k in keys]
        except SignatureError as e:
            raise ValueError(str(e)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> ServeConfig:
        """Loads YAML or JSON (no environment; see `load`).

        Raises:
            ConfigError: Unreadable file, or a config that does not validate (one line per problem).
        """
        return cls.load(path, environ={})

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ServeConfig:
        """The config: `overrides` (the command line) > `environ` (default: the process's) > the file > defaults.

        Raises:
            ConfigError: An unreadable file, or values that do not validate: one line per problem, naming the key
                and where it came from.
        """
        data = _read(Path(path)) if path is not None else {}
        env = env_values(os.environ if environ is None else environ)
        merged = _deep_merge(_deep_merge(data, env), dict(overrides or {}))
        try:
            return cls.model_validate(merged)
        except ValidationError as e:
            sources = f"{path}" if path else "the server config"
            if env:
                sources += " and EXPERTSERVE_* environment variables"
            raise ConfigError(sources, config_problems(e)) from None


class ConfigError(ExpertserveError):
    """A server or training config that cannot be read or does not validate."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__("\n".join(f"{source}: {p}" for p in problems))
        self.source, self.problems = source, problems


def config_problems(error: ValidationError) -> list[str]:
    """One line per problem: `engine.dtype: input should be 'auto', ... (got 'fp8')`; keys are never shown."""
    return validation_problems(
        error, unknown="unknown setting", secret=lambda loc: bool(loc) and str(loc[0]) in SECRET_SETTINGS
    )


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


ENV_PREFIX = "EXPERTSERVE_"
# Never echoed in messages or logs.
SECRET_SETTINGS = {"api_keys", "admin_key", "tenants"}


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """The server settings given as `EXPERTSERVE_*` environment variables, as a nested dict. Only variables whose
    first part names a server setting count (`EXPERTSERVE_CLUSTER_DIR`, `EXPERTSERVE_HOME` ... belong to other
    tools); inside a section every key is checked like the file's."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in ServeConfig.model_fields:
            continue
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = _env_value(path[-1], raw)
    return out


def _env_value(key: str, raw: str) -> Any:
    if key == "admin_key":  # a key is text: `null` from an empty Secret template must not mean "no key"
        return raw
    if key == "api_keys" and not raw.strip():
        return [""]  # refused by the model: an empty Secret value must not turn auth off
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if key in _LIST_SETTINGS and isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        return items or ([""] if key == "api_keys" else items)
    return value


_LIST_SETTINGS = {"api_keys", "experts_dirs", "routed_names", "trusted_keys"}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = read_structured(path, what="config file")
    except UnreadableFile as e:
        raise ConfigError(str(path), [str(e)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"expected a mapping of settings, got {type(data).__name__}"])
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out
