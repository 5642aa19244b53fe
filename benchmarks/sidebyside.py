"""Every scenario of issue 13 against Nchan and scribe-events in one run, with the shared load
generator (``../shared/bench``, ssebench): the rows of BENCHMARKS.md.

    .venv/bin/python benchmarks/sidebyside.py [--quick] [--only s1,s2,s3,s4,pg,two] > table.md
    .venv/bin/python benchmarks/sidebyside.py --only s1 --s1-rates 40,50,60 --live-only   # the events
        not stored (``persist: false``): what storing each one before it is sent costs

Servers run on CPU 0 and ssebench on CPU 1, as the bench README asks. Nchan is started from the
machine's nginx with its nchan module (``apt-get install nginx libnginx-mod-nchan``) when it is
there, with ``../shared/bench/nginx-nchan-mem.conf``; without it the Nchan column says so.
scribe-events is started as a user would (``scribe-events serve``) on the embedded defaults, and on
PostgreSQL + Redis for the rows that name them. A knee is searched upwards: the highest rate of the
list that passes (nothing lost, the rate held, corrected p99 < 100 ms); the search stops at the first
rate that fails twice in a row. Each server first gets a short warm-up run (not counted). Every
ssebench result is also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("SCRIBE_SHARED", ROOT.parent / "shared"))
SSEBENCH = Path(os.environ.get("SSEBENCH", "/tmp/ssebench/ssebench"))
SE = ROOT / ".venv" / "bin" / "scribe-events"
PY = ROOT / ".venv" / "bin" / "python"
SECRET = "bench-secret-bench-secret-bench-secret-0123456789"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
PG = "postgresql+asyncpg://root@127.0.0.1:5432/test"
TICK = '{"type":"bench.tick",%s,"data":{"ts":{ts},"seq":{seq},"run":{run}}}'


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def wait_http(url: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


class Run:
    def __init__(self, work: Path, users: int) -> None:
        self.work = work
        env = {**os.environ, "SCRIBE_EVENTS_JWT_SECRET": SECRET}
        script = (
            "import sys\nfrom scribe_events.auth import mint_token\n"
            f"for i in range({users}):\n"
            f"    print('Authorization: Bearer ' + mint_token({SECRET!r}, f'u{{i}}', ttl_s=7200))\n"
        )
        (work / "tokens.txt").write_text(subprocess.check_output([str(PY), "-c", script], env=env, text=True))
        self.pub = subprocess.check_output(
            [str(SE), "token", "--user", "bench-publisher", "--role", "publisher", "--ttl", "7200"],
            env=env,
            text=True,
        ).strip()

    def ssebench(self, mode: str, *args: str, pid: int | None = None) -> dict[str, Any]:
        out = self.work / f"result-{secrets.token_hex(4)}.jsonl"
        cmd = ["taskset", "-c", "1", str(SSEBENCH), mode, *args, "-json", str(out)]
        if pid is not None:
            cmd += ["-pids", f"server={pid}"]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=False)
        if not out.exists():
            raise RuntimeError(f"ssebench {mode} wrote no result")
        line = out.read_text().strip().splitlines()[-1]
        with (HERE / "results.jsonl").open("a") as f:
            f.write(line + "\n")
        return dict(json.loads(line))


@contextlib.contextmanager
def nchan(work: Path) -> Iterator[int | None]:
    if shutil.which("nginx") is None or not NCHAN_MODULE.exists():
        yield None
        return
    prefix = Path("/tmp/yardstick/nginx")
    prefix.mkdir(parents=True, exist_ok=True)
    conf = SHARED / "bench" / "nginx-nchan-mem.conf"
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            "nginx",
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # nginx answers at once; its worker is what is measured
        worker = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        yield int(worker[0]) if worker else proc.pid
    finally:
        proc.send_signal(signal.SIGQUIT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


@contextlib.contextmanager
def scribe(work: Path, port: int, *, pg: bool = False) -> Iterator[int]:
    env = {
        **os.environ,
        "SCRIBE_EVENTS_JWT_SECRET": SECRET,
        "SCRIBE_EVENTS_PORT": str(port),
        "SCRIBE_EVENTS_URL": f"http://127.0.0.1:{port}",
        "SCRIBE_EVENTS_ACCESS_LOG": "false",
        "SCRIBE_EVENTS_LOG_LEVEL": "warning",
    }
    schema = None
    if pg:
        schema = "bench_" + secrets.token_hex(4)
        env |= {
            "SCRIBE_EVENTS_DATABASE_URL": PG,
            "SCRIBE_EVENTS_DATABASE_SCHEMA": schema,
            "SCRIBE_EVENTS_AUTO_MIGRATE": "true",
            "SCRIBE_EVENTS_REDIS_URL": "redis://127.0.0.1:6379/0",
            "SCRIBE_EVENTS_REDIS_PREFIX": f"{schema}:",
        }
    home = Path(tempfile.mkdtemp(dir=work))
    with (home / "server.log").open("w") as logfile:
        proc = subprocess.Popen(
            ["taskset", "-c", "0", str(SE), "serve"], cwd=home, env=env, stdout=logfile, stderr=logfile
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health/ready", 30)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if schema is not None:
            subprocess.run(
                ["psql", "-h", "127.0.0.1", "-d", "test", "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE"],
                capture_output=True,
            )
            keys = subprocess.run(
                ["redis-cli", "--scan", "--pattern", f"{schema}:*"], capture_output=True, text=True
            ).stdout.split()
            if keys:
                subprocess.run(["redis-cli", "del", *keys], capture_output=True)


def fanout(
    run: Run,
    base: str,
    sub: str,
    pub: str,
    target: str,
    rate: int,
    pid: int | None,
    *,
    nchan_: bool,
    n: int = 1000,
) -> dict[str, Any]:
    args = [
        "-target",
        target,
        "-n",
        str(n),
        "-rate",
        str(rate),
        "-duration",
        "15s",
        "-label",
        f"{base} {target} {rate}",
    ]
    audience = '"broadcast":true' if target == "broadcast" else '"user_id":"u{i}"'
    args += endpoints(run, sub, pub, audience, nchan_=nchan_)
    return run.ssebench("fanout", *args, pid=pid)


def endpoints(run: Run, sub: str, pub: str, audience: str, *, nchan_: bool) -> list[str]:
    """ssebench's stream and publish arguments: Nchan's bare channels, or scribe-events with the
    users' tokens, the publisher's and a ``bench.tick`` for ``audience``."""
    if nchan_:
        return ["-sub-url", sub, "-pub-url", pub, "-pub-body", '{"ts":{ts},"seq":{seq},"run":{run}}']
    return [
        "-sub-url",
        sub,
        "-sub-header-file",
        str(run.work / "tokens.txt"),
        "-pub-url",
        pub,
        "-pub-header",
        f"Authorization: Bearer {run.pub}",
        "-pub-body",
        TICK % audience,
    ]


def warm_up(run: Run, sub: str, pub: str, pid: int | None, *, nchan_: bool) -> None:
    """A short broadcast before measuring: the first run against a fresh server is slow."""
    args = ["-target", "broadcast", "-n", "200", "-rate", "20", "-duration", "4s", "-label", "warm-up"]
    args += endpoints(run, sub, pub, '"broadcast":true', nchan_=nchan_)
    subprocess.run(
        ["taskset", "-c", "1", str(SSEBENCH), "fanout", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


def knee(label: str, rates: list[int], attempt: Any) -> dict[str, Any]:
    """Rates upwards until one fails: each rate's result, and the highest that passed."""
    results: dict[int, dict[str, Any]] = {}
    best = None
    for rate in rates:
        r = attempt(rate)
        ok = bool(r.get("pass_p99_lt_100ms_zero_loss"))
        if not ok:  # the machine is shared: a rate fails only if it fails twice
            log(f"  {label} {rate}/s failed once (p99 {r['latency_from_schedule']['p99_ms']:.0f} ms); again")
            r = attempt(rate)
            ok = bool(r.get("pass_p99_lt_100ms_zero_loss"))
        results[rate] = r
        log(
            f"  {label} {rate}/s: {'PASS' if ok else 'FAIL'} p99(CO) {r['latency_from_schedule']['p99_ms']:.1f} ms, "
            f"achieved {r['publish_rate_achieved']:.0f}/s, lost {r['events_lost']}"
        )
        if not ok:
            break
        best = rate
    return {"knee": best, "runs": results}


