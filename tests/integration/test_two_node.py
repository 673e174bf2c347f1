"""A local two-node cluster (cluster/local-cluster.sh): `ray job submit` trains with one worker on each node,
`serve deploy configs/serve.yaml` serves the app over HTTP, and every process the test started is stopped."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from expertserve.bench.servers import free_port
from tests.helpers import REPO, make_expert, manifest

pytestmark = pytest.mark.slow
TINY_ID = "tiny-test-model"


def run(cmd: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_node_cluster_trains_across_nodes_and_serves(tmp_path: Path) -> None:
    """Runs while another process holds Ray's default dashboard-agent port, as any other Ray on the machine does
    (in CI, the Ray of earlier tests): the cluster must choose its own ports. With the default port taken, the
    head's agent used to fail to start and the head refused every job."""
    with socket.socket() as holder:
        with contextlib.suppress(OSError):  # already taken by someone else: the same condition
            holder.bind(("0.0.0.0", 52365))
            holder.listen()
        _scenario(tmp_path)


def _scenario(tmp_path: Path) -> None:
    from expertserve.models.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "tiny")
    data = manifest()
    data["base_models"][0]["name"] = TINY_ID
    data["training"]["config"].update(max_steps=2, save_steps=2, batch_size=2)
    data["training"]["decoding"].pop("grammar_file")
    expert = make_expert(tmp_path / "expert-demo", data)
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(8)
    ]
    (expert / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    bin_dir = str(Path(sys.executable).parent)
    # Short: Ray's Unix sockets live under it and their paths may not exceed 107 bytes.
    cluster_dir = Path(tempfile.mkdtemp(prefix="es2n-", dir="/tmp"))
    env = {
        **os.environ,
        "EXPERTSERVE_CLUSTER_DIR": str(cluster_dir),
        "RAY": f"{bin_dir}/ray",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    # The script bounds its own waits (2 x 120 s per `ray start`, 150 s for readiness) and prints the cluster's
    # logs when it gives up, so this timeout only catches a hang of the script itself.
    started = run(["bash", "cluster/local-cluster.sh", "start", "1", "2"], env, timeout=480)
    assert started.returncode == 0, started.stdout + started.stderr
    dashboard = (cluster_dir / "dashboard").read_text().strip()
    try:
        out, storage = tmp_path / "out", tmp_path / "runs"
        submit = [
            "ray",
            "job",
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "expertserve.train",
            str(expert),
            "--workers",
            "2",
            "--cpus-per-worker",
            "1",
            "--placement-strategy",
            "STRICT_SPREAD",
            "--base-model",
            str(base),
            "--base-model-id",
            TINY_ID,
            "--output",
            str(out),
            "--storage",
            str(storage),
        ]
        for _ in range(
            3
        ):  # the head can refuse a submission for a moment ("No available agent"); retry that only
            job = run(submit, env)
            if job.returncode == 0 or "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        nodes = {
            json.loads(p.read_text())["node_id"] for p in (storage / "expert-demo" / "workers").glob("*.json")
        }
        assert len(nodes) == 2, "the two workers should run on different nodes"
        assert (out / "expert-demo-0.1.0.expert").is_file()

        # configs/serve.yaml as shipped, on a free port (a previous run's proxy may still hold 8000).
        serve_config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
        port = free_port()
        serve_config["http_options"]["port"] = port
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config))
        deploy = run(
            ["serve", "deploy", str(tmp_path / "serve.yaml"), "--address", dashboard], env, timeout=120
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=120,
            json={
                "model": "expert-sql",
                "max_tokens": 16,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": "Schema:\nCREATE TABLE iris (species TEXT);\n"
                        "Question: How many rows are in the iris table?",
                    }
                ],
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    finally:
        run(["serve", "shutdown", "-y", "--address", dashboard], env, timeout=120)
        stopped = run(["bash", "cluster/local-cluster.sh", "stop"], env, timeout=120)
        assert stopped.returncode == 0
    leftover = subprocess.run(["pgrep", "-f", str(cluster_dir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"
    shutil.rmtree(cluster_dir, ignore_errors=True)
