#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine, for development and tests: a head and N more nodes, each a
# separate `ray start` on loopback with its own ports.
#   cluster/local-cluster.sh start [N_WORKERS] [CPUS_PER_NODE]   prints RAY_ADDRESS and the dashboard URL
#   cluster/local-cluster.sh stop                                  stops only this cluster's processes
# State (ports, temp dir) lives in $EXPERTSERVE_CLUSTER_DIR (default /tmp/expertserve-local-cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${EXPERTSERVE_CLUSTER_DIR:-/tmp/expertserve-local-cluster}
RAY=${RAY:-.venv/bin/ray}
# =1 allows several nodes on one machine (=0 makes Ray single-node); every node is addressed as 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# Jobs run `python ...` with the nodes' PATH: make it the environment that has expertserve.
PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
export PATH

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

case "${1:-}" in
start)
    workers=${2:-1}; cpus=${3:-2}
    mkdir -p "$DIR"
    gcs=$(free_port); dash=$(free_port)
    # The session directory names this cluster in every process's command line: `stop` finds them by it.
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$gcs" --dashboard-host=127.0.0.1 \
        --dashboard-port="$dash" --num-cpus="$cpus" --temp-dir="$DIR/ray" --resources='{"head_node": 1}' \
        --disable-usage-stats > "$DIR/head.log" 2>&1
    for i in $(seq 1 "$workers"); do
        "$RAY" start --address="127.0.0.1:$gcs" --node-ip-address=127.0.0.1 --num-cpus="$cpus" \
            --node-manager-port="$(free_port)" --object-manager-port="$(free_port)" \
            --min-worker-port=0 --max-worker-port=0 --resources="{\"worker_node_$i\": 1}" \
            --disable-usage-stats > "$DIR/worker-$i.log" 2>&1
    done
    # Ready when every node has joined and the head accepts a job: `ray job list` answers earlier than job
    # submission does ("No available agent to submit job"), so a no-op job is the test.
    for _ in $(seq 1 90); do
        if "$RAY" job submit --address "http://127.0.0.1:$dash" --no-wait -- true > /dev/null 2>&1 && \
           [ "$(python3 -c "import json,urllib.request; print(len([n for n in json.load(urllib.request.urlopen('http://127.0.0.1:$dash/nodes?view=summary'))['data']['summary'] if n['raylet']['state'] == 'ALIVE']))" 2>/dev/null)" = "$((workers + 1))" ]; then
            ready=1; break
        fi
        sleep 1
    done
    [ "${ready:-0}" = 1 ] || { echo "cluster not ready after 90 s; see $DIR/*.log" >&2; exit 1; }
    echo "127.0.0.1:$gcs" > "$DIR/address"
    echo "http://127.0.0.1:$dash" > "$DIR/dashboard"
    echo "RAY_ADDRESS=127.0.0.1:$gcs"
    echo "dashboard: http://127.0.0.1:$dash  (ray job submit --address http://127.0.0.1:$dash ...)"
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
