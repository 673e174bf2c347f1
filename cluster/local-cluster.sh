#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine, for development and tests: a head and N more nodes, each a
# separate `ray start` on loopback with its own ports.
#   cluster/local-cluster.sh start [N_WORKERS] [CPUS_PER_NODE]   prints RAY_ADDRESS and the dashboard URL
#   cluster/local-cluster.sh kill-node I                           kills worker node I at once (a node failure)
#   cluster/local-cluster.sh stop                                  stops only this cluster's processes
# Each node mirrors shared expert stores into its own directory ($DIR/<node>/stores, as EXPERTSERVE_STORE_CACHE),
# as separate machines would: nothing one node fetched is visible to another.
# State (ports, temp dir) lives in $EXPERTSERVE_CLUSTER_DIR (default /tmp/expertserve-local-cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${EXPERTSERVE_CLUSTER_DIR:-/tmp/expertserve-local-cluster}
RAY=${RAY:-.venv/bin/ray}
# =1 allows several nodes on one machine (=0 makes Ray single-node); every node is addressed as 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
# Ray's token authentication, as `ray start --head` has by default: the dashboard (jobs API) and the cluster's gRPC
# ports take only clients holding the token (RAY_AUTH_MODE=disabled opts out). The token: RAY_AUTH_TOKEN, or the file
# RAY_AUTH_TOKEN_PATH names, else $DIR/auth_token; made (0600) when that file does not exist yet.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Without it Serve's replicas still open their gRPC servers on every interface ([::]), unauthenticated: anyone who
# reaches this machine could call an engine replica directly, past the ingress's keys. Only on explicit request.
if [ "$RAY_AUTH_MODE" = disabled ] && [ "${EXPERTSERVE_ALLOW_NO_RAY_AUTH:-0}" != 1 ]; then
    echo "error: RAY_AUTH_MODE=disabled leaves Serve's replica gRPC ports open on every interface without auth;" \
        "set EXPERTSERVE_ALLOW_NO_RAY_AUTH=1 to run so anyway (a machine no one else reaches)" >&2
    exit 2
fi
# Serve's data plane over its gRPC channels (ServeConfig.grpc_data_plane): Ray's nodes read it when they start.
export RAY_SERVE_USE_GRPC_BY_DEFAULT=${RAY_SERVE_USE_GRPC_BY_DEFAULT:-1}
# Serve's proxy strips the client headers that lift the operator's timeout, and refuses bodies at the limit while
# they stream (expertserve/serve/http/proxy_guard.py).
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=expertserve.serve.http.proxy_guard:middlewares
# Serve's gRPC messages up to 64 MiB (4 MiB by default: whole answers with many logprobs failed after their compute).
export RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=67108864
# Jobs run `python ...` with the nodes' PATH: make it the environment that has expertserve.
PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
export PATH

