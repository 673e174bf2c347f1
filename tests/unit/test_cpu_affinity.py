"""keep_off_inference_cores with real processes: a child titled like vLLM's CPU worker and bound to core 0, and a
plain child. Runs in its own parent process so nothing of the test session is re-pinned."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, subprocess, sys, time
from expertserve.serve.cpu_affinity import keep_off_inference_cores
py = sys.executable
plain = subprocess.Popen([py, "-c", "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
                          "time.sleep(60)"])
time.sleep(0.5)
before = keep_off_inference_cores(os.getpid())  # no worker yet: nothing to do
worker = subprocess.Popen([py, "-c", "import os, setproctitle, time; os.sched_setaffinity(0, {0}); "
                          "setproctitle.setproctitle('VLLM::Worker'); time.sleep(60)"])
for _ in range(100):
    if open(f"/proc/{worker.pid}/cmdline").read().startswith("VLLM::Worker"):
        break
    time.sleep(0.05)
pinned = keep_off_inference_cores(os.getpid())
again = keep_off_inference_cores(os.getpid())  # already where it belongs
threads = {sorted(os.sched_getaffinity(int(t))) == sorted(os.sched_getaffinity(plain.pid))
           for t in os.listdir(f"/proc/{plain.pid}/task")}
out = {"before": before, "pinned": pinned, "again": again, "plain": sorted(os.sched_getaffinity(plain.pid)),
       "threads": len(os.listdir(f"/proc/{plain.pid}/task")), "same": threads == {True},
       "worker": sorted(os.sched_getaffinity(worker.pid))}
plain.kill(); worker.kill()
print(json.dumps(out))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores: one for the worker, one for the rest")
def test_stack_processes_leave_the_inference_cores_to_the_worker() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["before"] == 0
    assert out["pinned"] == 1 and out["again"] == 0
    assert out["worker"] == [0]
    assert out["plain"] == list(range(1, os.cpu_count() or 1))
    assert out["threads"] == 2 and out["same"]  # every thread moved, not only the main one
