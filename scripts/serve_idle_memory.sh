#!/usr/bin/env bash
# The resident memory of an idle `sdfix serve` after one request: the worker hands the run's freed
# memory back to the OS once its queue is empty (`engine::release_idle_memory`), so an idle server
# holds its weights, not its last peak. Prints the HTTP status, the peak (VmHWM) and the resident
# size (VmRSS) three seconds after the reply.
#
#   .venv-oracle/bin/python scripts/make_random_model.py --arch sd2.1-base --out /tmp/sd21base-random
#   bash scripts/serve_idle_memory.sh target/release/sdfix /tmp/sd21base-random
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: serve_idle_memory.sh SDFIX MODEL" >&2; exit 2; }
sdfix=$1 model=$2
port=$((20000 + RANDOM % 10000))
log=$(mktemp)
"$sdfix" serve --model "$model" --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 120); do
  curl -sf "127.0.0.1:$port/sdapi/v1/sd-models" >/dev/null && break
  kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 1
done
curl -s -X POST "127.0.0.1:$port/sdapi/v1/txt2img" -H 'content-type: application/json' \
  -d '{"prompt":"a cat","steps":1,"width":384,"height":384,"seed":1}' -o /dev/null -w "HTTP %{http_code} "
sleep 3
grep -E "VmHWM|VmRSS" "/proc/$pid/status" | tr -s ' \t\n' ' '
echo
