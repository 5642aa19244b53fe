#!/usr/bin/env bash
# Fan-out through Redis: 1,000 subscribers on instance A, publishing through instance B (or A),
# everything stored in PostgreSQL (several instances need it), Redis on this machine.
#   benchmarks/instances.sh two  [rate=50] [n=1000]   # subscribe on A, publish on B
#   benchmarks/instances.sh one  [rate=50] [n=1000]   # one instance with the Redis broker
# Servers are pinned to CPU 0, the load generator to CPU 1; results go to benchmarks/results.jsonl.
set -euo pipefail
source "$(dirname "$0")/common.sh"
mode="${1:-two}"
rate="${2:-50}"
n="${3:-1000}"
schema="bench_$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -h 127.0.0.1 -d test -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
  redis-cli --scan --pattern "$schema:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
export SCRIBE_EVENTS_DATABASE_URL="postgresql+asyncpg://root@127.0.0.1:5432/test"
export SCRIBE_EVENTS_DATABASE_SCHEMA="$schema" SCRIBE_EVENTS_AUTO_MIGRATE=true
export SCRIBE_EVENTS_REDIS_URL="redis://127.0.0.1:6379/0" SCRIBE_EVENTS_REDIS_PREFIX="$schema:"
bench_setup "$n"
start() {  # name port
  SCRIBE_EVENTS_INSTANCE_ID="$1" SCRIBE_EVENTS_PORT="$2" taskset -c 0 "$SE" serve > "$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$2/health/ready" >/dev/null && return; sleep 0.1; done
  echo "instance $1 did not become ready" >&2; cat "$1.log" >&2; exit 1
}
start a 8021
sub=8021 pubport=8021 measured="a=${pids[0]}"
if [ "$mode" = two ]; then start b 8022; pubport=8022; measured="a=${pids[0]},b=${pids[1]}"; fi
taskset -c 1 "$B" fanout -target broadcast -n "$n" -rate "$rate" -duration 15s -label "scribe-events redis $mode" \
  -sub-url "http://127.0.0.1:$sub/api/v1/events/stream" -sub-header-file tokens.txt \
  -pub-url "http://127.0.0.1:$pubport/api/v1/events" -pub-header "Authorization: Bearer $pub" \
  -pub-body '{"type":"bench.tick","broadcast":true,"data":{"ts":{ts},"seq":{seq},"run":{run}}}' \
  -pids "$measured" -json "$here/results.jsonl"
