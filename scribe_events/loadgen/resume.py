"""S4 (resume): receive, disconnect, miss events, reconnect with ``Last-Event-ID``, get them all.

Each subscriber has a user (or channel) of its own. It receives ``before`` events, disconnects;
``missed`` more are published to it meanwhile (in batches of ``{"events": [...]}`` where the server
takes them, each subscriber's in order over one connection); it reconnects with the last id it
saw, and the time from its reconnect until the last missed event arrived is its resume time.
A run passes when every subscriber got every missed event once, in order, nothing it had already
seen came again, and a live event published afterwards arrived too.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from scribe_events.loadgen import stats
from scribe_events.loadgen.common import (
    Meter,
    Run,
    preflight,
    publish_failures,
    require_connected,
    server_pid,
    verdict,
)
from scribe_events.loadgen.publisher import Publisher
from scribe_events.loadgen.receiver import Subscriber
from scribe_events.loadgen.workers import Receivers, merge_connect


async def resume(
    run: Run, *, before: int, missed: int, batch: int, wait_s: float, away_s: float
) -> dict[str, Any]:
    await preflight(run)
    n = run.subscribers
    pid = server_pid(run)
    publisher = Publisher(run.publisher)
    first = Receivers(run.subscriber, range(n))
    second = Receivers(run.subscriber, range(n))
    first.track = second.track = True
    first.want = before
    second.floor, second.want = before, missed
    try:
        connect = merge_connect([await first.connect()])
        require_connected(connect)
        await asyncio.sleep(run.settle_s)
        await publisher.open()
        await publisher.lanes(_lanes(publisher, n, range(before), batch))
        await _until(lambda: all(s.got >= before for s in first.subs if s.alive), wait_s)
        received_before = [len(s.seqs) for s in first.subs]
        last_ids = {s.idx: s.last_id for s in first.subs if s.last_id is not None}
        await first.close()
        await asyncio.sleep(away_s)
        meter = Meter(pid)
        started = time.perf_counter()
        await publisher.lanes(_lanes(publisher, n, range(before, before + missed), batch))
        publish_s = time.perf_counter() - started
        # The resume clock of a subscriber starts when it dials again (Subscriber.started).
        reconnect = merge_connect([await second.connect(last_ids)])

        def tick(elapsed: float) -> None:
            run.tell(elapsed, wait_s, sum(s.got for s in second.subs))

        await _until(lambda: all(s.got >= missed for s in second.subs if s.alive), wait_s, tick)
        live = before + missed
        for sub in second.subs:
            sub.floor, sub.got, sub.want = live, 0, 1
        await publisher.lanes(_lanes(publisher, n, [live], 1))
        await _until(lambda: all(s.got >= 1 for s in second.subs if s.alive), min(wait_s, 5.0))
        usage = meter.finish()
    finally:
        publisher.close()
        await first.close()
        await second.close()
    return _result(
        run,
        connect,
        reconnect,
        first.subs,
        second.subs,
        received_before,
        last_ids,
        before=before,
        missed=missed,
        batch=batch,
        publish_s=publish_s,
        usage=usage,
        publisher=publisher,
    )


def _lanes(publisher: Publisher, n: int, seqs: Iterable[int], batch: int) -> list[list[tuple[bytes, int]]]:
    """Per subscriber, its requests for ``seqs``: ``batch`` events each."""
    seqs = list(seqs)
    lanes = []
    for i in range(n):
        lane = []
        for at in range(0, len(seqs), batch):
            part = seqs[at : at + batch]
            ts = time.time_ns()
            body = publisher.batch_body([publisher.event(seq, i, ts) for seq in part])
            lane.append((publisher.request(body, part[0], i, ts), len(part)))
        lanes.append(lane)
    return lanes


async def _until(
    done: Callable[[], bool], timeout_s: float, tick: Callable[[float], None] | None = None
) -> None:
    started = time.monotonic()
    while not done() and (elapsed := time.monotonic() - started) < timeout_s:
        await asyncio.sleep(0.005)
        if tick is not None:
            tick(elapsed)


def _result(
    run: Run,
    connect: dict[str, Any],
    reconnect: dict[str, Any],
    first: list[Subscriber],
    second: list[Subscriber],
    received_before: list[int],
    last_ids: dict[int, str],
    *,
    before: int,
    missed: int,
    batch: int,
    publish_s: float,
    usage: dict[str, Any],
    publisher: Publisher,
) -> dict[str, Any]:
    live = before + missed
    resume_us = stats.Histogram()
    lost = repeated = out_of_order = no_live = incomplete = 0
    for sub in second:
        in_range = [x for x in sub.seqs if before <= x < live]
        unique = len(set(in_range))
        lost += missed - unique
        repeated += (len(in_range) - unique) + sum(1 for x in sub.seqs if x < before)
        out_of_order += any(b <= a for a, b in itertools.pairwise(in_range))
        no_live += live not in sub.seqs
        if unique == missed and sub.complete_at:
            resume_us.add(int((sub.complete_at - sub.started) * 1e6))
        else:
            incomplete += 1
    resumed = resume_us.summary()
    slowest_s = resumed["max_ms"] / 1000
    connect.pop("indices", None)
    reconnect.pop("indices", None)
    result: dict[str, Any] = {
        "scenario": "s4",
        "label": run.label,
        "subscribers": run.subscribers,
        "before": before,
        "missed": missed,
        "batch": batch,
        "connect": connect,
        "reconnect": reconnect,
        "received_before": sum(received_before),
        "expected_before": before * run.subscribers,
        "without_last_event_id": run.subscribers - len(last_ids),
        "missed_publish_s": round(publish_s, 3),
        "publish": {
            "ok": publisher.ok,
            "errors": publisher.failed,
            "events": publisher.events_ok,
            "statuses": dict(publisher.statuses),
        },
        "expected": missed * run.subscribers,
        "received": sum(len([x for x in s.seqs if before <= x < live]) for s in second),
        "lost": lost,
        "duplicated": repeated,
        "out_of_order_subscribers": out_of_order,
        "incomplete_subscribers": incomplete,
        "live_after_missing": no_live,
        "resume": resumed,
        "replayed_per_s": round(missed * (run.subscribers - incomplete) / slowest_s, 1) if slowest_s else 0.0,
        **usage,
    }
    reasons = publish_failures(dict(publisher.statuses), publisher.failed, 0)
    if connect["failed"] or reconnect["failed"]:
        reasons.append(f"{connect['failed']} connects and {reconnect['failed']} reconnects failed")
    if result["received_before"] < result["expected_before"]:
        reasons.append("not every event before the disconnect arrived")
    if result["without_last_event_id"]:
        reasons.append(f"{result['without_last_event_id']} subscribers saw no id: (resume impossible)")
    if lost:
        reasons.append(f"{lost} missed events never arrived")
    if repeated:
        reasons.append(f"{repeated} events came twice")
    if out_of_order:
        reasons.append(f"{out_of_order} subscribers got missed events out of order")
    if no_live:
        reasons.append(f"{no_live} subscribers got no live event after resuming")
    result.update(verdict(reasons))
    return result
