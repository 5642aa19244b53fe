#!/usr/bin/env bash
# Run the shared load generator (../shared/bench, "ssebench") against scribe-events on the embedded
# defaults. Server pinned to CPU 0, ssebench to CPU 1, as the bench README asks.
#   benchmarks/ssebench.sh s1 [rate] [n]      # broadcast to n subscribers (default 50 msg/s, 1000)
#   benchmarks/ssebench.sh s2 [rate] [n]      # each message to one random user
#   benchmarks/ssebench.sh s3 [n]             # idle streams; server KiB per connection
#   benchmarks/ssebench.sh s4                 # resume with Last-Event-ID
# Results are appended to benchmarks/results.jsonl. Needs Go (apt-get install golang-go).
set -euo pipefail
source "$(dirname "$0")/common.sh"
scenario="${1:-s1}"
port="${PORT:-8011}"
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT
export SCRIBE_EVENTS_PORT="$port" SCRIBE_EVENTS_URL="http://127.0.0.1:$port"
bench_setup "${USERS:-1000}"
taskset -c 0 "$SE" serve > server.log 2>&1 &
server=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
common=(-sub-url "http://127.0.0.1:$port/api/v1/events/stream" -sub-header-file tokens.txt
        -pids "server=$server" -json "$here/results.jsonl")
pubargs=(-pub-url "http://127.0.0.1:$port/api/v1/events" -pub-header "Authorization: Bearer $pub")
case "$scenario" in
  s1) taskset -c 1 "$B" fanout -target broadcast -n "${3:-1000}" -rate "${2:-50}" -duration 15s -label "scribe-events S1" \
        "${common[@]}" "${pubargs[@]}" \
        -pub-body '{"type":"bench.tick","broadcast":true,"data":{"ts":{ts},"seq":{seq},"run":{run}}}' ;;
  s2) taskset -c 1 "$B" fanout -target random -n "${3:-1000}" -rate "${2:-2000}" -duration 15s -label "scribe-events S2" \
        "${common[@]}" "${pubargs[@]}" \
        -pub-body '{"type":"bench.tick","user_id":"u{i}","data":{"ts":{ts},"seq":{seq},"run":{run}}}' ;;
  s3) taskset -c 1 "$B" idle -n "${2:-10000}" -hold 10s -label "scribe-events S3" "${common[@]}" ;;
  s4) taskset -c 1 "$B" replay -before 5 -missed 20 -label "scribe-events S4" "${common[@]}" "${pubargs[@]}" \
        -pub-body '{"type":"bench.tick","user_id":"u0","data":{"ts":{ts},"seq":{seq},"run":{run}}}' ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
grep -iE "error|traceback" server.log | head -5 || true
