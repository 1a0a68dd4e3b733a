#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine (a head + N worker nodes, each
# its own raylet), token auth on, to try `ray job submit` as on a real cluster:
#   cluster/local-cluster.sh up 2     # head + 2 workers; prints what to export and the submit command
#   cluster/local-cluster.sh down     # stops this cluster's processes only; returns once they are gone
# (`start` and `stop` are aliases of `up` and `down`.)
#
# The nodes run the project's virtualenv: its `ray`, and its bin/ first on PATH,
# so a job's `python` is the venv's interpreter (the one with ray_qlora's
# dependencies), not the system one.
#
# Settings (environment variables, with their defaults):
#   RAY_TEMP_DIR=/tmp/ray-qlora-<uid>  Ray's temp dir: sessions, logs, the token; names the cluster for `down`
#   GCS_PORT=6379 DASH_PORT=8265 CLIENT_PORT=10001
#   AGENT_PORT=52365                   node i's dashboard agent listens on AGENT_PORT+i (one machine, many nodes)
#   HEAD_CPUS=1 WORKER_CPUS=2          CPUs Ray schedules on the head and on each worker
#   OBJECT_STORE_MB=1024               object store per node
#   RAY_AUTH_TOKEN                     the token to use; else one is made in $RAY_TEMP_DIR/auth_token
#   VENV=<repo>/.venv
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
RAY="$VENV/bin/ray"
PY="$VENV/bin/python"
RAY_TEMP_DIR=${RAY_TEMP_DIR:-${TMPDIR:-/tmp}/ray-qlora-$(id -u)}
GCS_PORT=${GCS_PORT:-6379}
DASH_PORT=${DASH_PORT:-8265}
CLIENT_PORT=${CLIENT_PORT:-10001}
AGENT_PORT=${AGENT_PORT:-52365}
HEAD_CPUS=${HEAD_CPUS:-1}
WORKER_CPUS=${WORKER_CPUS:-2}
OBJECT_STORE_MB=${OBJECT_STORE_MB:-1024}

# This cluster's processes: every process of this user whose command line names
# RAY_TEMP_DIR (gcs_server, raylets, dashboard and its agents, log monitors...),
# plus their descendants (worker processes rename themselves `ray::...` and so
# hide the temp dir). `ray stop` would kill every Ray process of this user on
# the machine, other people's clusters and local `ray.init()`s included.
cluster_pids() {
  "$PY" - "$RAY_TEMP_DIR" <<'EOF'
import os, re, sys
import psutil
# the temp dir as a whole path component: /tmp/ray-qlora-1000 must not match /tmp/ray-qlora-10001
names = re.compile("|".join(re.escape(t) + r"(?![\w.-])"
                            for t in {sys.argv[1].rstrip("/"), os.path.realpath(sys.argv[1])}))
# one pass over the process table: a descendant search per match would rescan it for each of hundreds
# of workers, and `down` scans again every half second
children, found = {}, set()
for p in psutil.process_iter(["pid", "ppid", "uids", "cmdline"]):
    children.setdefault(p.info["ppid"], []).append(p.pid)
    if p.info["uids"] and p.info["uids"].real == os.getuid() and p.pid != os.getpid() \
            and any(names.search(arg) for arg in (p.info["cmdline"] or [])):
        found.add(p.pid)
todo = list(found)
while todo:
    for c in children.get(todo.pop(), []):
        if c not in found:
            found.add(c)
            todo.append(c)
print(" ".join(str(pid) for pid in sorted(found)))
EOF
}

