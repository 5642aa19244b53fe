"""S1 (broadcast) and S2 (targeted): subscribers connected, messages published at a fixed rate.

The semantics are ssebench's ``fanout``: message ``seq`` is scheduled at ``t0 + seq / rate``; a
broadcast message is expected once at every connected subscriber, a targeted one once at the
subscriber it was addressed to (picked at random among the connected). Latency is receive time
minus the send time carried in the event, and, corrected for coordinated omission, minus its
scheduled time. A run passes when nothing is lost or misrouted, every publish succeeded in time,
the rate held and the corrected p99 is under 100 ms (or the limit given).
"""

from __future__ import annotations

import asyncio
import random
import time
from array import array
from typing import Any

from scribe_events.loadgen.common import (
    P99_LIMIT_MS,
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
from scribe_events.loadgen.receiver import BROADCAST, TARGETED, Accounting
from scribe_events.loadgen.workers import make_pool


async def fanout(
    run: Run, *, broadcast: bool, rate: float, duration_s: float, p99_limit_ms: float = P99_LIMIT_MS
) -> dict[str, Any]:
    await preflight(run)
    total = max(1, int(rate * duration_s))
    pid = server_pid(run)
    pool = make_pool(run.subscriber, run.subscribers, run.processes)
    publisher = Publisher(run.publisher)
    try:
        connect = await pool.connect()
        require_connected(connect)
        connected = connect.pop("indices")
        settle_memory()
        await asyncio.sleep(run.settle_s)
        await publisher.open()
        interval = 1e9 / rate
        targets = array("i") if broadcast else array("i", random.choices(connected, k=total))
        t0 = time.time_ns() + START_LEAD_NS
        mode = BROADCAST if broadcast else TARGETED
        await pool.start(Accounting(mode, t0, interval, 1, targets.tobytes(), limit=total))
        meter = Meter(pid)
        await sleep_until(t0)
        state = bytearray(total)
        target_of = (lambda seq: 0) if broadcast else targets.__getitem__
        sending = asyncio.ensure_future(
            publisher.schedule(total, interval, t0, int(run.grace_s * 1e9), target_of, state)
        )
        received = await watch(run, pool, sending, duration_s, t0)
        published_ns = time.time_ns()
        expected = publisher.ok * (len(connected) if broadcast else 1)
        received = await drain(run, pool, expected, received, duration_s, t0)
        usage = meter.finish(processes=run.processes)
        report = await pool.finish()
    except BaseException:
        await pool.cancel()
        raise
    finally:
        publisher.close()
    usage["loadgen"]["cpu_s"] += round(report["cpu_s"], 2)
    usage["loadgen"]["cpu_pct"] = round(100 * usage["loadgen"]["cpu_s"] / usage["wall_s"], 1)
    want = len(connected) if broadcast else 1
    good = late = extra = 0
    counts = report["counts"]
    for seq in range(total):
        n = counts[seq] if seq < len(counts) else 0
        if state[seq] != OK:
            late += n
            continue
        if n > want:
            extra += n - want
            n = want
        good += n
    publish_wall = max((published_ns - t0) / 1e9, 1e-9)
    window = max(publish_wall, (report["last_ns"] - t0) / 1e9)
    achieved = (publisher.ok + publisher.failed) / publish_wall
    latency, corrected = report["latency"].summary(), report["corrected"].summary()
    lost = expected - good
    result: dict[str, Any] = {
        "scenario": "s1" if broadcast else "s2",
        "label": run.label,
        "target": "broadcast" if broadcast else "random",
        "subscribers": run.subscribers,
        "users": run.subscriber.users,
        "rate": rate,
        "duration_s": duration_s,
        "processes": run.processes,
        "connect": connect,
        "publish": {
            "planned": total,
            "ok": publisher.ok,
            "errors": publisher.failed,
            "skipped": publisher.skipped,
            "statuses": dict(publisher.statuses),
            "rate_asked": rate,
            "rate_achieved": round(achieved, 2),
            "rate_held": achieved >= RATE_HELD * rate,
            "http_latency": publisher.http_latency.summary(),
            "dispatch_lag": publisher.lag.summary(),
        },
        "expected": expected,
        "received": report["received"],
        "lost": lost,
        "loss_pct": round(100 * lost / expected, 3) if expected else 0.0,
        "duplicated": report["duplicated"] + extra,
        "misrouted": report["misrouted"],
        "other_events": report["other"],
        "comment_lines": report["comments"],
        "pre_phase_events": report["pre"],
        "from_failed_publishes": late,
        "subscribers_dropped": len(connected) - report["alive"],
        "drop_errors": report["drop_errors"],
        "delivered_per_s": round(report["received"] / window, 1),
        "delivery_window_s": round(window, 3),
        "latency": latency,
        "latency_corrected": corrected,
        **usage,
    }
    reasons = publish_failures(dict(publisher.statuses), publisher.failed, publisher.skipped)
    if connect["failed"]:
        reasons.append(f"{connect['failed']} subscribers failed to connect")
    if lost:
        reasons.append(f"{lost} events lost")
    if report["misrouted"]:
        reasons.append(f"{report['misrouted']} events reached the wrong subscriber")
    if not result["publish"]["rate_held"]:
        reasons.append(f"rate not held: {achieved:.1f} of {rate:g} msg/s")
    if corrected["p99_ms"] >= p99_limit_ms:
        reasons.append(f"corrected p99 {corrected['p99_ms']:.1f} ms >= {p99_limit_ms:g} ms")
    result.update(verdict(reasons))
    return result