def summary(r: dict[str, Any]) -> dict[str, Any]:
    if r.get("mode") == "fanout":
        server = next((c for c in r.get("cpu", []) if c["name"] == "server"), {})
        return {
            "pass": r.get("pass_p99_lt_100ms_zero_loss"),
            "p50_ms": r["latency"]["p50_ms"],
            "p99_ms": r["latency_from_schedule"]["p99_ms"],
            "achieved": r["publish_rate_achieved"],
            "delivered_per_s": r["delivered_events_per_s"],
            "lost": r["events_lost"],
            "server_cpu_pct": server.get("cpu_pct"),
        }
    return r


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="s1,s2,s3,s4,pg", help="comma-separated: s1,s2,s3,s4,pg")
    parser.add_argument("--quick", action="store_true", help="fewer rates (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the whole result here")
    parser.add_argument("--s1-rates", help="comma-separated S1 rates instead of the default list")
    parser.add_argument(
        "--live-only", action="store_true", help="scribe-events' ticks are live-only (persist: false)"
    )
    opts = parser.parse_args()
    only = set(opts.only.split(","))
    if not SSEBENCH.exists():
        subprocess.run(["bash", str(SHARED / "bench" / "build.sh")], check=True, stdout=subprocess.DEVNULL)
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = Run(work, 1000)
        sub, pub = "http://127.0.0.1:{port}/api/v1/events/stream", "http://127.0.0.1:{port}/api/v1/events"
        s1_rates = [85, 130, 160] if opts.quick else [40, 50, 60, 70, 85, 100, 130, 160, 200]
        if opts.s1_rates:
            s1_rates = [int(r) for r in opts.s1_rates.split(",")]
        global TICK
        if opts.live_only:
            TICK = TICK.replace('"data"', '"persist":false,"data"')
        s2_rates = [1000, 2000] if opts.quick else [1000, 1500, 2000, 2500, 3000, 5000]
        if "s1" in only or "s2" in only or "s3" in only or "s4" in only:
            with nchan(work) as npid:
                out["nchan"] = npid is not None
                if npid is not None:
                    log("Nchan")
                    warm_up(
                        run,
                        "http://127.0.0.1:8080/sub/warm",
                        "http://127.0.0.1:8080/pub/warm",
                        npid,
                        nchan_=True,
                    )
                    if "s1" in only:
                        out["s1_nchan"] = knee(
                            "nchan S1",
                            s1_rates,
                            lambda rate: fanout(
                                run,
                                "nchan S1",
                                "http://127.0.0.1:8080/sub/broadcast",
                                "http://127.0.0.1:8080/pub/broadcast",
                                "broadcast",
                                rate,
                                npid,
                                nchan_=True,
                            ),
                        )
                    if "s2" in only:
                        out["s2_nchan"] = knee(
                            "nchan S2",
                            [5000] if opts.quick else [5000, 20000],
                            lambda rate: fanout(
                                run,
                                "nchan S2",
                                "http://127.0.0.1:8080/sub/u{i}",
                                "http://127.0.0.1:8080/pub/u{i}",
                                "random",
                                rate,
                                npid,
                                nchan_=True,
                            ),
                        )
                    if "s3" in only:
                        out["s3_nchan"] = run.ssebench(
                            "idle",
                            "-n",
                            "10000",
                            "-hold",
                            "10s",
                            "-label",
                            "nchan S3",
                            "-sub-url",
                            "http://127.0.0.1:8080/sub/idle{i}",
                            pid=npid,
                        )
                    if "s4" in only:
                        out["s4_nchan"] = run.ssebench(
                            "replay",
                            "-n",
                            "10",
                            "-before",
                            "5",
                            "-missed",
                            "10000",
                            "-label",
                            "nchan S4",
                            "-sub-url",
                            "http://127.0.0.1:8080/sub/replay",
                            "-pub-url",
                            "http://127.0.0.1:8080/pub/replay",
                            pid=npid,
                        )
            port = 8031
            with scribe(work, port) as spid:
                log("scribe-events (embedded)")
                s, p = sub.format(port=port), pub.format(port=port)
                warm_up(run, s, p, spid, nchan_=False)
                if "s1" in only:
                    out["s1"] = knee(
                        "scribe S1",
                        s1_rates,
                        lambda rate: fanout(
                            run, "scribe-events S1", s, p, "broadcast", rate, spid, nchan_=False
                        ),
                    )
                if "s2" in only:
                    out["s2"] = knee(
                        "scribe S2",
                        s2_rates,
                        lambda rate: fanout(
                            run, "scribe-events S2", s, p, "random", rate, spid, nchan_=False
                        ),
                    )
            if "s3" in only:
                with scribe(work, port + 1) as spid:
                    out["s3"] = run.ssebench(
                        "idle",
                        "-n",
                        "10000",
                        "-hold",
                        "10s",
                        "-label",
                        "scribe-events S3",
                        "-sub-url",
                        sub.format(port=port + 1),
                        "-sub-header-file",
                        str(work / "tokens.txt"),
                        pid=spid,
                    )
            if "s4" in only:
                with scribe(work, port + 2) as spid:
                    out["s4"] = run.ssebench(
                        "replay",
                        "-n",
                        "10",
                        "-before",
                        "5",
                        "-missed",
                        "10000",
                        "-label",
                        "scribe-events S4",
                        "-sub-url",
                        sub.format(port=port + 2),
                        "-sub-header-file",
                        str(work / "tokens.txt"),
                        "-pub-url",
                        pub.format(port=port + 2),
                        "-pub-header",
                        f"Authorization: Bearer {run.pub}",
                        "-pub-body",
                        TICK % '"user_id":"u0"',
                        pid=spid,
                    )
        if "pg" in only:
            port = 8041
            with scribe(work, port, pg=True) as spid:
                log("scribe-events (PostgreSQL + Redis)")
                s, p = sub.format(port=port), pub.format(port=port)
                warm_up(run, s, p, spid, nchan_=False)
                out["pg_s2"] = knee(
                    "scribe PG S2",
                    s2_rates,
                    lambda rate: fanout(
                        run, "scribe-events PG+Redis S2", s, p, "random", rate, spid, nchan_=False
                    ),
                )
                out["pg_s1"] = knee(
                    "scribe PG S1",
                    s1_rates,
                    lambda rate: fanout(
                        run, "scribe-events PG+Redis S1", s, p, "broadcast", rate, spid, nchan_=False
                    ),
                )
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=1))
    print(
        json.dumps(
            {
                k: (
                    {"knee": v["knee"], "runs": {r: summary(x) for r, x in v["runs"].items()}}
                    if isinstance(v, dict) and "knee" in v
                    else v
                )
                for k, v in out.items()
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
