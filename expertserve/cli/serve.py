"""`expertserve serve [--config FILE] [--host H] [--port P]`: deploys the app and serves until stopped."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from expertserve.cli.common import EXIT_OK, UsageError


def run(args: Any) -> int:
    """Starts (or joins) Ray, deploys the app on Serve's HTTP proxy, and blocks until SIGINT/SIGTERM."""
    config = _config(args)
    import ray
    from ray import serve

    from expertserve.serve.app import build_app_from_config

    started_ray, dashboard = _start_ray(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app_from_config(config), name="expertserve", route_prefix="/", blocking=False)
    isolate = started_ray and config.engine.isolate_inference_cores
    if isolate:
        from expertserve.serve.cpu_affinity import keep_off_inference_cores

        keep_off_inference_cores(os.getpid())
    _announce(config, dashboard)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if isolate:
        # Ray starts processes later too (workers, replicas after a restart): look again now and then.
        while not stop.wait(5):
            keep_off_inference_cores(os.getpid())
    stop.wait()
    print("stopping...", flush=True)
    serve.shutdown()
    if started_ray:
        ray.shutdown()
    return EXIT_OK


def _config(args: Any) -> Any:
    """The server config: the file, EXPERTSERVE_* variables, then the command line (a ConfigError is one line per
    problem, exit 1)."""
    from expertserve.serve.config import ServeConfig

    if args.config and not Path(args.config).is_file():
        raise UsageError(f"{args.config}: config file not found")
    overrides: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.ignore_manifest_decoding:
        overrides["ignore_manifest_decoding"] = True
    config = ServeConfig.load(args.config, overrides=overrides)
    from expertserve.serve.tenants import load

    load(config)  # a bad tenants file stops here (exit 1, one line per problem), not in a replica
    return config


def _start_ray(config: Any) -> tuple[bool, str | None]:
    """Joins RAY_ADDRESS's cluster, or starts a local one; (whether this process started Ray, dashboard URL)."""
    import ray

    if ray.is_initialized():
        return False, None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False, None
    from expertserve.serve.http.proxy_guard import proxy_env
    from expertserve.serve.transport import ray_env

    # Before Ray starts: its processes read Serve's data-plane switch and the proxy's guard from the environment
    # they inherit.
    os.environ.update(ray_env(config.grpc_data_plane))
    os.environ.update(proxy_env(config.max_body_bytes, config.header_timeout_s))
    context = ray.init(
        address="local",
        include_dashboard=config.ray_dashboard,
        dashboard_host="127.0.0.1",
        object_store_memory=100 * 2**20,
    )
    return True, context.dashboard_url if config.ray_dashboard else None


def _announce(config: Any, dashboard: str | None) -> None:
    from expertserve.engine.hardware import choose_dtype

    url = f"http://{config.host}:{config.port}"
    print(f"expertserve is serving {config.model_id} and its experts at {url}/v1", flush=True)
    dtype, why = choose_dtype(config.engine.dtype)
    print(f"  engine dtype {dtype}: {why}", flush=True)
    print(f"  curl {url}/v1/models", flush=True)
    if dashboard:
        print(f"  Ray dashboard: http://{dashboard}", flush=True)
