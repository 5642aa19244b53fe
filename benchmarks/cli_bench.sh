#!/usr/bin/env bash
# `scribe-events bench` against `scribe-events serve` on the embedded defaults (server on CPU 0,
# generator on CPU 1): S1 beside ssebench's S1 in the same run, the replay of 10,000 missed
# events, the batch endpoint and the SDK's batches. One JSON line per measurement on stdout.
#   benchmarks/cli_bench.sh [s1-rate=40]
set -euo pipefail
source "$(dirname "$0")/common.sh"
port="${PORT:-8051}"
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT
export SCRIBE_EVENTS_PORT="$port" SCRIBE_EVENTS_URL="http://127.0.0.1:$port"
bench_setup 1000
taskset -c 0 "$SE" serve > server.log 2>&1 &
server=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
rate="${1:-40}"
bench() { taskset -c 1 "$SE" bench "$@" --pid "$server" --json || true; }
bench s1 -n 200 --rate 20 --duration 4 >/dev/null   # warm-up
bench s1 -n 1000 --rate "$rate" --duration 15 --label "scribe-events bench s1 $rate"
taskset -c 1 "$B" fanout -target broadcast -n 1000 -rate "$rate" -duration 15s -label "ssebench s1 $rate" \
  -sub-url "http://127.0.0.1:$port/api/v1/events/stream" -sub-header-file tokens.txt \
  -pub-url "http://127.0.0.1:$port/api/v1/events" -pub-header "Authorization: Bearer $pub" \
  -pub-body '{"type":"bench.tick","broadcast":true,"data":{"ts":{ts},"seq":{seq},"run":{run}}}' \
  -pids "server=$server" -json "$here/results.jsonl" > ssebench.txt
tail -1 "$here/results.jsonl"
bench s4 -n 1 --missed 10000 --label "replay 10,000 missed, one subscriber"
bench s4 -n 10 --missed 10000 --label "replay 10,000 missed, ten subscribers"
bench publish --concurrency 32 --duration 10 --label "single publishes, 32 connections"
bench publish --concurrency 8 --batch 100 --duration 10 --label "batches of 100, 8 connections"
bench publish --concurrency 4 --batch 1000 --duration 10 --label "batches of 1000, 4 connections"
taskset -c 1 "$PY" "$here/sdk_batch.py" "http://127.0.0.1:$port" 1000 4 10
grep -iE "error|traceback" server.log | head -5 >&2 || true
