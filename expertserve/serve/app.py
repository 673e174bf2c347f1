"""App builders: `serve run expertserve.serve.app:build_app config=FILE`, `build_app({...})` from code, and
`build_app_from_config(config, engine_cls=...)`, the one place the production app is wired."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertserve.engine.config import EngineSettings
from expertserve.serve.config import ServeConfig
from expertserve.serve.control.shape import start_shape

# Requests the ingress admits beyond what the engines can run or queue (see build_app_from_config).
INGRESS_HEADROOM = 1024


def resolve_settings(config: ServeConfig) -> tuple[EngineSettings, list[str]]:
    """The engine settings (model dir, LoRA rank from the registry, prefix caching) and the expert roots."""
    from expertserve.models import offline
    from expertserve.packaging.store import is_store, local_roots
    from expertserve.packaging.trust import TrustPolicy
    from expertserve.registry import Registry
    from expertserve.serve.expert_checks import trust_problems
    from expertserve.settings import default_expert_roots, install_dir

    model_dir = Path(config.model_dir).resolve() if config.model_dir else offline.prepared_model_dir()
    dirs = config.experts_dirs if config.experts_dirs is not None else default_expert_roots()
    roots = [str(d) if is_store(str(d)) else str(Path(d).resolve()) for d in dirs]
    # Only experts this server would serve size its engines: an untrusted package must not (security.md).
    policy = TrustPolicy(frozenset(config.trusted_keys), config.allow_untrusted)
    registry = Registry.scan(
        local_roots(roots)[0], check=lambda record: trust_problems(record, policy, install_dir())
    )
    shape = start_shape(registry, config.model_id, config.engine)
    settings = EngineSettings(
        model_dir=str(model_dir),
        max_lora_rank=shape.max_lora_rank,
        prefix_caching=shape.prefix_caching,
        engine=config.engine,
    )
    return settings, roots


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve application: ingress -> engine. `args` is a ServeConfig dict, or {"config": FILE} (with more keys
    over it); `EXPERTSERVE_*` environment variables apply between the file and the args (`ServeConfig.load`)."""
    args = dict(args or {})
    config = ServeConfig.load(args.pop("config", None), overrides=args)
    return build_app_from_config(config)


def build_app_from_config(
    config: ServeConfig, *, engine_cls: type | None = None, embedder_cls: type | None = None
) -> Any:
    """The Serve application for `config`.

    Args:
        config: The server config.
        engine_cls: The `ExpertEngine` each engine replica runs (default: vLLM).
        embedder_cls: The router's embedder (default: the offline MiniLM).
    """
    from ray import serve

    from expertserve.serve.health import ENGINE_DEPLOYMENT
    from expertserve.serve.ingress import Ingress, app
    from expertserve.serve.replica import EngineReplica

    settings, roots = resolve_settings(config)
    rep = config.replicas
    scaling: dict[str, Any] = (
        {
            "autoscaling_config": {
                "min_replicas": rep.min_replicas,
                "max_replicas": rep.max_replicas,
                "target_ongoing_requests": rep.target_ongoing_requests,
                "upscale_delay_s": rep.upscale_delay_s,
                "downscale_delay_s": rep.downscale_delay_s,
            }
        }
        if rep.autoscaling
        else {"num_replicas": rep.num_replicas}
    )
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        max_ongoing_requests=rep.max_ongoing_requests,
        max_queued_requests=rep.max_queued_requests,
        health_check_period_s=10,
        ray_actor_options={"num_cpus": rep.num_cpus, "num_gpus": rep.num_gpus},
        **scaling,
    ).bind(settings, engine_cls=engine_cls)
    ingress_cls = serve.ingress(app)(Ingress)
    # The ingress only parses, routes and streams: it must admit everything the engines can run or queue, so that
    # the engines' limits decide (and answer 503 beyond them). Serve's default (5 at a time) capped every batch at
    # 5 sequences: 0.67x vLLM's own server in `expertserve bench`. Beyond that, headroom: probes, /metrics and the
    # fast 503s past the engines' queues are answered at once instead of waiting in the proxy behind inference.
    engines = rep.max_replicas if rep.autoscaling else rep.num_replicas
    return serve.deployment(
        ingress_cls,
        name="Ingress",
        num_replicas=rep.ingress_replicas,
        max_ongoing_requests=engines * rep.max_ongoing_requests + rep.max_queued_requests + INGRESS_HEADROOM,
        ray_actor_options={"num_cpus": 0, "resources": dict(rep.ingress_resources)},
    ).bind(engine, config, roots, settings=settings, embedder_cls=embedder_cls)
