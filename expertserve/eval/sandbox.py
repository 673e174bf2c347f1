"""Runs untrusted programs (model output under test) in a sandbox. Pure Python (no ray, vllm or torch).

What the sandbox gives a program: a scrubbed environment (PATH and a HOME inside its own directory, nothing of
the caller's: no keys, tokens or proxy settings), its own fresh temporary directory as working directory, a new
session (its whole process group is killed on timeout), and resource limits: CPU seconds, address space, size of
any file it writes, open files, no core dumps. Node programs also run under Node's permission model: they can read
their own directory only, write nothing, and start no processes or workers (so the expert's files, the dataset
with the expected answers and the user's files are out of reach).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits."""

    cpu_seconds: int = 10
    wall_seconds: float = 15.0
    memory_bytes: int = 2 * 2**30  # address space; V8 reserves much more than it uses, so not lower
    file_bytes: int = 1 * 2**20
    open_files: int = 64


@dataclass(frozen=True)
class Outcome:
    """What a sandboxed program did (`timed_out`: killed at the wall-clock limit)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


def scrubbed_env(home: Path) -> dict[str, str]:
    """The whole environment a sandboxed program sees."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "NODE_OPTIONS": ""}


def run(
    argv: list[str], workdir: Path, *, stdin: str = "", limits: SandboxLimits = SandboxLimits()
) -> Outcome:
    """Runs `argv` in `workdir` with the scrubbed environment and the limits; never raises for the program's
    behaviour (a crash, a kill or a timeout is an Outcome)."""

    def limit() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    proc = subprocess.Popen(
        argv,
        cwd=workdir,
        env=scrubbed_env(workdir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=limits.wall_seconds)
        return Outcome(proc.returncode, out, err, False)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Outcome(None, out, err, True)


@cache
def node_permission_flag(node: str) -> str:
    """Node's permission-model flag: `--permission` (Node 22.13+/23.5+) or `--experimental-permission` (20-22).

    Raises:
        RuntimeError: This Node has neither (older than 20): model output would run unconfined, so it is not run.
    """
    for flag in ("--permission", "--experimental-permission"):
        probe = subprocess.run([node, flag, "-e", "0"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return flag
    raise RuntimeError(f"{node}: Node 20 or newer is needed to sandbox model output (its permission model)")


def node_argv(script: Path) -> list[str]:
    """The command that runs `script` under Node's permission model, reading only its own directory.

    Raises:
        RuntimeError: No Node, or one without a permission model.
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed (scripts/setup.sh needs Node.js for TypeScript scoring)")
    return [
        node,
        node_permission_flag(node),
        f"--allow-fs-read={script.parent}/",
        "--no-warnings",
        "--max-old-space-size=256",
        str(script),
    ]
