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
    from expertserve.serve.config import ServeConfig

    if args.config and not Path(args.config).is_file():
        raise UsageError(f"{args.config}: config file not found")
    try:
        config = ServeConfig.from_file(args.config) if args.config else ServeConfig()
    except ValueError as e:
        raise UsageError(f"{args.config}: {e}") from None
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.ignore_manifest_decoding:
        overrides["ignore_manifest_decoding"] = True
    config = ServeConfig.model_validate({**config.model_dump(), **overrides})

    import ray
    from ray import serve

    from expertserve.serve.app import build_app

    started_ray = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", include_dashboard=False, object_store_memory=100 * 2**20)
            started_ray = True
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config.model_dump()), name="expertserve", route_prefix="/", blocking=False)
    isolate = started_ray and config.engine.isolate_inference_cores
    if isolate:
        from expertserve.serve.cpu_affinity import keep_off_inference_cores

        keep_off_inference_cores(os.getpid())
    url = f"http://{config.host}:{config.port}"
    print(f"expertserve is serving {config.model_id} and its experts at {url}/v1", flush=True)
    print(f"  curl {url}/v1/models", flush=True)

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
