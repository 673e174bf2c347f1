"""On CPU, keeps the serving stack's own processes off the cores vLLM binds its inference threads to.

vLLM's CPU worker pins its threads to some cores (`VLLM_CPU_OMP_THREADS_BIND=auto`) and leaves at least one for
its scheduler. Ray's processes (proxy, ingress, engine replica, GCS, raylet) otherwise float onto the worker's
cores and slow every forward pass: on 2 cores, moving them to the scheduler's core took `expertserve bench`'s
stack throughput from 0.90x to about 0.96x vLLM's own server (docs/benchmarks-history.md).
"""

from __future__ import annotations

import os

import psutil

WORKER_TITLE = "VLLM::Worker"


def keep_off_inference_cores(root_pid: int) -> int:
    """Pins every descendant of `root_pid` that is not a vLLM process to the cores no vLLM worker is bound to.

    Returns how many processes it pinned; 0 when there is nothing to do (no bound worker, or no core left).
    Processes that vanish or refuse (another user's) are skipped: this is an optimisation, never an error.
    """
    try:
        root = psutil.Process(root_pid)
        descendants = root.children(recursive=True)
        everything = set(root.cpu_affinity())  # a container's cpuset may allow fewer than os.cpu_count()
    except psutil.Error:
        return 0
    inference: set[int] = set()
    others = []
    for proc in descendants:
        try:
            # vLLM retitles its processes (setproctitle): the title is the command line.
            name = " ".join(proc.cmdline()) or proc.name()
            if name.startswith(WORKER_TITLE):
                cores = set(proc.cpu_affinity())
                if cores != everything:
                    inference |= cores
            elif not name.startswith("VLLM::"):
                others.append(proc)
        except psutil.Error:
            continue
    free = everything - inference
    if not inference or not free:
        return 0
    return sum(_pin_threads(proc.pid, free) for proc in others)


def _pin_threads(pid: int, cores: set[int]) -> bool:
    """Pins every thread of `pid` (affinity is per thread: Ray's processes run gRPC and event-loop threads);
    True when any thread moved."""
    moved = False
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return False
    for tid in tids:
        try:
            if os.sched_getaffinity(tid) != cores:
                os.sched_setaffinity(tid, cores)
                moved = True
        except OSError:  # the thread ended, or is not ours
            continue
    return moved
