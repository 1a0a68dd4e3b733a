#!/usr/bin/env bash
# A local multi-process Ray cluster (head + one worker) with token auth on,
# to try `ray job submit` on a laptop:
#   cluster/local-cluster.sh start   # prints the address and the token to use
#   cluster/local-cluster.sh stop
set -euo pipefail
RAY=${RAY:-.venv/bin/ray}
DASH_PORT=${DASH_PORT:-8265}
GCS_PORT=${GCS_PORT:-6379}
export RAY_AUTH_MODE=token
case "${1:-}" in
  start)
    "$RAY" start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
      --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --num-cpus "${HEAD_CPUS:-1}" --disable-usage-stats
    "$RAY" start --address "127.0.0.1:$GCS_PORT" --node-ip-address 127.0.0.1 --num-cpus "${WORKER_CPUS:-2}"
    echo "cluster up: export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:$DASH_PORT"
    echo "the token is in ~/.ray/auth_token (or RAY_AUTH_TOKEN if you set one)" ;;
  stop)
    "$RAY" stop --force ;;
  *)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
