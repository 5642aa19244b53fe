"""Every metric moves when its event happens: read from /metrics of a real server, over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scribe_events.metrics import Histogram, parse_key, quantile, sample_key
from tests.conftest import MakeServer
from tests.harness import RawStream, ThreadServer, wait_for
from tests.test_tasks import _started, _update

STREAM = "/api/v1/events/stream"


def scrape(server: ThreadServer) -> dict[str, float]:
    """Every sample of /metrics under its history key (labels but ``instance``)."""
    text = httpx.get(server.url + "/metrics").text
    return {
        sample_key(s.name, s.labels): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def value(server: ThreadServer, key: str) -> float:
    return scrape(server).get(key, 0.0)


def moved(server: ThreadServer, before: dict[str, float], key: str) -> float:
    return value(server, key) - before.get(key, 0.0)


def _admin(server: ThreadServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token('ops', roles=['admin'])}"}


def test_connections_opened_closed_and_open(server: ThreadServer) -> None:
    before = scrape(server)
    s = server.stream("alice")
    s.read_count(1, event="connection.established")
    assert value(server, "scribe_events_connections") == 1
    assert moved(server, before, "scribe_events_connections_opened_total") == 1
    assert moved(server, before, 'scribe_events_http_responses_total{code="200"}') >= 1
    s.close()
    wait_for(lambda: server.connections() == 0)
    assert moved(server, before, 'scribe_events_connections_closed_total{reason="client_closed"}') == 1
    assert value(server, "scribe_events_connections") == 0


def test_events_published_stored_delivered_by_family_with_latencies(server: ThreadServer) -> None:
    before = scrape(server)
    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        server.publish_ok(
            {"type": "content.novel-created", "user_id": "alice", "data": {"novel_id": "n1", "title": "N"}}
        )
        server.publish_ok({"events": [{"type": "custom.a", "user_id": "alice"}] * 3})
        server.publish_ok({"type": "custom.live", "user_id": "alice", "persist": False})
        s.read_count(5)
    assert moved(server, before, 'scribe_events_events_published_total{family="content"}') == 1
    assert moved(server, before, 'scribe_events_events_published_total{family="custom"}') == 4
    assert (
        moved(server, before, 'scribe_events_events_stored_total{family="custom"}') == 3
    )  # not the live one
    assert moved(server, before, 'scribe_events_events_delivered_total{family="content"}') == 1
    assert moved(server, before, 'scribe_events_events_delivered_total{family="custom"}') == 4
    assert moved(server, before, 'scribe_events_events_delivered_total{family="task"}') == 0
    assert moved(server, before, "scribe_events_publish_to_write_seconds_count") == 5
    assert moved(server, before, "scribe_events_store_batches_total") >= 2
    assert moved(server, before, "scribe_events_store_commit_seconds_count") >= 2
    assert moved(server, before, "scribe_events_store_batch_events_sum") == 4
    assert moved(server, before, 'scribe_events_store_batch_events_bucket{le="2.0"}') == 1  # the lone one
    assert moved(server, before, 'scribe_events_http_responses_total{code="202"}') == 3
    after = scrape(server)
    assert 0 < after["scribe_events_publish_to_write_seconds_sum"] < 5


def test_replays_and_replayed_events(server: ThreadServer) -> None:
    ids = server.publish_ok({"events": [{"type": "custom.r", "user_id": "alice"}] * 4})
    before = scrape(server)
    with server.stream("alice", headers={"Last-Event-ID": ids[0]}) as s:
        s.read_count(3)
    assert moved(server, before, "scribe_events_replays_total") == 1
    assert moved(server, before, "scribe_events_replayed_events_total") == 3
    with server.stream("alice") as fresh:  # not a replay
        fresh.read_count(1, event="connection.established")
    assert moved(server, before, "scribe_events_replays_total") == 1


def test_auth_failures_by_reason_rate_limits_and_bans(make_server: MakeServer) -> None:
    server = make_server(max_streams_per_user=1)
    before = scrape(server)
    cases = {
        "missing_token": {},
        "invalid_token": {"Authorization": "Bearer nonsense"},
        "expired_token": {"Authorization": f"Bearer {server.token('bob', ttl_s=-60)}"},
    }
    for headers in cases.values():
        with RawStream(server.port, STREAM, headers) as s:
            assert s.status == 401
    assert httpx.get(server.url + STREAM + "?ticket=nope").status_code == 401
    forbidden = httpx.get(
        server.url + "/api/v1/admin/bans", headers={"Authorization": f"Bearer {server.token('u')}"}
    )
    assert forbidden.status_code == 403
    for reason in [*cases, "invalid_ticket", "missing_role"]:
        assert moved(server, before, f'scribe_events_auth_failures_total{{reason="{reason}"}}') == 1, reason
    assert moved(server, before, 'scribe_events_http_responses_total{code="401"}') == 4
    assert moved(server, before, 'scribe_events_http_responses_total{code="403"}') == 1

    with server.stream("carol") as first:
        first.read_count(1, event="connection.established")
        with server.stream("carol") as second:
            assert second.status == 429
    assert moved(server, before, 'scribe_events_requests_rate_limited_total{limit="streams_per_user"}') == 1

    r = httpx.post(
        server.url + "/api/v1/admin/bans", json={"user_id": "mallory", "ttl_s": 60}, headers=_admin(server)
    )
    assert r.status_code == 201, r.text
    with server.stream("mallory") as banned:
        assert banned.status == 403
    assert moved(server, before, "scribe_events_requests_banned_total") == 1
    assert moved(server, before, 'scribe_events_auth_failures_total{reason="banned"}') == 0


def test_throttled_coalesced_and_heartbeats(make_server: MakeServer) -> None:
    server = make_server(task_heartbeat_s=0.2, task_stall_s=60)
    before = scrape(server)
    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        server.publish_ok(_started("t1", "alice"))
        for p in range(1, 11):
            server.publish_ok(_update("t1", p))
        chapters = [
            {
                "type": "content.chapter-updated",
                "user_id": "alice",
                "data": {"novel_id": "n", "chapter_id": f"c{i}"},
            }
            for i in range(5)
        ]
        server.publish_ok({"events": chapters})
        s.read_until(lambda ms: any(m.event == "task.progress-heartbeat" for m in ms), timeout=5)
    throttled = "scribe_events_events_throttled_total"
    wait_for(
        lambda: moved(server, before, throttled) >= 8, timeout=3
    )  # 10 updates: 1 at once, the last later
    coalesced = "scribe_events_events_coalesced_total"
    wait_for(lambda: moved(server, before, coalesced) == 3, timeout=3)  # 5 chapters: 1 at once, 1 for 4 later
    assert moved(server, before, "scribe_events_task_heartbeats_total") >= 1


def test_slow_client_queue_cut_off_replaced_and_failed(make_server: MakeServer) -> None:
    server = make_server(max_connection_buffer=64 * 1024, max_connection_queue=8 * 1024 * 1024)
    before = scrape(server)
    slow = server.stream("alice", rcvbuf=4096)
    try:
        slow.read_count(1, event="connection.established")
        big = {"type": "custom.big", "user_id": "alice", "data": {"blob": "z" * 16_000}}
        for _ in range(20):  # 800 kB a time, until the kernel's buffers (up to 4 MiB) are full
            server.publish_ok({"events": [big] * 50})
            if value(server, "scribe_events_connections_queued") == 1:
                break
        assert value(server, "scribe_events_connections_queued") == 1
        queued = scrape(server)
        assert queued["scribe_events_connection_queue_bytes"] > 64 * 1024
        assert (
            queued["scribe_events_connection_queue_max_bytes"]
            == queued["scribe_events_connection_queue_bytes"]
        )
        server.publish_ok(
            {"type": "task.progress-started", "task_id": "t", "data": {"task_id": "t", "owner": "alice"}}
        )
        for p in (1, 2, 3):  # held in the queue: each replaces the one before
            server.publish_ok(
                {"type": "task.progress-updated", "task_id": "t", "data": {"task_id": "t", "progress": p}}
            )
            time.sleep(1.1)  # past the throttle, so each reaches the queue
        assert moved(server, before, 'scribe_events_events_dropped_total{reason="replaced"}') >= 1
        for _ in range(12):  # past the queue's 8 MiB: cut off
            server.publish_ok({"events": [big] * 50})
            if server.connections() == 0:
                break
        wait_for(lambda: server.connections() == 0, timeout=10)
    finally:
        slow.close()
    assert moved(server, before, 'scribe_events_connections_cut_off_total{reason="slow_client"}') == 1
    assert moved(server, before, 'scribe_events_connections_closed_total{reason="slow_client"}') == 1
    assert value(server, "scribe_events_connections_queued") == 0
    wait_for(
        lambda: moved(server, before, 'scribe_events_events_failed_total{family="custom"}') > 0, timeout=5
    )


def test_process_resources_loop_lag_and_costs(make_server: MakeServer) -> None:
    server = make_server(history_interval_s=0.2)
    streams = [server.stream(f"u{i}") for i in range(5)]
    try:
        for s in streams:
            s.read_count(1, event="connection.established")
        server.publish_ok({"events": [{"type": "custom.x", "broadcast": True}] * 50})
        for s in streams:
            s.read_count(50)

        async def block() -> None:
            time.sleep(0.8)  # the loop is stuck: the probe wakes late

        server.call(block())
        server.call(asyncio.sleep(0.05))  # the probe wakes, late
        now = scrape(server)
        assert now["scribe_events_event_loop_lag_seconds"] >= 0.5
        assert now["scribe_events_process_cpu_seconds_total"] > 0
        assert now["scribe_events_process_resident_memory_bytes"] > 10 * 1024 * 1024
        assert 5 < now["scribe_events_process_open_fds"] <= now["scribe_events_process_max_fds"]
        assert now["scribe_events_up_seconds"] > 0
        assert now["scribe_events_cost_memory_bytes_per_connection"] >= 0
        # The interval that held the 250 deliveries measured a CPU cost per event, kept while idle.
        cost = "scribe_events_cost_cpu_seconds_per_delivered_event"
        wait_for(lambda: value(server, cost) > 0, timeout=3)
        assert value(server, cost) < 0.01
    finally:
        for s in streams:
            s.close()


def test_connection_threshold_warns_sets_the_metric_and_notifies_admins(make_server: MakeServer) -> None:
    server = make_server(history_interval_s=0.2, alert_connections=2, alert_notify_users=["ops"])
    logged = Recorded()
    logging.getLogger("scribe_events.monitor").addHandler(logged)
    assert value(server, 'scribe_events_threshold_limit{threshold="connections"}') == 2
    ops = server.stream("ops")
    others = [server.stream(f"u{i}") for i in range(2)]
    try:
        ops.read_count(1, event="connection.established")
        wait_for(
            lambda: value(server, 'scribe_events_threshold_exceeded{threshold="connections"}') == 1, timeout=3
        )
        [note] = ops.read_count(1, event="system.notification", timeout=5)
        data = note.json()["data"]
        assert data["level"] == "warning" and "3 open streams" in data["message"]
        assert "SCRIBE_EVENTS_ALERT_CONNECTIONS=2" in data["message"]
        assert value(server, 'scribe_events_thresholds_crossed_total{threshold="connections"}') == 1
        assert any("threshold connections crossed" in r.getMessage() for r in logged.records)
        assert httpx.get(server.url + "/health/ready").json()["thresholds_exceeded"] == ["connections"]
    finally:
        for s in others:
            s.close()
    wait_for(
        lambda: value(server, 'scribe_events_threshold_exceeded{threshold="connections"}') == 0, timeout=3
    )
    assert value(server, 'scribe_events_thresholds_crossed_total{threshold="connections"}') == 1  # once
    ops.close()
    logging.getLogger("scribe_events.monitor").removeHandler(logged)


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_p99_latency_threshold(make_server: MakeServer) -> None:
    server = make_server(history_interval_s=0.2, alert_p99_latency_s=0.0001)
    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        # Enough events in one interval to count (a store commit takes longer than 0.1 ms).
        server.publish_ok({"events": [{"type": "custom.slowish", "user_id": "alice"}] * 30})
        s.read_count(30)
        wait_for(
            lambda: value(server, 'scribe_events_threshold_exceeded{threshold="p99_latency"}') == 1, timeout=3
        )
    assert value(server, 'scribe_events_thresholds_crossed_total{threshold="p99_latency"}') == 1
    # The next intervals write nothing: the latency is no longer over the limit.
    wait_for(
        lambda: value(server, 'scribe_events_threshold_exceeded{threshold="p99_latency"}') == 0, timeout=3
    )


def test_history_is_kept_in_the_store_and_served_to_admins(make_server: MakeServer) -> None:
    server = make_server(history_interval_s=0.2)
    server.publish_ok({"type": "custom.h", "broadcast": True})
    wait_for(lambda: len(_history(server)["instances"].get("test-instance", [])) >= 3, timeout=5)
    body = _history(server)
    points = body["instances"]["test-instance"]
    assert [p["at"] for p in points] == sorted(p["at"] for p in points)
    assert points[-1]["metrics"]['scribe_events_events_stored_total{family="custom"}'] == 1
    assert body["live"]["instance"] == "test-instance" and body["interval_s"] == 0.2
    assert body["store"]["backend"] == "sqlite" and body["store"]["events"] == 1
    assert body["settings"]["max_connection_queue"] == 1024 * 1024
    since = httpx.get(server.url + "/api/v1/admin/history?since_s=0.3", headers=_admin(server)).json()[
        "instances"
    ]["test-instance"]
    assert 1 <= len(since) <= 3
    other = httpx.get(server.url + "/api/v1/admin/history?instance=nobody", headers=_admin(server)).json()
    assert other["instances"] == {}
    user = httpx.get(
        server.url + "/api/v1/admin/history", headers={"Authorization": f"Bearer {server.token('u')}"}
    )
    assert user.status_code == 403
    bad = httpx.get(server.url + "/api/v1/admin/history?since_s=-1", headers=_admin(server))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_history_forgets_what_is_older_than_it_keeps(make_server: MakeServer) -> None:
    server = make_server(history_interval_s=0.2, history_keep_s=0.5)
    time.sleep(1.5)
    points = _history(server)["instances"]["test-instance"]
    assert 1 <= len(points) <= 4
    raw = server.call(server.runtime.store.snapshots(since_ms=0))
    assert len(raw) <= 4 and all(r[1] >= (time.time() - 1.0) * 1000 for r in raw)


def _history(server: ThreadServer) -> dict[str, Any]:
    r = httpx.get(server.url + "/api/v1/admin/history", headers=_admin(server))
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- the pieces ---------------------------------------------------------------------------------


def test_histogram_buckets_and_quantiles() -> None:
    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.5, 5.0):
        h.observe(v)
    assert h.counts == [2, 1, 1, 1] and h.count == 5 and h.sum == pytest.approx(5.565)
    [family] = [h.family("x_seconds", "doc", ["i"])]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}
    assert quantile((0.01, 0.1, 1.0), [0, 100, 0, 0], 0.5) == pytest.approx(0.055)
    assert quantile((0.01, 0.1, 1.0), [0, 0, 0, 3], 0.99) == 1.0  # past the last bound: that bound
    assert quantile((0.01, 0.1, 1.0), [0, 0, 0, 0], 0.99) == 0.0


def test_sample_keys_round_trip_any_label_value() -> None:
    for labels in ({}, {"family": "task", "instance": "x"}, {"a": 'q"\\\nz', "b": "}{,="}):
        key = sample_key("m_total", labels)
        assert parse_key(key) == ("m_total", {k: v for k, v in labels.items() if k != "instance"})
    assert json.loads(json.dumps(sample_key("m", {"a": "\x00"}))) == 'm{a="\x00"}'


def test_history_on_both_stores_keeps_orders_and_forgets(store_config: dict[str, Any]) -> None:
    from scribe_events.history import StoreHistory
    from scribe_events.store import make_store
    from tests.harness import IsolatedSettings

    async def run() -> tuple[dict[str, list[Any]], dict[str, list[Any]], dict[str, list[Any]]]:
        store = make_store(IsolatedSettings(**store_config))
        await store.start()
        try:
            history = StoreHistory(store, keep_s=100)
            now = time.time()
            for i, at in enumerate((now - 300, now - 50, now - 20, now - 10)):
                await history.save({"instance": "a" if i % 2 else "b", "at": at, "metrics": {"m_total": i}})
            everything = await history.read(since=0)
            recent = await history.read(since=now - 30)
            only_a = await history.read(since=0, instance="a")
            return everything, recent, only_a
        finally:
            await store.close()

    everything, recent, only_a = asyncio.run(run())
    # The one at -300 s was forgotten when a later one was saved (kept 100 s).
    assert {k: [p["metrics"]["m_total"] for p in v] for k, v in everything.items()} == {"a": [1, 3], "b": [2]}
    assert {k: len(v) for k, v in recent.items()} == {"b": 1, "a": 1}
    assert list(only_a) == ["a"]


def test_history_in_redis_serves_every_instance(redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    from scribe_events.constants import RedisKeys
    from scribe_events.history import RedisHistory, thin
    from tests.conftest import REDIS_URL

    async def run() -> tuple[dict[str, list[Any]], dict[str, list[Any]], int]:
        client = aioredis.from_url(REDIS_URL)
        try:
            keys = RedisKeys(redis_prefix)
            history = RedisHistory(client, keys, keep_s=100)
            now = time.time()
            for name in ("one", "two"):
                for n, at in enumerate((now - 300, now - 20, now - 10)):
                    await history.save({"instance": name, "at": at, "metrics": {"m_total": n}})
            await client.zadd(keys.history("two"), {b"not a snapshot": now - 5})  # skipped, not fatal
            both = await history.read(since=now - 60)
            one = await history.read(since=0, instance="one")
            ttl = await client.ttl(keys.history("one"))
            return both, one, ttl
        finally:
            await client.aclose()

    both, one, ttl = asyncio.run(run())
    assert {k: [p["metrics"]["m_total"] for p in v] for k, v in both.items()} == {
        "one": [1, 2],
        "two": [1, 2],
    }
    assert [p["metrics"]["m_total"] for p in one["one"]] == [1, 2]  # the one at -300 s is gone
    assert 100 < ttl <= 160
    points = [{"at": i} for i in range(2000)]
    thinned = thin(points, 720)
    assert len(thinned) == 720 and thinned[0] == points[0] and thinned[-1] == points[-1]


def test_report_after_the_demo_matches_metrics_and_names_real_settings(
    make_server: MakeServer, tmp_path: Any
) -> None:
    """`scribe-events demo`, then `scribe-events report`: its totals are what /metrics says, and
    every piece of advice names a setting the server has. The queue is made small, so a slow
    reader is cut off and the report has something to advise."""
    from scribe_events.config import Settings
    from tests.harness import SECRET, cli

    server = make_server(
        history_interval_s=0.2, max_connection_buffer=16 * 1024, max_connection_queue=16 * 1024
    )
    slow = [server.stream("demo", rcvbuf=4096) for _ in range(3)]  # never read: cut off as slow
    try:
        for s in slow:
            s.read_count(1, event="connection.established")
        env = {"SCRIBE_EVENTS_URL": server.url, "SCRIBE_EVENTS_JWT_SECRET": SECRET}
        demo = cli("demo", "--tasks", "2", "--step", "0.001", cwd=tmp_path, env=env)
        assert demo.returncode == 0, demo.stderr
        big = {"type": "custom.big", "user_id": "demo", "data": {"blob": "z" * 60_000}}
        for _ in range(12):
            if server.connections() == 0:
                break
            server.publish_ok({"events": [big] * 15})
        wait_for(lambda: server.connections() == 0, timeout=10)
    finally:
        for s in slow:
            s.close()
    time.sleep(0.5)  # idle: the last snapshot holds every count
    now = scrape(server)
    out = cli("report", "--since", "10m", "--json", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    totals = report["total"]["totals"]
    for flow in ("published", "stored", "delivered"):
        series = [v for k, v in now.items() if k.startswith(f"scribe_events_events_{flow}_total")]
        assert totals[flow] == sum(series) > 0, flow
    assert report["total"]["connections"]["cut_off"] == {"slow_client": 3}
    advice = report["advice"]
    assert advice, "a cut-off slow client calls for advice"
    assert any(a["setting"] == "max_connection_queue" for a in advice)
    fields = set(Settings.model_fields)
    assert all(a["setting"] in fields and a["env"] == "SCRIBE_EVENTS_" + a["setting"].upper() for a in advice)


# -- review findings: the monitor's and the broker's arithmetic ------------------------------------


class _Hub:
    """What the monitor reads of a hub."""

    def __init__(self) -> None:
        self.connections: dict[str, object] = {}
        self.delivered = 0
        self.latency = Histogram()

    def __len__(self) -> int:
        return len(self.connections)


class _History:
    async def save(self, snapshot: dict[str, Any]) -> None:
        pass


def _monitor(**settings: Any) -> tuple[Any, _Hub, list[str]]:
    from prometheus_client import CollectorRegistry

    from scribe_events.config import Settings
    from scribe_events.monitor import Monitor

    hub = _Hub()
    sent: list[str] = []

    async def notify(title: str, message: str) -> None:
        sent.append(message)

    monitor = Monitor(Settings(**settings), hub, CollectorRegistry(), _History(), notify)  # type: ignore[arg-type]
    monitor._last = monitor._reading()
    return monitor, hub, sent


def test_the_p99_threshold_needs_enough_events_and_clears_with_hysteresis() -> None:
    monitor, hub, sent = _monitor(alert_p99_latency_s=0.5, alert_notify_users=["ops"])

    async def run() -> list[bool]:
        seen = []
        for writes in ([0.8], [0.8] * 30, [0.45] * 30, [0.2] * 30, [], [0.8] * 30):
            for w in writes:
                hub.latency.observe(w)
                hub.delivered += 1
            await monitor.tick()
            await asyncio.sleep(0)  # the notification goes out in the background
            seen.append(monitor.exceeded["p99_latency"])
        return seen

    # one slow write: not enough; 30: over; 0.45 s: still over (clears below 0.4); 0.2 s: clear;
    # an idle interval: clear; slow again: over, but told once only within NOTIFY_EVERY_S
    assert asyncio.run(run()) == [False, True, True, False, False, True]
    assert monitor.crossed["p99_latency"] == 2 and len(sent) == 1


def test_memory_cost_is_taken_at_the_most_streams_not_after_they_close() -> None:
    monitor, hub, _ = _monitor()
    hub.connections = {str(i): object() for i in range(1000)}
    monitor.rss_at_start -= 10 * 1024 * 1024  # as if 10 MiB had been gained for them
    asyncio.run(monitor.tick())
    hub.connections = {"0": object()}
    family = {m.name: m for m in monitor.collect(["i"])}["scribe_events_cost_memory_bytes_per_connection"]
    per_connection = family.samples[0].value
    assert 10 * 1024 <= per_connection < 12 * 1024  # ~10 KiB each, not 10 MiB for the one left


def test_the_redis_round_trip_goes_on_after_a_lost_message() -> None:
    from scribe_events.broker.redis import RedisBroker, _token
    from scribe_events.constants import RedisKeys

    async def run() -> int:
        broker = RedisBroker(
            "redis://127.0.0.1:1/0",
            None,
            RedisKeys("x:"),
            catch_up=None,  # type: ignore[arg-type]
        )
        try:
            now = time.monotonic()
            for n in range(5):
                broker._in_flight.append((_token(b"m%d" % n), now))
            broker._came_back(b"m0")
            # m1 was lost (a Redis blip): m2 coming back still counts and forgets m1
            broker._came_back(b"m2")
            broker._came_back(b"other instance's")  # not ours: nothing
            broker._came_back(b"m3")
            assert [t for t, _ in broker._in_flight] == [_token(b"m4")]
            return broker.round_trip.count
        finally:
            await broker._listener_client.aclose()

    assert asyncio.run(run()) == 3


def test_a_resent_event_is_not_timed_as_a_publish() -> None:
    from scribe_events.events import Event

    event = Event("custom.x", "{}", user_id="u", time_ms=1)
    event.id = 7
    assert event.delivery().time_ms == 1
    event.resend = True
    assert event.delivery().time_ms == 0
