"""S3 (idle): open many streams, hold them, and see what each costs the server in memory."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from scribe_events.loadgen import procstat
from scribe_events.loadgen.common import (
    Meter,
    Run,
    preflight,
    require_connected,
    server_pid,
    settle_memory,
    verdict,
)
from scribe_events.loadgen.workers import make_pool


async def idle(run: Run, *, hold_s: float) -> dict[str, Any]:
    """Connect ``run.subscribers`` streams, hold them ``hold_s``; RSS before/after gives KiB each.

    Passes when every stream connected and was still open at the end."""
    await preflight(run, publishes=False)
    pid = server_pid(run)
    before = procstat.sample(pid) if pid else None
    pool = make_pool(run.subscriber, run.subscribers, run.processes)
    try:
        connect = await pool.connect()
        require_connected(connect)
        connect.pop("indices")
        settle_memory()
        await asyncio.sleep(run.settle_s)
        with_streams = procstat.sample(pid) if pid else None
        meter = Meter(pid)
        started = time.monotonic()
        lowest = connect["connected"]
        while (elapsed := time.monotonic() - started) < hold_s:
            await asyncio.sleep(min(1.0, hold_s - elapsed))
            _, alive = await pool.poll()
            lowest = min(lowest, alive)
            run.tell(time.monotonic() - started, hold_s, alive)
        usage = meter.finish(processes=run.processes)
        report = await pool.finish()
    except BaseException:
        await pool.cancel()
        raise
    held = report["alive"]
    memory: dict[str, Any] | None = None
    if before is not None and with_streams is not None:
        grown = with_streams.rss_kib - before.rss_kib
        memory = {
            "rss_mib_before": round(before.rss_kib / 1024, 1),
            "rss_mib_connected": round(with_streams.rss_kib / 1024, 1),
            "rss_mib_end": (usage["server"] or {}).get("rss_mib_end"),
            "kib_per_connection": round(grown / connect["connected"], 2),
        }
    result: dict[str, Any] = {
        "scenario": "s3",
        "label": run.label,
        "subscribers": run.subscribers,
        "users": run.subscriber.users,
        "hold_s": hold_s,
        "processes": run.processes,
        "connect": connect,
        "connected": connect["connected"],
        "failed": connect["failed"],
        "seconds_to_connect_all": connect["seconds"],
        "held_at_end": held,
        "held_min": min(lowest, held),
        "drop_errors": report["drop_errors"],
        "events": report["other"] + report["received"] + report["pre"],
        "comment_lines": report["comments"],
        "server_memory": memory,
        **usage,
    }
    reasons = []
    if connect["failed"]:
        reasons.append(f"{connect['failed']} streams failed to connect")
    if held < connect["connected"]:
        reasons.append(f"{connect['connected'] - held} streams dropped during the hold")
    result.update(verdict(reasons))
    return result
