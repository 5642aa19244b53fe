# Sourced by the benchmark scripts: paths, the load generator, a work folder, tokens for u0…u(N-1)
# in tokens.txt and a publisher token in $pub. Call `bench_setup N` after setting a trap.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
shared="${SCRIBE_SHARED:-$root/../shared}"
B="${SSEBENCH:-/tmp/ssebench/ssebench}"
PY="${PYTHON:-$root/.venv/bin/python}"
SE="${SCRIBE_EVENTS_BIN:-$root/.venv/bin/scribe-events}"
work="$(mktemp -d)"
export SCRIBE_EVENTS_JWT_SECRET="bench-secret-bench-secret-bench-secret-0123456789"
export SCRIBE_EVENTS_ACCESS_LOG=false SCRIBE_EVENTS_LOG_LEVEL=warning

bench_setup() {
  [ -x "$B" ] || bash "$shared/bench/build.sh" >/dev/null
  ulimit -n "$(ulimit -Hn)"
  cd "$work"
  "$PY" - "$1" > tokens.txt <<'PY'
import os, sys
from scribe_events.auth import mint_token
for i in range(int(sys.argv[1])):
    print("Authorization: Bearer " + mint_token(os.environ["SCRIBE_EVENTS_JWT_SECRET"], f"u{i}", ttl_s=7200))
PY
  pub="$("$SE" token --user bench-publisher --role publisher --ttl 7200)"
}