# Sends signal $1 to the cluster's processes, and to each one that appears
# meanwhile (a node being stopped may still start a worker), once each, until
# none is left or $2 half-seconds have passed; fails if some are left.
signal_until_gone() {
  local sig=$1 pids pid new
  local -A sent=()  # a set: a string searched per pid grows quadratic with hundreds of workers
  for _ in $(seq 1 "$2"); do
    pids=$(cluster_pids)
    [[ -z "$pids" ]] && return 0
    new=()
    for pid in $pids; do
      [[ -n "${sent[$pid]:-}" ]] || { new+=("$pid"); sent[$pid]=1; }
    done
    (( ${#new[@]} )) && { kill "-$sig" "${new[@]}" 2>/dev/null || true; }
    sleep 0.5
  done
  [[ -z "$(cluster_pids)" ]]
}

down() {
  if [[ -z "$(cluster_pids)" ]]; then
    echo "no Ray processes under $RAY_TEMP_DIR"
    return 0
  fi
  # SIGTERM lets the nodes shut down cleanly; what is still there after 10 s
  # gets SIGKILL, and `down` returns only once it is gone (SIGKILL is not
  # instant either), so a check or an `up` right after finds nothing left.
  if ! signal_until_gone TERM 20 && ! signal_until_gone KILL 20; then
    echo "processes still running under $RAY_TEMP_DIR after SIGKILL: $(cluster_pids)" >&2
    return 1
  fi
  echo "cluster under $RAY_TEMP_DIR stopped"
}

up() {
  local workers=${1:-1}
  [[ "$workers" =~ ^[0-9]+$ ]] || { echo "up: N must be a number of worker nodes, got '$workers'" >&2; exit 2; }
  [[ -x "$RAY" ]] || { echo "no $RAY: run 'make install' (or set VENV)" >&2; exit 2; }
  if [[ -n "$(cluster_pids)" ]]; then
    echo "a cluster is already running under $RAY_TEMP_DIR: '$0 down' first (or set RAY_TEMP_DIR)" >&2
    exit 1
  fi
  mkdir -p "$RAY_TEMP_DIR"
  local token_env
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    token_env="RAY_AUTH_TOKEN=<the token you set>"
  else
    # A token of this cluster's own, not ~/.ray/auth_token: other clusters on
    # the machine may use that one.
    if [[ ! -s "$RAY_TEMP_DIR/auth_token" ]]; then
      (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_TEMP_DIR/auth_token")
    fi
    export RAY_AUTH_TOKEN_PATH="$RAY_TEMP_DIR/auth_token"
    token_env="RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  fi
  export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
  export PATH="$VENV/bin:$PATH"   # what the nodes (and so every job's `python`) run
  unset RAY_ADDRESS
  local common=(--node-ip-address 127.0.0.1 --disable-usage-stats
                --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024)))
  "$RAY" start --head --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
    --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
    --num-cpus "$HEAD_CPUS" --temp-dir "$RAY_TEMP_DIR" "${common[@]}" >"$RAY_TEMP_DIR/head.log" 2>&1 \
    || { cat "$RAY_TEMP_DIR/head.log" >&2; down; exit 1; }
  for i in $(seq 1 "$workers"); do
    # Each worker node gets a temp dir of its own. Nodes that share one also share
    # session_*/runtime_resources/, where each node's runtime-env agent unpacks a
    # job's working_dir: a worker unpacking it again replaced the folder the job's
    # driver (on the head) was running in, and the driver died at its next
    # getcwd() (oneMKL's fatal error at `import torch`, or transformers' import).
    "$RAY" start --address "127.0.0.1:$GCS_PORT" --num-cpus "$WORKER_CPUS" \
      --dashboard-agent-listen-port $((AGENT_PORT + i)) --temp-dir "$RAY_TEMP_DIR/worker-$i" "${common[@]}" \
      >"$RAY_TEMP_DIR/worker-$i.log" 2>&1 || { cat "$RAY_TEMP_DIR/worker-$i.log" >&2; down; exit 1; }
  done
  # `ray job submit` right after `ray start` can meet a jobs API or a job agent
  # not up yet: wait for both, so the printed command works at once.
  local ok=""
  for _ in $(seq 1 60); do
    if "$RAY" job list --address "http://127.0.0.1:$DASH_PORT" >/dev/null 2>&1 \
        && "$PY" -c "import urllib.request as u, urllib.error as e, sys
try: u.urlopen('http://127.0.0.1:$AGENT_PORT/', timeout=2)
except e.HTTPError: pass
except OSError: sys.exit(1)" 2>/dev/null; then
      ok=1; break
    fi
    sleep 2
  done
  [[ -n "$ok" ]] || { echo "the jobs API at http://127.0.0.1:$DASH_PORT did not answer within 2 minutes" >&2; down; exit 1; }
  cat <<EOF
cluster up: head ($HEAD_CPUS CPU) + $workers worker(s) ($WORKER_CPUS CPU each), Ray temp dir $RAY_TEMP_DIR
dashboard and jobs API: http://127.0.0.1:$DASH_PORT   (GCS 127.0.0.1:$GCS_PORT)
next, in the shell that submits jobs:
  export RAY_AUTH_MODE=token $token_env
  $RAY job submit --address http://127.0.0.1:$DASH_PORT --working-dir . \\
    --runtime-env-json "\$($PY jobs/runtime_env.py jobs/configs/local-cluster.yaml AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION)" -- \\
    python -m ray_qlora.cli run jobs/configs/local-cluster.yaml --no-wait
  (the AWS_* names pass the local S3 server's dummy keys; README "On a Ray cluster" has the whole path)
stop it with: RAY_TEMP_DIR=$RAY_TEMP_DIR $0 down
EOF
}

case "${1:-}" in
  up|start) up "${2:-1}" ;;
  down|stop) down ;;
  *) echo "usage: $0 up [N] | down   (start/stop are aliases)" >&2; exit 2 ;;
esac
