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
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from expertserve.bench.servers import free_port
from tests.helpers import REPO, S3_ENV, make_expert, manifest, s3_server

pytestmark = [pytest.mark.cluster, pytest.mark.server]
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
    with s3_server() as store:
        _scenario_with_store(tmp_path, store)


def _scenario_with_store(tmp_path: Path, store: str) -> None:
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
        # Token auth on, as `ray start --head` has it by default and the training docs' `ray job submit` expects
        # (RAY_AUTH_MODE=token); the script makes the token file.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(cluster_dir / "auth_token"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "EXPERTSERVE_STORE": store,  # read by _serve_across_nodes
        **S3_ENV,  # every node opens the shared expert store
    }
    # The script bounds its own waits (2 x 120 s per `ray start`, 150 s for readiness) and prints the cluster's
    # logs when it gives up, so this timeout only catches a hang of the script itself.
    started = run(["bash", "cluster/local-cluster.sh", "start", "1", "2"], env, timeout=480)
    assert started.returncode == 0, started.stdout + started.stderr
    dashboard = (cluster_dir / "dashboard").read_text().strip()
    # Without the token the jobs API refuses (the cluster is not open to whoever reaches its ports).
    refused = httpx.get(f"{dashboard}/api/jobs/", timeout=30)
    assert refused.status_code in (401, 403), refused.status_code
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

        _serve_across_nodes(tmp_path, env, dashboard, cluster_dir)
    finally:
        run(["serve", "shutdown", "-y", "--address", dashboard], env, timeout=120)
        stopped = run(["bash", "cluster/local-cluster.sh", "stop"], env, timeout=120)
        assert stopped.returncode == 0
    leftover = subprocess.run(["pgrep", "-f", str(cluster_dir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"
    shutil.rmtree(cluster_dir, ignore_errors=True)


SHARED = "expert-json-shared"


def _serve_across_nodes(tmp_path: Path, env: dict[str, str], dashboard: str, cluster_dir: Path) -> None:
    """configs/serve.yaml with two ingress and two engine replicas, the repository's experts and a shared store (S3)
    as expert roots. An expert installed into the store and reloaded is served through both ingress replicas; its
    requests stay on the replicas that hold it; the worker node killed under load costs no client a 500."""
    from expertserve.packaging import archive, signing

    store = env["EXPERTSERVE_STORE"]
    public = signing.generate_key(tmp_path / "keys" / "signing.key")
    serve_config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    port = free_port()  # a previous run's proxy may still hold 8000
    serve_config["http_options"]["port"] = port
    serve_config["applications"][0]["args"] = {
        "experts_dirs": [str(REPO / "experts"), store],
        "trusted_keys": [public],
        # Engines in their replicas' processes: they start in seconds, here and after the node kill (this test is
        # about nodes: placement, mirrors, a lost node; tests/e2e/test_shipped.py serves with engine processes).
        "engine": {"in_process": True},
        # Two CPUs per engine replica: one on each node. The shared expert is kept loaded on both, so the worker
        # node's engine fetches it from the store into that node's own mirror. The ingress replicas stay on the
        # head, where the HTTP proxy is (HeadOnly): Ray Serve's proxy answers 500 for requests in flight on an
        # ingress replica whose node dies, while a dead engine replica's requests are re-sent by the ingress.
        "replicas": {
            "num_replicas": 2,
            "ingress_replicas": 2,
            "ingress_resources": {"head_node": 0.01},
            "num_cpus": 2,
            "expert_min_replicas": {SHARED: 2},
        },
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config))
    deploy = run(["serve", "deploy", str(tmp_path / "serve.yaml"), "--address", dashboard], env, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    url = f"http://127.0.0.1:{port}"
    # Every replica started (Serve says RUNNING), not only the first ingress: the reload below counts the ingress
    # replicas that serve its generation, and one still starting is not one of them yet.
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline and not (_app_running(dashboard, env) and _ready(url)):
        time.sleep(2)
    assert _chat(url, "expert-sql").status_code == 200

    # A shipped expert under a new name, signed, installed into the store from the CLI, then reloaded.
    shared = tmp_path / SHARED
    shutil.copytree(REPO / "experts" / "expert-json", shared)
    data = json.loads((shared / "manifest.json").read_text())
    data["name"] = SHARED
    (shared / "manifest.json").write_text(json.dumps(data, indent=2))
    package = archive.build_package(shared, tmp_path / "packages", sign_key=tmp_path / "keys" / "signing.key")
    install = run(
        [
            sys.executable,
            "-m",
            "expertserve",
            "install",
            str(package),
            "--dir",
            store,
            "--trusted-key",
            public,
        ],
        env,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    reloaded = httpx.post(f"{url}/admin/experts/reload", timeout=120)
    assert reloaded.status_code == 200, reloaded.text
    answer = reloaded.json()
    assert SHARED in answer["added"] and answer["ingress_replicas"] == 2, answer
    for _ in range(20):
        r = httpx.get(f"{url}/v1/models", timeout=30)
        assert SHARED in {m["id"] for m in r.json()["data"]}
        assert r.headers["x-expertserve-generation"] == str(answer["generation"])

    # Placement: sequential requests for one expert go to replicas that already hold it.
    replicas = []
    for _ in range(16):
        r = _chat(url, SHARED)
        assert r.status_code == 200, r.text
        replicas.append(r.headers["x-expertserve-replica"])
    held = sum(r in replicas[:i] for i, r in enumerate(replicas) if i >= 2)
    assert held / (len(replicas) - 2) >= 0.9, replicas
    # Both engine replicas answered for it, and each node has it in its own mirror of the store.
    assert len(set(replicas)) == 2, replicas
    for node in ("head", "worker-1"):
        assert any(p.iterdir() for p in cluster_dir.glob(f"{node}/stores/*/{SHARED}")), (
            f"{node} did not mirror it"
        )

    # Under load, the worker node dies: the head keeps answering, and no client sees a 500.
    statuses: list[int] = []
    stop = threading.Event()

    def client(model: str) -> None:
        while not stop.is_set():
            try:
                statuses.append(_chat(url, model).status_code)
            except httpx.HTTPError:
                statuses.append(-1)

    threads = [
        threading.Thread(target=client, args=(m,)) for m in (SHARED, "expert-sql", SHARED, "expert-sql")
    ]
    for t in threads:
        t.start()
    time.sleep(5)
    killed = run(["bash", "cluster/local-cluster.sh", "kill-node", "1"], env, timeout=60)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    time.sleep(20)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    after = [_chat(url, m).status_code for m in (SHARED, "expert-sql", SHARED, "expert-sql")]
    assert 500 not in statuses and -1 not in statuses, statuses
    assert after == [200] * 4, after


def _app_running(dashboard: str, env: dict[str, str]) -> bool:
    status = run(["serve", "status", "--address", dashboard], env, timeout=60)
    apps = (yaml.safe_load(status.stdout or "{}") or {}).get("applications") or {}
    return status.returncode == 0 and bool(apps) and all(a.get("status") == "RUNNING" for a in apps.values())


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _chat(url: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        timeout=180,
        json={
            "model": model,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Name: Ada, age 36. Extract name and age."}],
        },
    )
