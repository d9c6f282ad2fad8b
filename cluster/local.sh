#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for trying multi-node runs and for the end-to-end tests:
# a head node (0 CPUs by default, so training lands on workers, as on a real cluster) plus N worker
# raylets, each with its own CPUs and a custom resource "node-K". Every process started here is recorded
# in STATE/pids and stopped by its process id — never `ray stop`, which kills every Ray on the host.
#
#   cluster/local.sh start [--workers 2] [--cpus-per-worker 1] [--head-cpus 0] [--state DIR]
#   cluster/local.sh add-worker [--cpus-per-worker 1] [--state DIR]   # one more worker node
#   cluster/local.sh remove-worker K [--state DIR]                    # kill worker node K by pid
#   cluster/local.sh stop [--state DIR]
#
# After `start`, STATE/address holds the GCS address (for `gan-dist train --address`) and
# STATE/dashboard the Job Submission address (for `gan-dist submit --address`).
# Nodes use 127.0.0.1 and the dashboard listens there only (Ray's gRPC servers listen on every interface; Ray
# has no option against it). Ray's token authentication is always on: `start` writes a new random token (or
# $RAY_AUTH_TOKEN if set) to STATE/auth_token (mode 0600), and every node and client reads it from there
# (RAY_AUTH_TOKEN_PATH): `gan-dist submit --token-file STATE/auth_token`; for `ray` and `gan-dist train
# --address`, export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=STATE/auth_token. Credentials for S3 and MLflow
# come from the environment `start` and `add-worker` run in (the nodes' environment), never from jobs.
# Ray's session files and logs go to STATE/ray/NODE (--temp-dir), apart from any other Ray on the host.
set -euo pipefail

cmd=${1:-}
shift || true
workers=2 cpus=1 head_cpus=0 state=${GAN_DIST_CLUSTER_STATE:-/tmp/gan_dist_local_cluster} index=
while [ $# -gt 0 ]; do
  case $1 in
    --workers) workers=$2; shift 2 ;;
    --cpus-per-worker) cpus=$2; shift 2 ;;
    --head-cpus) head_cpus=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    [0-9]*) index=$1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ "$cmd" = start ] && mkdir -p "$state"
[ -d "$state" ] && state=$(cd "$state" && pwd)  # Ray wants an absolute --temp-dir
token_file=$state/auth_token given_token=${RAY_AUTH_TOKEN:-}
# Every node (and the jobs it runs) reads the token from the file; RAY_AUTH_TOKEN would take precedence over
# RAY_AUTH_TOKEN_PATH, so only `start` looks at it, to write it there.
unset RAY_AUTH_TOKEN
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file
RAY=${RAY:-$(command -v ray)}
PY=${PYTHON:-$(dirname "$RAY")/python}
# Jobs' entrypoints ("python -m gan_dist ...") must find the Python environment this Ray runs from.
export PATH="$(dirname "$RAY"):$PATH"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Ports a node opens; several nodes on one host must not collide (some of Ray's defaults are fixed).
node_ports() {
  echo --node-manager-port "$(free_port)" --object-manager-port "$(free_port)" \
    --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)"
}

# A fresh token, 256 random bits as Ray's own generator makes them, readable by this user only.
write_token() {
  rm -f "$token_file"
  (umask 077; if [ -n "$given_token" ]; then printf %s "$given_token"; else
    "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")'; fi >"$token_file")
}

# Start one node in its own session (so its whole process group can be stopped by pid) and record it. Each node
# has its own Ray temp dir, STATE/ray/NAME, as each machine of a real cluster has: nodes starting together in one
# session dir race for the same socket names.
launch() {
  local name=$1; shift
  setsid "$RAY" start --block --node-ip-address=127.0.0.1 --temp-dir="$state/ray/$name" --disable-usage-stats "$@" \
    >"$state/$name.log" 2>&1 &
  echo "$name $!" >>"$state/pids"
}

# Wait until the head answers and every named worker node (by its "node-K" resource) is alive. Named
# rather than counted: a node killed a moment ago still counts as alive until the GCS notices, which can
# take half a minute. Each probe is bounded, since connecting before the GCS is up blocks for a long time.
nodes_alive() {
  timeout 20 "$PY" - "$(cat "$state/address")" "$@" <<'EOF'
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = {r for n in ray.nodes() if n["Alive"] for r in n["Resources"]}
sys.exit(0 if all(f"node-{k}" in alive for k in sys.argv[2:]) else 1)
EOF
}

wait_for_nodes() {
  local deadline=$((SECONDS + ${GAN_DIST_CLUSTER_TIMEOUT:-180}))
  until nodes_alive "$@" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "cluster: head or worker node(s) $* not up; logs in $state" >&2; return 1; }
    sleep 2
  done
}

start_worker() {
  local k=$1
  # shellcheck disable=SC2046
  launch "worker-$k" --address="$(cat "$state/address")" --num-cpus="$cpus" \
    --resources="{\"node-$k\": 1}" $(node_ports)
}

case $cmd in
  start)
    [ -s "$state/pids" ] && { echo "a cluster is already recorded in $state (stop it first)" >&2; exit 1; }
    write_token
    port=$(free_port) dash=$(free_port)
    echo "127.0.0.1:$port" >"$state/address"
    echo "http://127.0.0.1:$dash" >"$state/dashboard"
    # shellcheck disable=SC2046
    launch head --head --port="$port" --num-cpus="$head_cpus" --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$dash" --ray-client-server-port="$(free_port)" $(node_ports)
    wait_for_nodes  # workers started before the GCS answers can time out registering
    for k in $(seq 1 "$workers"); do start_worker "$k"; done
    wait_for_nodes $(seq 1 "$workers")
    echo "Ray cluster up: head $(cat "$state/address"), dashboard $(cat "$state/dashboard"), $workers workers"
    echo "token auth on: token in $token_file (gan-dist --token-file $token_file); Ray logs in $state/ray/NODE"
    ;;
  add-worker)
    k=$(( $(grep -c '^worker-' "$state/pids" || true) + 1 ))
    start_worker "$k"
    wait_for_nodes "$k"
    echo "worker-$k added"
    ;;
  remove-worker)
    pid=$(awk -v n="worker-$index" '$1 == n {print $2}' "$state/pids" | tail -n 1)
    [ -n "$pid" ] || { echo "no worker-$index recorded in $state" >&2; exit 1; }
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "worker-$index (pid $pid) killed"
    ;;
  stop)
    [ -f "$state/pids" ] || { echo "nothing recorded in $state"; exit 0; }
    # Workers first, head last; each node's process group gets TERM, then KILL if it lingers.
    tac "$state/pids" | while read -r name pid; do
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      echo "stopped $name (pid $pid)"
    done
    rm -f "$state/pids"
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
