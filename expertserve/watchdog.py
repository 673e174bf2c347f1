"""No orphans: a small process that outlives a command only to end what the command started.

vLLM's engine-core and worker processes and a local Ray cluster's processes (GCS, raylet, workers, replicas) are
descendants of the command that started them. If the command is killed (SIGKILL, an OOM kill, a CI time-out) they
are re-parented and run on: once an `expertserve eval` left its engine at full CPU for 44 minutes. The watchdog
notes the command's descendants every `POLL_S` seconds; when the command is gone it sends them SIGTERM, and
SIGKILL to any still alive `GRACE_S` seconds later.

`python -m expertserve.watchdog PID` runs it; `start(pid)` spawns it, detached, for the current process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 3.0
ENV = "EXPERTSERVE_WATCHDOG"


def start(pid: int | None = None) -> subprocess.Popen[bytes] | None:
    """Spawns the watchdog for `pid` (default: this process), once per process tree; None when already watched."""
    pid = pid or os.getpid()
    if os.environ.get(ENV):  # a child of a watched command: the first watchdog sees it already
        return None
    os.environ[ENV] = str(pid)
    return subprocess.Popen(
        [sys.executable, "-m", "expertserve.watchdog", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the command's process group: a Ctrl-C or killpg there spares it
        close_fds=True,
    )


def watch(pid: int) -> int:
    """Waits for `pid` to end, then ends every descendant it had; returns how many were ended."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, psutil.Process] = {}
    while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in parent.children(recursive=True):
                if child.pid != os.getpid():  # the watchdog is a child of the command too
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    alive = [p for p in seen.values() if _alive(p)]
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, still = psutil.wait_procs(alive, timeout=GRACE_S)
    for process in still:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return len(alive)


def _alive(process: object) -> bool:
    import psutil

    try:
        # `is_running` also checks the start time, so a recycled pid is never taken for the process seen.
        return bool(process.is_running()) and process.status() != psutil.STATUS_ZOMBIE  # type: ignore[attr-defined]
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    watch(int(sys.argv[1]))
