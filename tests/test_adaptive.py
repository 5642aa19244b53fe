"""Adaptive load (R8.6): the throttle and coalescing windows widen and store batches grow while the
event loop lags or streams' queues fill, and come back once the load drops; each change is logged
and shown in the metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from scribe_events.adaptive import CALM_PROBES, AdaptiveLoad
from scribe_events.config import Settings
from scribe_events.hub import Connection, Hub
from scribe_events.live_tasks import LiveTasks
from scribe_events.publisher import Publisher
from tests.conftest import MakeServer
from tests.test_hub import FakeSink
from tests.test_metrics import Recorded, value
from tests.test_tasks import _started, _update


def _parts(**settings: object) -> tuple[AdaptiveLoad, Hub, LiveTasks, Publisher]:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=1000)
    live = LiveTasks(hub, None, throttle_s=1.0, coalesce_s=0.5, heartbeat_s=60, stall_s=300)  # type: ignore[arg-type]
    publisher = Publisher(None, None, queue_max=10, batch_max=1000)  # type: ignore[arg-type]
    return AdaptiveLoad(Settings(**settings), hub, live, publisher), hub, live, publisher  # type: ignore[arg-type]


def test_lag_widens_the_windows_at_once_and_they_come_back_step_by_step() -> None:
    adaptive, _, live, publisher = _parts()
    adaptive.observe(0.01)
    assert (adaptive.level, live.throttle_s, live.coalesce_s, publisher.batch_max) == (0, 1.0, 0.5, 1000)
    adaptive.observe(0.6)  # overloaded: at once
    assert (adaptive.level, live.throttle_s, live.coalesce_s, publisher.batch_max) == (2, 5.0, 2.5, 4000)
    for _ in range(CALM_PROBES - 1):
        adaptive.observe(0.01)
    assert adaptive.level == 2  # not yet: calm must last
    adaptive.observe(0.01)
    assert (adaptive.level, live.throttle_s, publisher.batch_max) == (1, 2.0, 2000)
    adaptive.observe(0.2)  # still busy: the calm count starts again
    for _ in range(CALM_PROBES):
        adaptive.observe(0.01)
    assert (adaptive.level, live.throttle_s, live.coalesce_s, publisher.batch_max) == (0, 1.0, 0.5, 1000)
    assert adaptive.changes == 3
    # A resuming stream looks back over the widest window in force lately (a chapter held then
    # went out that much later), not only today's narrow one.
    assert live.widest_coalesce_s == 2.5


def test_full_queues_count_as_load_and_a_switched_off_throttle_stays_off() -> None:
    adaptive, hub, live, _ = _parts()
    live.throttle_s = 0.0
    adaptive.base = (0.0, 0.5, 1000)
    conns = [Connection(f"c{i}", f"u{i}", None, FakeSink()) for i in range(10)]
    for c in conns:
        hub.add(c)
    conns[0].backlog = conns[1].backlog = object()  # type: ignore[assignment]  # 2 of 10 queued
    adaptive.observe(0.0)
    assert adaptive.level == 2 and live.throttle_s == 0.0 and live.coalesce_s == 2.5


def test_adaptive_load_can_be_switched_off() -> None:
    adaptive, _, live, _ = _parts(adaptive_load=False)
    adaptive.observe(5.0)
    assert adaptive.level == 0 and live.throttle_s == 1.0


def test_a_lagging_server_widens_its_throttle_logs_it_and_shows_it(make_server: MakeServer) -> None:
    server = make_server(adaptive_load=True)
    logged = Recorded()
    logging.getLogger("scribe_events.adaptive").addHandler(logged)
    try:
        assert value(server, "scribe_events_load_level") == 0
        assert value(server, "scribe_events_progress_throttle_seconds") == 1.0

        async def stuck() -> None:
            time.sleep(0.7)  # the loop does nothing else: the probe wakes 0.7 s late

        server.call(stuck())
        server.call(asyncio.sleep(0.3))
        assert value(server, "scribe_events_load_level") == 2
        assert value(server, "scribe_events_progress_throttle_seconds") == 5.0
        assert value(server, "scribe_events_coalesce_window_seconds") == 5.0
        assert value(server, "scribe_events_store_batch_max_events") == 4000
        assert value(server, "scribe_events_load_level_changes_total") == 1
        assert any("load normal -> overloaded" in r.getMessage() for r in logged.records)
        # Updates of a task now reach a client at most every 5 s, still ending in the latest value.
        with server.stream("alice") as s:
            s.read_count(1, event="connection.established")
            server.publish_ok(_started("t", "alice"))
            for p in range(1, 6):
                server.publish_ok(_update("t", p))
                time.sleep(0.3)  # 1.5 s in all: past the 1 s setting, inside the widened 5 s
            server.publish_ok({"type": "task.progress-completed", "task_id": "t", "data": {"task_id": "t"}})
            s.read_count(1, event="task.progress-completed", timeout=5)
            progress = [m.json()["data"]["progress"] for m in s.events("task.progress-updated")]
        assert progress == [1, 5]  # the first at once, the latest before the completion
    finally:
        logging.getLogger("scribe_events.adaptive").removeHandler(logged)
