"""``publish``: how many events a server accepts, alone or with subscribers to deliver them to.

``concurrency`` keep-alive connections send requests of ``batch`` events, back to back (closed
loop) or at ``rate`` events/s in total (open loop, each request on its own schedule). Event
``seq`` goes to user ``u{seq mod users}``; with subscribers, to subscriber ``seq mod connected``,
and each must arrive there once.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable
from typing import Any

from scribe_events.loadgen.common import (
    POLL_S,
    RATE_HELD,
    START_LEAD_NS,
    Meter,
    Run,
    drain,
    preflight,
    publish_failures,
    require_connected,
    server_pid,
    settle_memory,
    sleep_until,
    verdict,
    watch,
)
from scribe_events.loadgen.publisher import OK, Publisher
from scribe_events.loadgen.receiver import TARGETED, Accounting
from scribe_events.loadgen.workers import Pool, make_pool

# Seqs past this are not ours: the per-seq table grows as events arrive and must stay bounded.
SEQ_LIMIT = 1 << 26


async def throughput(run: Run, *, batch: int, duration_s: float, rate: float | None) -> dict[str, Any]:
    await preflight(run, subscribes=run.subscribers > 0)
    pid = server_pid(run)
    publisher = Publisher(run.publisher)
    pool: Pool | None = make_pool(run.subscriber, run.subscribers, run.processes) if run.subscribers else None
    connect: dict[str, Any] | None = None
    connected: list[int] = []
    try:
        if pool is not None:
            connect = await pool.connect()
            require_connected(connect)
            connected = connect.pop("indices")
            settle_memory()
            await asyncio.sleep(run.settle_s)
        await publisher.open()
        interval = 1e9 * batch / rate if rate else 0.0
        t0 = time.time_ns() + START_LEAD_NS
        until = t0 + int(duration_s * 1e9)
        users = run.publisher.users
        target_of: Callable[[int], int]
        if connected:
            ring = array("i", connected)
            target_of = lambda seq: ring[seq % len(ring)]  # noqa: E731
        else:
            target_of = lambda seq: seq % users  # noqa: E731
        if pool is not None:
            acct = Accounting(TARGETED, t0, interval, batch, array("i", connected).tobytes(), SEQ_LIMIT)
            await pool.start(acct)
        meter = Meter(pid)
        await sleep_until(t0)
        state = bytearray()
        sending = asyncio.ensure_future(publisher.flood(until, batch, target_of, state, t0, interval))
        if pool is not None:
            await watch(run, pool, sending, duration_s, t0)
        else:
            await _watch_alone(run, publisher, sending, duration_s, t0)
        published_ns = time.time_ns()
        report: dict[str, Any] | None = None
        if pool is not None:
            await drain(run, pool, publisher.events_ok, 0, duration_s, t0)
        usage = meter.finish(processes=run.processes)
        if pool is not None:
            report = await pool.finish()
    except BaseException:
        if pool is not None:
            await pool.cancel()
        raise
    finally:
        publisher.close()
    wall = max((published_ns - t0) / 1e9, 1e-9)
    requests = publisher.ok + publisher.failed
    events_per_s = publisher.events_ok / wall
    result: dict[str, Any] = {
        "scenario": "publish",
        "label": run.label,
        "concurrency": run.publisher.connections,
        "batch": batch,
        "duration_s": duration_s,
        "rate_asked": rate,
        "subscribers": run.subscribers,
        "users": users,
        "requests": requests,
        "requests_ok": publisher.ok,
        "requests_failed": publisher.failed,
        "events_accepted": publisher.events_ok,
        "requests_per_s": round(publisher.ok / wall, 1),
        "events_per_s": round(events_per_s, 1),
        "statuses": dict(publisher.statuses),
        "latency": publisher.http_latency.summary(),
        "latency_corrected": publisher.corrected.summary() if rate else None,
        "rate_held": (events_per_s >= RATE_HELD * rate) if rate else None,
        "connect": connect,
        **usage,
    }
    reasons = publish_failures(dict(publisher.statuses), publisher.failed, 0)
    if rate and not result["rate_held"]:
        reasons.append(f"rate not held: {events_per_s:.0f} of {rate:g} events/s")
    if report is not None and connect is not None:
        usage["loadgen"]["cpu_s"] += round(report["cpu_s"], 2)
        usage["loadgen"]["cpu_pct"] = round(100 * usage["loadgen"]["cpu_s"] / usage["wall_s"], 1)
        result.update(_delivery(report, state, publisher.events_ok, t0, wall))
        if connect["failed"]:
            reasons.append(f"{connect['failed']} subscribers failed to connect")
        if result["lost"]:
            reasons.append(f"{result['lost']} events lost")
        if result["misrouted"]:
            reasons.append(f"{result['misrouted']} events reached the wrong subscriber")
    result.update(verdict(reasons))
    return result


async def _watch_alone(
    run: Run, publisher: Publisher, task: asyncio.Future[None], planned_s: float, t0: int
) -> None:
    while not task.done():
        await asyncio.wait([task], timeout=POLL_S)
        run.tell((time.time_ns() - t0) / 1e9, planned_s, publisher.events_ok)
    task.result()


def _delivery(
    report: dict[str, Any], state: bytearray, expected: int, t0: int, wall: float
) -> dict[str, Any]:
    counts = report["counts"]
    good = extra = late = 0
    for seq, sent in enumerate(state):
        n = counts[seq] if seq < len(counts) else 0
        if sent != OK:
            late += n
        else:
            good += min(n, 1)
            extra += max(n - 1, 0)
    window = max(wall, (report["last_ns"] - t0) / 1e9)
    return {
        "expected": expected,
        "received": report["received"],
        "lost": expected - good,
        "duplicated": report["duplicated"] + extra,
        "misrouted": report["misrouted"],
        "from_failed_publishes": late,
        "delivered_per_s": round(report["received"] / window, 1),
        "delivery_latency": report["latency"].summary(),
        "delivery_latency_corrected": report["corrected"].summary(),
    }
