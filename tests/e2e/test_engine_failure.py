"""Engine failure on the real server: the engine replica's process is killed (SIGKILL) under load. No 500 reaches
a client, requests not yet started are served after the restart, /healthz reports the outage; then the server
itself is killed (SIGKILL) and none of the processes it started outlives it.

It runs on the e2e modules' shared server, after every other test (tests/e2e/conftest.py orders it last): it is the
one test that ends that server, so no other test pays for a server of its own."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.server
BODY = {
    "model": "expert-beta",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 48,
    "ignore_eos": True,
    "temperature": 0,
}


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _post(url: str) -> tuple[int, float, Any]:
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=180)
        return r.status_code, time.monotonic(), r.headers.get("retry-after")
    except httpx.HTTPError as e:
        return -1, time.monotonic(), type(e).__name__


def test_engine_replica_killed_under_load_then_the_server_killed(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    main = next(p for p in psutil.process_iter() if "serve" in _title(p) and f"--port {port}" in _title(p))
    replica = next(
        p
        for p in main.children(recursive=True)
        if "ServeReplica" in _title(p) and "ExpertEngine" in _title(p)
    )
    assert _post(server.url)[0] == 200

    health: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            try:
                health.append(httpx.get(f"{server.url}/healthz", timeout=5).status_code)
            except httpx.HTTPError:
                health.append(-1)
            time.sleep(0.2)

    with ThreadPoolExecutor(60) as pool:
        before = [pool.submit(_post, server.url) for _ in range(40)]
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(replica.pid, signal.SIGKILL)
        prober = threading.Thread(target=probe)
        prober.start()
        after = [pool.submit(_post, server.url) for _ in range(10)]
        results = [f.result() for f in before + after]
    stop.set()
    prober.join()
    statuses = [s for s, _, _ in results]
    # Recovery: the first request sent after the kill that was answered (it waited for the restarted replica).
    recovered = min(t for s, t, _ in results[40:] if s == 200) - killed_at
    lost = sum(s != 200 for s in statuses)
    print(
        f"\nengine replica killed under 40 requests: recovered (first request sent after the kill answered) "
        f"{recovered:.1f} s after the kill; {lost} of {len(statuses)} requests not served (503 + Retry-After: "
        f"in flight with output already produced); readiness 503 for {health.count(503)} probes"
    )
    assert all(s in (200, 503) for s in statuses), statuses
    assert all(r for s, _, r in results if s == 503), "every 503 carries Retry-After"
    assert [s for s, _, _ in results[40:]] == [200] * 10, (
        "requests sent after the kill waited and were served"
    )
    # Readiness reported the outage, and reports the recovery: Serve's view of the restarted replica can lag the
    # first requests it serves by a few seconds, so poll it (bounded) rather than read the last probe.
    deadline = time.monotonic() + 30
    while health[-1] != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        health.append(httpx.get(f"{server.url}/healthz", timeout=5).status_code)
    assert 503 in health and health[-1] == 200, health

    descendants = main.children(recursive=True)
    assert descendants
    os.kill(main.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in descendants):
        time.sleep(0.2)
    left = [(p.pid, _title(p)[:60]) for p in descendants if _alive(p)]
    assert not left, f"processes outlived the killed server: {left}"
