#!/usr/bin/env bash
# A Ray cluster on this machine, for trying the cluster path: one head and N worker nodes, every
# port bound to 127.0.0.1, token authentication on.
#
#   cluster/local.sh up [WORKERS]   start a head and WORKERS worker nodes (default 1)
#   cluster/local.sh env            print the exports a client needs (eval "$(cluster/local.sh env)")
#   cluster/local.sh status         the nodes and resources (`ray status`)
#   cluster/local.sh down           stop this cluster's processes, and only those
#
# Then:  eval "$(cluster/local.sh env)"
#        featurize submit jobs/demo.yaml --wait       # to $RAY_API_SERVER_ADDRESS
#        featurize run jobs/demo.yaml --address auto     # or a driver of your own on the head
#
# Settings (environment): FEATURIZE_CLUSTER_DIR (state: pids, logs, token; default
# /tmp/featurize-cluster, keep it short: Ray's socket paths live under it), RAY_PORT (GCS, 6379),
# DASHBOARD_PORT (dashboard and Jobs API, 8265), CLIENT_PORT (Ray Client, 10001), HEAD_CPUS (2),
# WORKER_CPUS (1), WORKER_GPUS (0; a number > 0 declares that many GPUs on each worker, which on a
# machine without GPUs only tries the placement of model actors), RAY (the ray command).
#
# Each node runs `ray start --block` in the background; `down` sends it SIGTERM, and it stops its own
# processes. `ray stop` would stop every Ray on the machine, other clusters and test sessions too.
set -euo pipefail

STATE=${FEATURIZE_CLUSTER_DIR:-/tmp/featurize-cluster}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
CLIENT_PORT=${CLIENT_PORT:-10001}
HEAD_CPUS=${HEAD_CPUS:-2}
WORKER_CPUS=${WORKER_CPUS:-1}
WORKER_GPUS=${WORKER_GPUS:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$HERE/.venv/bin/ray" ]]; then RAY="$HERE/.venv/bin/ray"; else RAY=ray; fi
fi

# The job drivers run `python -m pipeline.cli`: the python of the environment that has Ray.
[[ "$RAY" == */* ]] && export PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"

# Every Ray process and every client of this cluster presents the token in $STATE/auth_token.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"

client_env() {
  echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
  echo "export RAY_ADDRESS=127.0.0.1:$RAY_PORT RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
}

wait_for_nodes() {  # wait until $1 nodes are alive, or fail after 120 s
  local want=$1 deadline=$((SECONDS + 120))
  until [[ $("$RAY" list nodes --address "http://127.0.0.1:$DASHBOARD_PORT" --filter state=ALIVE \
             --format json 2>/dev/null | grep -o '"node_id"' | wc -l) -ge $want ]]; do
    if (( SECONDS > deadline )); then
      echo "local.sh: $want nodes did not come up in 120 s; logs in $STATE/*.log" >&2
      return 1
    fi
    check_alive
    sleep 1
  done
}

check_alive() {  # a `ray start --block` that exited means its node failed to start
  local pid
  for pid in $(cat "$STATE"/*.pid 2>/dev/null); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "local.sh: a node exited during start-up; see $STATE/*.log" >&2
      return 1
    fi
  done
}

start_node() {  # start_node NAME ARGS...: one `ray start --block` in the background
  local name=$1; shift
  # `down` stops the whole cluster at once: a node's graceful drain (waiting up to 30 s for its work
  # to go idle, which the head's never does) would only hold `down` for 30 s and race its SIGKILL.
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0} nohup "$RAY" start --block --node-ip-address=127.0.0.1 --dashboard-agent-listen-port=0 \
    --min-worker-port=0 --max-worker-port=0 "$@" >"$STATE/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
}

up() {
  local workers=${1:-1} i
  if compgen -G "$STATE/*.pid" >/dev/null; then
    echo "local.sh: a cluster is already up (state in $STATE); run 'local.sh down' first" >&2
    exit 1
  fi
  mkdir -p "$STATE"
  (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
  start_node head --head --port="$RAY_PORT" --temp-dir="$STATE/ray" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --num-cpus="$HEAD_CPUS" --num-gpus=0
  wait_for_nodes 1
  for ((i = 1; i <= workers; i++)); do
    start_node "worker$i" --address="127.0.0.1:$RAY_PORT" --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS"
  done
  wait_for_nodes $((workers + 1))
  echo "local.sh: head and $workers worker node(s) up on 127.0.0.1; dashboard http://127.0.0.1:$DASHBOARD_PORT"
  echo "local.sh: for clients:"
  client_env | sed 's/^/  /'
}

down() {
  local pid
  for pid in $(cat "$STATE"/*.pid 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $(cat "$STATE"/*.pid 2>/dev/null); do
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true  # still there after 30 s
  done
  rm -f "$STATE"/*.pid
  echo "local.sh: stopped"
}

case "${1:-}" in
  up) up "${2:-1}" ;;
  down) down ;;
  env) client_env ;;
  status) "$RAY" status --address "127.0.0.1:$RAY_PORT" ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
