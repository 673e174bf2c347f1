"""On CPU, keeps the serving stack's own processes off the cores vLLM binds its inference threads to, and behind
vLLM's scheduler on the cores they share with it.

vLLM's CPU worker pins its threads to some cores (`VLLM_CPU_OMP_THREADS_BIND=auto`) and leaves at least one for
its scheduler. Ray's processes (proxy, ingress, engine replica, GCS, raylet) otherwise float onto the worker's
cores and slow every forward pass: on 2 cores, moving them to the scheduler's core took `expertserve bench`'s
stack throughput from 0.90x to about 0.96x vLLM's own server (README, "Benchmarks").

On the scheduler's core, Ray's per-request work (about 50 ms of CPU per streamed request over three processes)
then competes with vLLM's scheduler, and every moment the scheduler waits for the core the worker waits for its
next step. A lower priority (a higher nice value) for Ray's processes lets the scheduler go first; they still get
the core whenever the scheduler polls (it yields while it waits for the worker). Base-model traffic on 2 cores,
one server, six alternating rounds: 135 tok/s with Ray at nice 10 against 124 at nice 0, TTFT p99 0.41 s against
0.69 s (README, "Benchmarks", round 10).
"""

from __future__ import annotations

import contextlib
import os

import psutil

WORKER_TITLE = "VLLM::Worker"


def keep_off_inference_cores(root_pid: int, niceness: int = 0) -> int:
    """Pins every descendant of `root_pid` that is not a vLLM process to the cores no vLLM worker is bound to, and
    gives them `niceness` more than `root_pid` has (vLLM's processes keep the root's: a vLLM engine started later
    by a reniced replica inherits its priority, and gets the root's back where the system allows it).

    Returns how many processes it changed; 0 when there is nothing to do (no bound worker, or no core left).
    Processes that vanish or refuse (another user's) are skipped: this is an optimisation, never an error.
    """
    try:
        root = psutil.Process(root_pid)
        descendants = root.children(recursive=True)
        everything = set(root.cpu_affinity())  # a container's cpuset may allow fewer than os.cpu_count()
        base_nice = root.nice()
    except psutil.Error:
        return 0
    inference: set[int] = set()
    others = []
    engines = []
    for proc in descendants:
        try:
            # vLLM retitles its processes (setproctitle): the title is the command line.
            name = " ".join(proc.cmdline()) or proc.name()
            if name.startswith(WORKER_TITLE):
                cores = set(proc.cpu_affinity())
                if cores != everything:
                    inference |= cores
            if name.startswith("VLLM::"):
                engines.append(proc)
            else:
                others.append(proc)
        except psutil.Error:
            continue
    free = everything - inference
    if not inference or not free:
        return 0
    nice = min(19, base_nice + niceness)
    for proc in engines:
        _set_threads(proc.pid, None, base_nice)
    return sum(_set_threads(proc.pid, free, nice) for proc in others)


def _set_threads(pid: int, cores: set[int] | None, nice: int) -> bool:
    """Pins every thread of `pid` to `cores` (unless None) and gives it `nice` (affinity and priority are per
    thread: Ray's processes run gRPC and event-loop threads); True when any thread changed."""
    changed = False
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return False
    for tid in tids:
        # OSError: the thread ended, or is not ours, or lowering a nice value needs a privilege we lack.
        with contextlib.suppress(OSError):
            if cores is not None and os.sched_getaffinity(tid) != cores:
                os.sched_setaffinity(tid, cores)
                changed = True
            if os.getpriority(os.PRIO_PROCESS, tid) != nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed = True
    return changed
