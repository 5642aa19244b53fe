"""What every scenario shares: the run's description, reaching the server, its process, the verdict."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scribe_events.loadgen import procstat
from scribe_events.loadgen.errors import LoadgenError
from scribe_events.loadgen.http import Connection, Endpoint, HTTPError
from scribe_events.loadgen.publisher import PublishSpec
from scribe_events.loadgen.receiver import SubscriberSpec
from scribe_events.loadgen.workers import Pool

# Called a few times a second: seconds elapsed, seconds planned, events received so far.
Progress = Callable[[float, float, int], None]

P99_LIMIT_MS = 100.0  # ssebench's rule: a run passes when the corrected p99 is below this
RATE_HELD = 0.98  # ... and at least this share of the asked publish rate was achieved
POLL_S = 0.25
START_LEAD_NS = 100_000_000  # the receivers learn t0 this long before it comes
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "[::1]")


@dataclass(frozen=True, slots=True)
class Run:
    """One benchmark run against a server: who subscribes, how to publish, how to measure."""

    subscriber: SubscriberSpec
    publisher: PublishSpec
    subscribers: int
    processes: int = 1
    label: str = ""
    pid: int | None = None  # the server's process; None: the one listening on the stream's port
    settle_s: float = 1.0  # after everyone connected (the server may still be subscribing them)
    drain_s: float = 5.0  # after the last publish, how long to wait for stragglers
    grace_s: float = 1.0  # a publish still queued this long after the end is skipped
    progress: Progress | None = field(default=None, compare=False)

    def tell(self, elapsed: float, planned: float, received: int) -> None:
        if self.progress is not None:
            self.progress(elapsed, planned, received)


async def preflight(run: Run, *, subscribes: bool = True, publishes: bool = True) -> None:
    """Fail fast, with one line, when the server is not there."""
    urls = ([run.subscriber.url] if subscribes else []) + ([run.publisher.url] if publishes else [])
    seen = set()
    for url in urls:
        endpoint = Endpoint.parse(url.replace("{i}", "0").replace("{user}", "u0"))
        if (endpoint.host, endpoint.port) in seen:
            continue
        seen.add((endpoint.host, endpoint.port))
        conn = Connection(endpoint, timeout_s=5.0)
        try:
            await conn.open()
        except HTTPError as exc:
            raise LoadgenError(f"cannot reach {endpoint.host}:{endpoint.port}: {exc}") from None
        finally:
            conn.close()


def server_pid(run: Run) -> int | None:
    if run.pid is not None:
        return run.pid
    endpoint = Endpoint.parse(run.subscriber.url.replace("{i}", "0").replace("{user}", "u0"))
    if endpoint.host not in LOCAL_HOSTS:
        return None
    return procstat.listener_pid(endpoint.port)


def require_connected(connect: dict[str, Any]) -> None:
    if connect["connected"] == 0:
        errors = connect["errors"]
        top = ", ".join(f"{n}x {kind}" for kind, n in sorted(errors.items(), key=lambda kv: -kv[1])[:3])
        raise LoadgenError(f"no subscriber connected ({top or 'no answer'})")


def settle_memory() -> None:
    """What the open connections hold is never garbage: keep it out of the collector's passes, so a
    full collection does not pause the receivers (and show up as latency)."""
    gc.collect()
    gc.freeze()


async def sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.time_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


class Meter:
    """The server's and our own CPU over a stretch of wall time."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.server_before = procstat.sample(pid) if pid else None
        self.own_before = procstat.own_cpu_s()
        self.started = time.perf_counter()

    def finish(self, extra_own_cpu_s: float = 0.0, processes: int = 1) -> dict[str, Any]:
        wall = time.perf_counter() - self.started
        after = procstat.sample(self.pid) if self.pid else None
        own = procstat.own_cpu_s() - self.own_before + extra_own_cpu_s
        return {
            "wall_s": round(wall, 3),
            "server": procstat.usage(self.server_before, after, wall),
            "loadgen": {
                "cpu_pct": round(100 * own / wall, 1),
                "cpu_s": round(own, 2),
                "processes": processes,
            },
        }


def verdict(reasons: list[str]) -> dict[str, Any]:
    return {"pass": not reasons, "fail_reasons": reasons}


def publish_failures(statuses: dict[str, int], failed: int, skipped: int) -> list[str]:
    reasons = []
    if failed:
        kinds = ", ".join(f"{n}x {k}" for k, n in statuses.items() if not k.startswith("2"))
        reasons.append(f"{failed} publish errors ({kinds})")
    if skipped:
        reasons.append(f"{skipped} publishes skipped (the publisher fell behind)")
    return reasons


async def watch(run: Run, pool: Pool, task: asyncio.Future[None], planned_s: float, t0: int) -> int:
    received = 0
    while not task.done():
        await asyncio.wait([task], timeout=POLL_S)
        received, _ = await pool.poll()
        run.tell((time.time_ns() - t0) / 1e9, planned_s, received)
    task.result()
    return received


async def drain(run: Run, pool: Pool, expected: int, received: int, planned_s: float, t0: int) -> int:
    deadline = time.monotonic() + run.drain_s
    while received < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        received, _ = await pool.poll()
        run.tell((time.time_ns() - t0) / 1e9, planned_s, received)
    return received
