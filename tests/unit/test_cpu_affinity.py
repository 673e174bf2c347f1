"""keep_off_inference_cores with real processes: a child titled like vLLM's CPU worker and bound to core 0, one
titled like vLLM's scheduler started at a lower priority (as when a reniced replica starts an engine), and a plain
child. Runs in its own parent process so nothing of the test session is re-pinned or reniced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, subprocess, sys, threading, time
from expertserve.serve.cpu_affinity import keep_off_inference_cores
py = sys.executable
plain = subprocess.Popen([py, "-c", "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
                          "time.sleep(60)"])
core = subprocess.Popen([py, "-c", "import os, setproctitle, time; os.nice(10); "
                         "setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(60)"])
time.sleep(0.5)
before = keep_off_inference_cores(os.getpid(), 10)  # no worker yet: nothing to do
worker = subprocess.Popen([py, "-c", "import os, setproctitle, time; os.sched_setaffinity(0, {0}); "
                          "setproctitle.setproctitle('VLLM::Worker'); time.sleep(60)"])
for proc, title in ((worker, "VLLM::Worker"), (core, "VLLM::EngineCore")):
    for _ in range(100):
        if open(f"/proc/{proc.pid}/cmdline").read().startswith(title):
            break
        time.sleep(0.05)
can_lower = []  # whether this user may lower a nice value (root, CAP_SYS_NICE): tried on a thread of our own
def probe():
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, 1)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 0)
        can_lower.append(True)
    except OSError:
        can_lower.append(False)
t = threading.Thread(target=probe); t.start(); t.join()
pinned = keep_off_inference_cores(os.getpid(), 10)
again = keep_off_inference_cores(os.getpid(), 10)  # already where it belongs
nices = {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{plain.pid}/task")}
threads = {sorted(os.sched_getaffinity(int(t))) == sorted(os.sched_getaffinity(plain.pid))
           for t in os.listdir(f"/proc/{plain.pid}/task")}
out = {"before": before, "pinned": pinned, "again": again, "plain": sorted(os.sched_getaffinity(plain.pid)),
       "threads": len(os.listdir(f"/proc/{plain.pid}/task")), "same": threads == {True},
       "worker": sorted(os.sched_getaffinity(worker.pid)), "nices": sorted(nices),
       "worker_nice": os.getpriority(os.PRIO_PROCESS, worker.pid), "core_nice": os.getpriority(os.PRIO_PROCESS, core.pid),
       "can_lower": can_lower[0], "own_nice": os.getpriority(os.PRIO_PROCESS, 0)}
plain.kill(); worker.kill(); core.kill()
print(json.dumps(out))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores: one for the worker, one for the rest")
def test_stack_processes_leave_the_inference_cores_to_the_worker_and_yield_to_the_scheduler() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["before"] == 0
    assert out["pinned"] == 1 and out["again"] == 0
    assert out["worker"] == [0]
    assert out["plain"] == list(range(1, os.cpu_count() or 1))
    assert out["threads"] == 2 and out["same"]  # every thread moved, not only the main one
    own = out["own_nice"]
    assert out["nices"] == [min(19, own + 10)]  # every thread, behind vLLM's processes
    assert out["worker_nice"] == own
    # The scheduler started at +10 gets the root's priority back where this user may lower a nice value.
    assert out["core_nice"] == (own if out["can_lower"] else min(19, own + 10))
