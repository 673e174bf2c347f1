"""Runs untrusted programs (model output under test) in a sandbox. Pure Python (no ray, vllm or torch).

What the sandbox gives a program: a scrubbed environment (PATH and a HOME inside its own directory, nothing of
the caller's: no keys, tokens or proxy settings), its own fresh temporary directory as working directory, a new
session (its whole process group is killed on timeout), and resource limits: CPU seconds, address space, size of
any file it writes, open files, no core dumps; no network (a network namespace of its own, made with `unshare`
in a user namespace: not even loopback, so no admin endpoint, Ray Jobs API or cloud metadata service is in
reach); and bounded output (stdout and stderr go to files under the file-size limit: a program that prints more
is killed, and the caller reads at most that much). Node programs also run under Node's permission model: they can
read their own directory only, write nothing, and start no processes or workers (so the expert's files, the
dataset with the expected answers and the user's files are out of reach).

Where user namespaces are not allowed (some container runtimes), programs are not run, with a clear error,
unless `EXPERTSERVE_SANDBOX_NETWORK=allow` accepts running them with the host's network.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits."""

    cpu_seconds: int = 10
    wall_seconds: float = 15.0
    memory_bytes: int = 2 * 2**30  # address space; V8 reserves much more than it uses, so not lower
    file_bytes: int = 1 * 2**20  # also the most stdout and stderr each may hold
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

    with (
        tempfile.TemporaryFile(prefix="sandbox-out-") as out,
        tempfile.TemporaryFile(prefix="sandbox-err-") as err,
    ):
        proc = subprocess.Popen(
            [*network_isolation(), *argv],
            cwd=workdir,
            env=scrubbed_env(workdir),
            stdin=subprocess.PIPE,
            stdout=out,  # regular files: RLIMIT_FSIZE bounds what the program can print
            stderr=err,
            preexec_fn=limit,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.communicate(stdin.encode(), timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        return Outcome(
            None if timed_out else proc.returncode,
            _read(out, limits.file_bytes),
            _read(err, limits.file_bytes),
            timed_out,
        )


def _read(file: Any, limit: int) -> str:
    file.seek(0)
    data: bytes = file.read(limit)
    return data.decode("utf-8", "replace")


NETWORK_ENV = "EXPERTSERVE_SANDBOX_NETWORK"


@cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that gives a program a network namespace of its own (no interfaces up).

    Raises:
        RuntimeError: User namespaces are not allowed here and `EXPERTSERVE_SANDBOX_NETWORK=allow` is not set.
    """
    unshare = shutil.which("unshare")
    prefix = (unshare, "--user", "--map-root-user", "--net", "--") if unshare else ()
    if prefix:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    if os.environ.get(NETWORK_ENV, "").strip().lower() == "allow":
        return ()
    raise RuntimeError(
        "cannot give sandboxed programs a network namespace of their own (`unshare --user --net` is not allowed "
        f"here); model output is not run with the host's network unless {NETWORK_ENV}=allow"
    )


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
