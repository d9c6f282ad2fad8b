#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for trying multi-node runs and for the end-to-end tests:
# a head node (0 CPUs by default, so training lands on workers, as on a real cluster) plus N worker
# raylets, each with its own CPUs and a custom resource "node-K". Every process started here is recorded
# in STATE/pids with its start time and stopped by its process id — never `ray stop`, which kills every Ray on the
# host — once that pid is checked to be still the process started here.
#
#   cluster/local.sh start [--workers 2] [--cpus-per-worker 1] [--head-cpus 0] [--state DIR]
#   cluster/local.sh add-worker [--cpus-per-worker 1] [--state DIR]   # one more worker node
#   cluster/local.sh remove-worker K [--state DIR]                    # kill worker node K by pid
#   cluster/local.sh stop [--state DIR]
#   cluster/local.sh dir [--state DIR]                                # print STATE
#
# STATE is private to the user who runs this: owned by them and closed to others (a new one is made 0700; any other
# is refused, so nobody else can plant pids for `stop` to kill or read the token). It is --state DIR (or
# $GAN_DIST_CLUSTER_STATE), else a fresh `mktemp -d` directory made by `start` in $TMPDIR or /tmp, whose path is kept
# in ${XDG_CACHE_HOME:-~/.cache}/gan_dist/local-cluster for the other commands. (Not in the home directory itself:
# Ray's socket paths under STATE/ray must stay within 107 bytes.)
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
workers=2 cpus=1 head_cpus=0 state=${GAN_DIST_CLUSTER_STATE:-} index=
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
case $cmd in
  start | add-worker | remove-worker | stop | dir) ;;
  *) sed -n '2,27p' "$0"; exit 2 ;;
esac
pointer=${XDG_CACHE_HOME:-$HOME/.cache}/gan_dist/local-cluster
if [ -z "$state" ] && [ "$cmd" = start ] && ! { [ -f "$pointer" ] && [ -s "$(cat "$pointer")/pids" ]; }; then
  state=$(mktemp -d "${TMPDIR:-/tmp}/gan-dist.XXXXXX")  # 0700, a name nobody can guess or take first
  (umask 077; mkdir -p "$(dirname "$pointer")" && echo "$state" >"$pointer")
elif [ -z "$state" ]; then
  [ -f "$pointer" ] || { echo "no cluster started here (no $pointer); give --state DIR" >&2; exit 1; }
  state=$(cat "$pointer")
fi
[ "$cmd" = start ] && (umask 077; mkdir -p "$state")
[ -d "$state" ] || { echo "no cluster state in $state" >&2; exit 1; }
state=$(cd "$state" && pwd -P)  # Ray wants an absolute --temp-dir; -P: what is checked is what is used
# Only a directory of this user's that nobody else can write into: its pids get killed, its token is the cluster.
[ -O "$state" ] || { echo "$state is not owned by $(id -un): refusing to use it" >&2; exit 1; }
perms=$(ls -ld "$state" | cut -c1-10)
[ "${perms:4:6}" = ------ ] || { echo "$state is open to other users ($perms): chmod 700 it or use another" >&2; exit 1; }
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
  echo "$name $! $(started "$!")" >>"$state/pids"
}

# A process's start time: with its pid, what tells it from a later process that got the same pid. In one fixed
# locale and zone, so that a `stop` run from another environment reads the same text.
started() { LC_ALL=C TZ=UTC ps -o lstart= -p "$1" 2>/dev/null | awk '{$1 = $1; print}'; }

# Signal node NAME's process group if its recorded pid is still the process launched here. A leader gone with no
# process left in its group frees the pid for reuse, so a pid whose start time differs is not ours any more.
signal_node() {
  local signal=$1 name=$2 pid=$3 start=$4 now
  now=$(started "$pid")
  if [ -z "$start" ] || { [ -n "$now" ] && [ "$now" != "$start" ]; }; then
    echo "pid $pid is not $name as started here (recorded start '${start:-none}', now '${now:-gone}'): not killed" >&2
    return 1
  fi
  kill "-$signal" -- "-$pid" 2>/dev/null || true  # a gone leader's group: the node's processes it left behind
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
    record=$(awk -v n="worker-$index" '$1 == n' "$state/pids" | tail -n 1)
    [ -n "$record" ] || { echo "no worker-$index recorded in $state" >&2; exit 1; }
    read -r name pid start <<<"$record"
    signal_node KILL "$name" "$pid" "$start"
    echo "worker-$index (pid $pid) killed"
    ;;
  stop)
    [ -f "$state/pids" ] || { echo "nothing recorded in $state"; exit 0; }
    # Workers first, head last; each node's process group gets TERM, then KILL if it lingers.
    # A record it refuses to signal (not that process any more, or written without a start time) stays in the file.
    : > "$state/pids.kept"
    tac "$state/pids" | while read -r name pid start; do
      if ! signal_node TERM "$name" "$pid" "$start"; then echo "$name $pid $start" >> "$state/pids.kept"; continue; fi
      for _ in $(seq 1 20); do [ "$(started "$pid")" = "$start" ] || break; sleep 0.5; done
      signal_node KILL "$name" "$pid" "$start" 2>/dev/null || true
      echo "stopped $name (pid $pid)"
    done
    if [ -s "$state/pids.kept" ]; then tac "$state/pids.kept" > "$state/pids"; else rm -f "$state/pids"; fi
    rm -f "$state/pids.kept"
    ;;
  dir)
    echo "$state"
    ;;
esac