# Prints the tail of every log of this cluster to stderr and fails: a failed start says why.
fail_with_logs() {
    echo "$1" >&2
    for f in "$DIR"/head.log "$DIR"/worker-*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
    for f in gcs_server.out dashboard.log dashboard_agent.log raylet.out; do
        f="$DIR/ray/session_latest/logs/$f"
        [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

# A free port outside the kernel's ephemeral range (where other Rays on the machine take theirs while this one
# starts) and above Ray's worker ports: 20000-32767, as expertserve.bench.servers.free_port.
free_port() {
    python3 -c '
import random, socket
for _ in range(200):
    p = random.randrange(20000, 32768)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
        print(p)
        break
'
}
# Every port a node opens, chosen free: Ray's defaults (dashboard agent 52365, client server 10001, ...) clash
# with the other node of this cluster and with any other Ray on the machine. A head whose dashboard agent could
# not bind refuses every job ("No available agent to submit job").
node_ports() {
    echo "--node-manager-port=$(free_port) --object-manager-port=$(free_port) --metrics-export-port=$(free_port)" \
         "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
         "--runtime-env-agent-port=$(free_port)"
}

case "${1:-}" in
start)
    workers=${2:-1}; cpus=${3:-2}
    mkdir -p "$DIR"
    if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
        export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$DIR/auth_token}
        if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
            (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
        fi
    fi
    gcs=$(free_port); dash=$(free_port)
    # The session directory names this cluster in every process's command line: `stop` finds them by it.
    # shellcheck disable=SC2046 (node_ports gives several words on purpose)
    EXPERTSERVE_STORE_CACHE="$DIR/head/stores" timeout 120 "$RAY" start --head --node-ip-address=127.0.0.1 --port="$gcs" --dashboard-host=127.0.0.1 \
        --dashboard-port="$dash" --ray-client-server-port="$(free_port)" $(node_ports) \
        --num-cpus="$cpus" --temp-dir="$DIR/ray" --resources='{"head_node": 1}' \
        --disable-usage-stats > "$DIR/head.log" 2>&1 || fail_with_logs "the head node did not start"
    for i in $(seq 1 "$workers"); do
        manager=$(free_port)
        echo "$manager" > "$DIR/worker-$i.node-manager-port"
        # shellcheck disable=SC2046
        EXPERTSERVE_STORE_CACHE="$DIR/worker-$i/stores" timeout 120 "$RAY" start --address="127.0.0.1:$gcs" \
            --node-ip-address=127.0.0.1 --num-cpus="$cpus" --node-manager-port="$manager" \
            --object-manager-port="$(free_port)" --metrics-export-port="$(free_port)" \
            --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
            --runtime-env-agent-port="$(free_port)" \
            --min-worker-port=0 --max-worker-port=0 --resources="{\"worker_node_$i\": 1}" \
            --disable-usage-stats > "$DIR/worker-$i.log" 2>&1 || fail_with_logs "worker node $i did not start"
    done
    # Ready when every node has joined and the head accepts a job. Job listing answers earlier than submission
    # does ("No available agent to submit job"), so a no-op job is the test; it is tried only once all nodes are
    # alive, so waiting does not pile up jobs. Plain HTTP, not the ray CLI: the CLI takes seconds to import.
    if ! python3 - "http://127.0.0.1:$dash" "$((workers + 1))" "${READY_TIMEOUT:-150}" <<'PY'
import json, os, sys, time, urllib.request
url, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline, last = time.monotonic() + timeout, "no answer yet"
token = os.environ.get("RAY_AUTH_TOKEN") or (
    open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip() if os.environ.get("RAY_AUTH_TOKEN_PATH") else ""
)
auth = {"Authorization": f"Bearer {token}"} if os.environ.get("RAY_AUTH_MODE") == "token" and token else {}
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/nodes?view=summary", headers=auth), timeout=10) as r:
            nodes = json.load(r)["data"]["summary"]
        alive = sum(n["raylet"]["state"] == "ALIVE" for n in nodes)
        if alive < want:
            last = f"{alive} of {want} nodes alive"
        else:
            req = urllib.request.Request(f"{url}/api/jobs/", data=json.dumps({"entrypoint": "true"}).encode(),
                                         headers={"Content-Type": "application/json", **auth}, method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200:
                    sys.exit(0)
                last = f"job submission answered {r.status}"
    except Exception as e:  # not up yet: say why if it never comes up
        last = f"{type(e).__name__}: {e}"
        if hasattr(e, "read"):
            last += " " + e.read().decode(errors="replace")[-300:]
    time.sleep(1)
print(f"cluster not ready after {timeout:.0f} s: {last}", file=sys.stderr)
sys.exit(1)
PY
    then
        fail_with_logs "see $DIR for every log"
    fi
    echo "127.0.0.1:$gcs" > "$DIR/address"
    echo "http://127.0.0.1:$dash" > "$DIR/dashboard"
    echo "RAY_ADDRESS=127.0.0.1:$gcs"
    echo "dashboard: http://127.0.0.1:$dash  (ray job submit --address http://127.0.0.1:$dash ...)"
    if [ "$RAY_AUTH_MODE" = token ]; then
        echo "clients need: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-<your RAY_AUTH_TOKEN>}"
    fi
    ;;
kill-node)
    i=${2:?usage: $0 kill-node I}
    port=$(cat "$DIR/worker-$i.node-manager-port" 2>/dev/null) || { echo "no worker node $i in $DIR" >&2; exit 2; }
    raylet=$(pgrep -f -- "raylet.*--node_manager_port=$port" | head -n 1) || true
    [ -n "$raylet" ] || { echo "worker node $i is not running" >&2; exit 1; }
    # The raylet and every process below it (its workers, the node's agents), at once: a machine that died.
    kill_tree() { for child in $(pgrep -P "$1"); do kill_tree "$child"; done; kill -KILL "$1" 2>/dev/null || true; }
    kill_tree "$raylet"
    echo "killed worker node $i (raylet $raylet)"
    ;;
stop)
    [ -d "$DIR/ray" ] || { echo "no local cluster in $DIR"; exit 0; }
    pkill -TERM -f -- "$DIR/ray" || true
    sleep 3
    pkill -KILL -f -- "$DIR/ray" || true
    rm -f "$DIR/address" "$DIR/dashboard"
    echo "stopped"
    ;;
*)
    echo "usage: $0 start [N_WORKERS] [CPUS_PER_NODE] | stop" >&2
    exit 2
    ;;
esac
