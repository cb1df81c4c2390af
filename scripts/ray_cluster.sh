#!/usr/bin/env bash
# A real Ray cluster on this machine, for the Ray tests (tests/test_ray.py) and for trying
# `hydra/launcher=ray_cluster` without a cluster: a head node and a second node, started with
# Ray's own `ray start` (the way every Ray cluster's nodes are started), each node its own raylet,
# object store, log directory and loopback address.
#
#   scripts/ray_cluster.sh up      start the head (`ray start --head`) and the second node
#                                  (`ray start --address=HEAD`); wait until every node is alive
#   scripts/ray_cluster.sh env     print `export RAY_ADDRESS=...` (eval it: the launcher and
#                                  `ray status` then find the cluster)
#   scripts/ray_cluster.sh status  `ray status`, or exit 1 when the cluster is not up
#   scripts/ray_cluster.sh down    stop this cluster's processes (only these: not `ray stop`,
#                                  which kills every Ray on the machine) and remove its state
#
# Needs `ray` (pip install -e '.[ray]'): SUITE_RAY_CMD, else `ray` on PATH, else .venv/bin/ray.
# Everything it writes lives under $SUITE_RAY_STATE (default /tmp/suite-ray). The head listens on
# $SUITE_RAY_HEAD_IP:$SUITE_RAY_PORT (127.0.0.2:6390), the second node on 127.0.0.3: Ray rewrites
# 127.0.0.1 and localhost into the machine's outward address (so that other machines can reach
# it), and a node started on that address cannot reach a head on 127.0.0.1; the other loopback
# addresses are left as given, and on Linux all of 127.0.0.0/8 is this machine. So nothing leaves
# the machine. SUITE_RAY_NODES=1 starts the head only; SUITE_RAY_CPUS and SUITE_RAY_GPUS are each
# node's CPUs and GPUs (default 1 and 0: two nodes of one core each on a two-core machine). No
# dashboard, no usage stats.
# `up` and `down` are idempotent. The nodes must be alive within SUITE_RAY_TIMEOUT s (default 60).
set -euo pipefail

STATE=${SUITE_RAY_STATE:-/tmp/suite-ray}
HEAD_IP=${SUITE_RAY_HEAD_IP:-127.0.0.2}
NODE_IP=${SUITE_RAY_NODE_IP:-127.0.0.3}
PORT=${SUITE_RAY_PORT:-6390}
CLIENT_PORT=${SUITE_RAY_CLIENT_PORT:-6391} # Ray Client's server (ray://); Ray's default is 10001
NODES=${SUITE_RAY_NODES:-2}
CPUS=${SUITE_RAY_CPUS:-1}
GPUS=${SUITE_RAY_GPUS:-0} # per node; the tests train on CPU
OBJECT_STORE_MB=${SUITE_RAY_OBJECT_STORE_MB:-100} # per node; the cells pass only small objects
TIMEOUT=${SUITE_RAY_TIMEOUT:-60}
ADDRESS=$HEAD_IP:$PORT
export RAY_USAGE_STATS_ENABLED=0

die() {
    echo "ray_cluster: $*" >&2
    exit 1
}

find_ray() {
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    for RAY in "${SUITE_RAY_CMD:-}" ray "$here/.venv/bin/ray"; do
        [[ -n $RAY ]] && command -v "$RAY" >/dev/null && return
    done
    die "no \`ray\` command: pip install -e '.[ray]' (or set SUITE_RAY_CMD)"
}

# Each node is started by `setsid ray start`, so its daemons (GCS, raylet, log monitor, ...) and
# the raylet's workers (each in a process group of its own) share one session, recorded in
# $STATE/NAME.sid: `down` stops exactly those sessions' processes.
alive() { # alive NAME: the node's session still has a process
    [[ -s $STATE/$1.sid ]] && pgrep -s "$(cat "$STATE/$1.sid")" >/dev/null
}

start_node() { # start_node NAME ARGS...: `ray start ARGS`, in a session of its own
    local name=$1 pid
    shift
    mkdir -p "$STATE/$name"
    # Output to a file, never to the caller's pipes: the daemons inherit these descriptors.
    setsid "$RAY" start "$@" --num-cpus="$CPUS" --num-gpus="$GPUS" \
        --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) --temp-dir="$STATE/$name" \
        --disable-usage-stats --log-style=record </dev/null >"$STATE/$name.log" 2>&1 &
    pid=$!
    echo "$pid" >"$STATE/$name.sid" # setsid without job control: its pid is the new session
    wait "$pid" || {
        tail -n 20 "$STATE/$name.log" >&2
        die "ray start ($name) failed; see $STATE/$name.log"
    }
    pgrep -s "$pid" >/dev/null || die "ray start ($name) left no process in session $pid"
}

node_count() { # alive nodes, as `ray status` lists them under "Active:"
    "$RAY" status --address="$ADDRESS" 2>/dev/null |
        awk '/^Active:/ {on = 1; next} /^[A-Z]/ {on = 0} on && /node_/ {n++} END {print n + 0}'
}

up() {
    find_ray
    mkdir -p "$STATE"
    if ! alive head; then
        stop node2 # a node left from a head that is gone
        start_node head --head --node-ip-address="$HEAD_IP" --port="$PORT" \
            --ray-client-server-port="$CLIENT_PORT" --include-dashboard=false
    fi
    if ((NODES > 1)) && ! alive node2; then
        start_node node2 --address="$ADDRESS" --node-ip-address="$NODE_IP"
    fi
    local deadline=$((SECONDS + TIMEOUT)) count=0
    while ((SECONDS < deadline)); do
        count=$(node_count)
        ((count >= NODES)) && break
        sleep 1
    done
    ((count >= NODES)) || die "$count of $NODES nodes alive after ${TIMEOUT}s; see $STATE/*.log"
    echo "ray_cluster: up; $count node(s) of $CPUS CPU(s), head at $ADDRESS (RAY_ADDRESS)" >&2
}

terminate() { # terminate PID...: TERM them, wait until they have exited (at most 15 s)
    local pid left
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 150); do
        left=""
        for pid in "$@"; do
            kill -0 "$pid" 2>/dev/null && left=1
        done
        [[ -z $left ]] && return 0
        sleep 0.1
    done
    return 1
}

stop() { # stop NAME: every process of the node's session; SIGKILL for what ignores SIGTERM
    local sid gcs others
    alive "$1" || return 0
    sid=$(cat "$STATE/$1.sid")
    # The GCS last: the autoscaler's monitor ignores SIGTERM while it cannot reach the GCS.
    gcs=$(pgrep -s "$sid" -x gcs_server || true)
    others=$(pgrep -s "$sid" | grep -vxF "${gcs:-none}" || true)
    # shellcheck disable=SC2086 # lists of pids
    if ! { terminate $others && terminate $gcs; }; then
        echo "ray_cluster: $1 (session $sid) ignored SIGTERM; killing it" >&2
        pkill -KILL -s "$sid" || true
    fi
}

down() {
    [[ -d $STATE ]] || return 0
    stop node2
    stop head
    rm -rf "$STATE"
    echo "ray_cluster: down" >&2
}

case ${1:-} in
up) up ;;
down) down ;;
env) echo "export RAY_ADDRESS=$ADDRESS" ;;
status)
    alive head || die "not up"
    find_ray
    "$RAY" status --address="$ADDRESS"
    ;;
*)
    echo "usage: $0 up|down|env|status" >&2
    exit 2
    ;;
esac
