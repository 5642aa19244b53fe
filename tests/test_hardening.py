"""No single request can wedge, crash or flood the service: one regression test per defect found
by the adversarial review, through real servers where the promise is end to end."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from scribe_events.broker import MemoryBroker
from scribe_events.crypto import new_key
from scribe_events.events import Event
from scribe_events.exceptions import ShuttingDown, StoreRejected, StoreUnavailable
from scribe_events.failures import FailureRecorder
from scribe_events.hub import Connection, Hub
from scribe_events.publisher import Publisher
from scribe_events.store.sql import SQLEventStore
from tests.conftest import MakeServer
from tests.harness import ThreadServer, wait_for
from tests.test_hub import FakeSink


def _admin(server: ThreadServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token('root', roles=['admin'])}"}


def _bearer(server: ThreadServer, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(user)}"}


def _raw_publish(server: ThreadServer, body: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.publisher()}", "Content-Type": "application/json"}
    return httpx.post(server.url + "/api/v1/events", content=body, headers=headers, timeout=10)


# --- 1. identifiers are checked with full matches; a poison event never stops delivery -------------


@pytest.mark.parametrize(
    "body",
    [
        {"type": "custom.x\n", "broadcast": True},
        {"type": "custom.x", "user_id": "alice\n"},
        {"type": "custom.x", "user_id": "alice", "session_id": "s1\n"},
        {"type": "task.progress-started", "user_id": "alice", "data": {"task_id": "t1\n"}},
        {"type": "content.novel-created", "user_id": "alice", "data": {"novel_id": "n\n", "title": "x"}},
    ],
)
def test_identifier_with_a_trailing_newline_is_refused(server: ThreadServer, body: dict[str, Any]) -> None:
    r = server.publish(body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error" and "must be" in error["message"]  # by the id rule


def test_type_glob_and_ban_target_with_a_trailing_newline_are_refused(server: ThreadServer) -> None:
    with server.stream("alice", path="/api/v1/events/stream?types=task.%2A%0A") as s:
        assert s.status == 422 and "types" in s.error_body["error"]["message"]
    r = httpx.get(server.url + "/api/v1/events?types=task.*%0A", headers=_bearer(server, "alice"))
    assert r.status_code == 422
    r = httpx.post(server.url + "/api/v1/admin/bans", headers=_admin(server), json={"user_id": "bob\n"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("user_id:")
    r = httpx.post(server.url + "/api/v1/admin/bans", headers=_admin(server), json={"ip": "10.0.0.1\n"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("ip:")


def _insert_raw(db: Path, type_: str, data: dict[str, Any]) -> int:
    """A row as an older version could have stored it (no validation on the way in)."""
    with sqlite3.connect(db) as conn:
        cur = conn.execute(
            "INSERT INTO events (time_ms, type, broadcast, sensitive, data) VALUES (?, ?, 1, 0, ?)",
            (int(time.time() * 1000), type_, json.dumps(data)),
        )
        return int(cur.lastrowid or 0)


def test_poison_event_in_the_store_is_skipped_by_relay_replay_and_live(
    make_server: MakeServer, tmp_path: Path
) -> None:
    first = make_server("poison.db")
    [before] = first.publish_ok({"type": "custom.ok", "broadcast": True, "data": {"n": 0}})
    first.stop()
    # Committed but never published (the outbox relay must send them at start-up): a poison event
    # whose type cannot be framed, then a good one.
    poison = _insert_raw(tmp_path / "poison.db", "custom.x\n", {"n": 1})
    good = _insert_raw(tmp_path / "poison.db", "custom.ok", {"n": 2})

    server = make_server("poison.db")
    with server.stream("alice") as live, server.stream("bob", headers={"Last-Event-ID": before}) as resumed:
        live.read_count(1, event="connection.established")
        # Replay across it: the poison event is skipped, the stream goes on.
        assert [m.id for m in resumed.read_count(1)] == [str(good)]
        [after] = server.publish_ok({"type": "custom.ok", "broadcast": True, "data": {"n": 3}})
        assert [m.id for m in live.read_count(1)] == [after]  # live delivery did not stop
        assert [m.id for m in resumed.read_count(2)] == [str(good), after]
    failed = httpx.get(server.url + "/api/v1/admin/events/failed", headers=_admin(server)).json()["failed"]
    assert [(f["event_id"], f["reason"]) for f in failed] == [(str(poison), "unsendable")]
    metrics = httpx.get(server.url + "/metrics").text
    series = 'scribe_events_events_dropped_total{instance="test-instance",reason="unsendable"} '
    assert [float(x[len(series) :]) >= 1 for x in metrics.splitlines() if x.startswith(series)] == [True]


# --- 2. fan-out never changes a collection while iterating it ------------------------------------


def test_hub_system_error_cutting_a_replaying_stream_mid_broadcast_reaches_everyone_else() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=1000, max_queue=1000)
    sinks = []
    for n in range(20):
        sink = FakeSink()
        sink.accepts = True
        sinks.append(sink)
        replaying = n == 5  # one stream replays; its socket is backed up
        if replaying:
            sink.accepts = False
            sink.buffered = 5000
        hub.add(
            Connection(f"c{n}", f"u{n}", None, sink, replaying=replaying), from_seq=0 if replaying else None
        )
    error = Event(
        "system.error",
        json.dumps({"level": "critical", "impact": "all", "message": "x"}),
        broadcast=True,
        id=1,
    )
    more = Event("custom.after", "{}", broadcast=True, id=2)
    hub.dispatch([error.delivery(), more.delivery()])  # raised "dictionary changed size" before
    assert "c5" not in hub.connections and len(hub) == 19
    for n, sink in enumerate(sinks):
        if n != 5:  # both events, in one write (a batch is one write per connection)
            assert b"".join(sink.received).count(b"\nevent: ") == 2, n


def test_hub_dispatch_survives_a_connection_whose_filter_raises() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=10_000)
    good, bad = FakeSink(), FakeSink()
    good.accepts = bad.accepts = True
    broken = Connection("bad", "u1", None, bad)

    def explode(_: str) -> bool:
        raise RuntimeError("a bug")

    broken.types = explode  # type: ignore[assignment]
    hub.add(broken)
    hub.add(Connection("good", "u2", None, good))
    hub.dispatch([Event("custom.x", "{}", broadcast=True, id=1).delivery()])
    assert len(good.received) == 1 and "bad" not in hub.connections


def test_hub_a_failing_hook_spares_the_cut_and_the_other_connections() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=10, max_queue=10)

    def broken(conn: Connection, reason: str) -> None:
        raise RuntimeError("a bug in a hook")

    hub.on_cut.append(broken)
    sinks = [FakeSink() for _ in range(3)]
    for n, sink in enumerate(sinks):
        hub.add(Connection(f"c{n}", f"u{n}", None, sink))
    pad = json.dumps({"pad": "x" * 100})
    hub.dispatch([Event("custom.x", pad, broadcast=True, id=n).delivery() for n in (1, 2)])  # 2 is over
    assert len(hub) == 0 and hub.count_user("u0") == 0 and all(s.aborted for s in sinks)


# --- 4. one bad id fails no other publisher -------------------------------------------------------


def test_lone_surrogate_in_an_id_is_422_and_the_others_are_stored(server: ThreadServer) -> None:
    for field in ("user_id", "session_id"):
        body = b'{"type": "custom.x", "user_id": "alice", "%s": "a\\ud800"}' % field.encode()
        r = _raw_publish(server, body)
        assert r.status_code == 422 and r.json()["error"]["message"].startswith(field), r.text
    r = _raw_publish(server, b'{"type": "custom.x", "user_id": "alice", "data": {"t": "\\udfff"}}')
    assert r.status_code == 422


def test_publisher_isolates_a_row_the_store_refuses(tmp_path: Path) -> None:
    async def run() -> tuple[list[Any], int]:
        store = SQLEventStore(f"sqlite+aiosqlite:///{tmp_path / 'iso.db'}")
        await store.start()
        publisher = Publisher(store, MemoryBroker(), queue_max=1000, batch_max=1000)
        await publisher.start()
        try:
            # Past validation (built directly): text SQLite's driver cannot encode.
            bad = Event("custom.x", "{}", user_id="a\ud800")
            jobs = [publisher.submit([Event("custom.x", "{}", user_id=f"u{n}")]) for n in range(60)]
            results = await asyncio.gather(
                *jobs[:30], publisher.submit([bad]), *jobs[30:], return_exceptions=True
            )
            return results, len(await store.read_all(after=0, limit=1000))
        finally:
            await publisher.close()
            await store.close()

    results, stored = asyncio.run(run())
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], StoreRejected) and refused[0].status == 422
    assert stored == 60


# --- 5. an unreadable (sealed with a removed key) event wedges nobody ----------------------------


def test_events_sealed_with_a_removed_key_are_skipped_not_503(make_server: MakeServer) -> None:
    old = new_key()
    first = make_server("keys.db", encryption_keys=old)
    first.publish_ok({"type": "custom.secret", "user_id": "alice", "sensitive": True, "data": {"s": 1}})
    [plain] = first.publish_ok({"type": "custom.plain", "user_id": "alice", "data": {"p": 1}})
    first.stop()
    server = make_server("keys.db", encryption_keys=new_key())  # the old key was removed
    polled = httpx.get(server.url + "/api/v1/events?after=0", headers=_bearer(server, "alice"))
    assert polled.status_code == 200, polled.text
    assert [e["id"] for e in polled.json()["events"]] == [plain]
    with server.stream("alice", headers={"Last-Event-ID": "0"}) as s:
        assert [m.id for m in s.read_count(1)] == [plain]
        [later] = server.publish_ok({"type": "custom.plain", "user_id": "alice"})
        assert [m.id for m in s.read_count(2)] == [plain, later]  # not cut
    dropped = 'scribe_events_events_dropped_total{instance="test-instance",reason="unreadable"}'
    assert dropped in httpx.get(server.url + "/metrics").text


def test_failure_recorder_gives_up_on_a_cut_it_cannot_record(tmp_path: Path) -> None:
    async def run() -> tuple[int, int]:
        store = SQLEventStore(f"sqlite+aiosqlite:///{tmp_path / 'rec.db'}")
        await store.start()
        hub = Hub(instance="i", heartbeat_s=30, max_buffer=1000, max_queue=1000)
        recorder = FailureRecorder(store, hub, retry_s=0.01)
        recorder.start()
        try:
            publisher = Publisher(store, MemoryBroker(), queue_max=10, batch_max=10)
            await publisher.start()
            await publisher.submit([Event("custom.x", "{}", user_id="u")])
            await publisher.close()
            hub.last_seq = 1
            async with store._engine.begin() as conn:  # the recorder's table is gone for good
                await conn.exec_driver_sql("DROP TABLE failed_deliveries")
            for n in range(2):
                conn_ = Connection(f"c{n}", "u", None, FakeSink())
                recorder.on_cut(conn_, "slow_client")
            for _ in range(500):
                if recorder.given_up == 2:
                    break
                await asyncio.sleep(0.01)
            return recorder.given_up, len(recorder._waiting)
        finally:
            await recorder.close()
            await store.close()

    assert asyncio.run(run()) == (2, 0)


# --- 6. nobody can fill the failed-delivery table ---------------------------------------------------


def test_unread_replay_backlog_is_not_a_failed_delivery(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("scribe_events.web.stream._DRAIN_TIMEOUT_S", 0.5)
    server = make_server(max_connection_buffer=32 * 1024)
    big = {"type": "custom.big", "user_id": "alice", "data": {"z": "z" * 60_000}}
    for _ in range(8):  # more than the kernel's socket buffers hold
        server.publish_ok({"events": [big] * 16})
    with server.stream("alice", headers={"Last-Event-ID": "0"}, rcvbuf=4096) as s:
        s.read_count(1, event="connection.established")
        wait_for(lambda: server.runtime.hub.cut_off >= 1, timeout=10)  # not read: cut as slow
    time.sleep(0.3)  # the recorder runs in the background
    failed = httpx.get(server.url + "/api/v1/admin/events/failed", headers=_admin(server)).json()["failed"]
    assert failed == []


def test_failed_deliveries_are_bounded_per_user(make_server: MakeServer) -> None:
    server = make_server(max_connection_buffer=32 * 1024, max_failed_per_user=5)
    for _ in range(3):
        with server.stream("alice", rcvbuf=4096) as slow:
            slow.read_count(1, event="connection.established")
            before = server.runtime.hub.cut_off
            for _ in range(20):
                server.publish_ok(
                    {"events": [{"type": "custom.big", "user_id": "alice", "data": {"z": "z" * 16_000}}] * 40}
                )
                if server.runtime.hub.cut_off > before:
                    break
            wait_for(lambda: server.runtime.hub.cut_off > before)  # noqa: B023
    time.sleep(0.3)
    failed = httpx.get(
        server.url + "/api/v1/admin/events/failed", headers=_admin(server), params={"user_id": "alice"}
    ).json()["failed"]
    assert 0 < len(failed) <= 5


# --- 8. every value, depth and list has a bound and a clear 4xx --------------------------------------


def test_out_of_range_admin_values_are_422_not_500(server: ThreadServer) -> None:
    for days in (b"1e300", b"1e6"):
        r = httpx.post(
            server.url + "/api/v1/admin/events/purge",
            headers={**_admin(server), "Content-Type": "application/json"},
            content=b'{"older_than_days": %b}' % days,
        )
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("older_than_days"), r.text
    r = httpx.post(
        server.url + "/api/v1/admin/bans", headers=_admin(server), json={"user_id": "b", "ttl_s": 10**14}
    )
    assert r.status_code == 422, r.text
    assert httpx.get(server.url + "/api/v1/admin/bans", headers=_admin(server)).status_code == 200
    r = httpx.get(server.url + "/api/v1/events?after=99999999999999999999", headers=_bearer(server, "a"))
    assert r.status_code == 400


def test_deeply_nested_data_is_refused(server: ThreadServer) -> None:
    for depth in (33, 950, 100_000):
        body = b'{"type": "custom.x", "user_id": "a", "data": {"d": ' + b"[" * depth + b"]" * depth + b"}}"
        r = _raw_publish(server, body)
        assert r.status_code in (400, 422), (depth, r.status_code, r.text)
        assert r.json()["error"]["code"] in ("validation_error", "invalid_json")


def test_body_over_the_limit_on_an_admin_route_is_413(server: ThreadServer) -> None:
    big = b'{"older_than_days": 1, "pad": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    r = httpx.post(server.url + "/api/v1/admin/events/purge", headers=_admin(server), content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 65536

    r = httpx.post(server.url + "/api/v1/admin/bans", headers=_admin(server), content=chunks())
    assert r.status_code == 413


def test_too_many_type_globs_are_422_on_stream_and_polling(server: ThreadServer) -> None:
    globs = ",".join(f"custom.t{n}" for n in range(1200))
    with server.stream("alice", path=f"/api/v1/events/stream?types={globs}") as s:
        assert s.status == 422 and "at most 50" in s.error_body["error"]["message"]
    r = httpx.get(
        server.url + "/api/v1/events", params={"after": "0", "types": globs}, headers=_bearer(server, "a")
    )
    assert r.status_code == 422
    with server.stream("alice", path="/api/v1/events/stream?types=" + ",".join(["custom.*"] * 50)) as ok:
        assert ok.status == 200


# --- stream caps, tickets, token expiry ---------------------------------------------------------------


def test_streams_per_user_are_capped_and_others_still_connect(make_server: MakeServer) -> None:
    server = make_server(max_streams_per_user=3)
    held = [server.stream("alice") for _ in range(3)]
    try:
        for s in held:
            s.read_count(1, event="connection.established")
        with server.stream("alice") as refused:
            assert refused.status == 429 and refused.error_body["error"]["code"] == "too_many_streams"
            assert int(refused.headers["retry-after"]) >= 1
        with server.stream(token=server.token("root", roles=["admin"])) as admin:
            assert admin.status == 200
        with server.stream("bob") as bob:
            bob.read_count(1, event="connection.established")
            server.publish_ok({"type": "custom.x", "user_id": "bob"})
            assert len(bob.read_count(1)) == 1
        held.pop().close()
        wait_for(lambda: server.connections() == 2)
        with server.stream("alice") as again:
            assert again.status == 200
    finally:
        for s in held:
            s.close()


def test_streams_per_address_are_capped(make_server: MakeServer) -> None:
    server = make_server(max_streams_per_ip=2)
    with server.stream("a") as one, server.stream("b") as two:
        one.read_count(1, event="connection.established")
        two.read_count(1, event="connection.established")
        with server.stream("c") as third:
            assert third.status == 429


def test_tickets_per_user_are_capped(make_server: MakeServer) -> None:
    server = make_server(max_tickets_per_user=3)

    def mint(user: str) -> httpx.Response:
        return httpx.post(server.url + "/api/v1/events/tickets", headers=_bearer(server, user))

    assert [mint("alice").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert mint("bob").status_code == 200
    r = mint("alice")
    assert r.json()["error"]["code"] == "too_many_tickets" and "retry-after" in r.headers


def test_stream_ends_when_its_token_expires(make_server: MakeServer) -> None:
    server = make_server(heartbeat_s=0.2)
    with server.stream(token=server.token("alice", ttl_s=1)) as s:
        s.read_count(1, event="connection.established")
        s.wait_closed(timeout=5)
        assert s.ended  # a clean end of the body, not a cut
    kept = make_server("kept.db", heartbeat_s=0.2, end_stream_at_token_expiry=False)
    with kept.stream(token=kept.token("alice", ttl_s=1)) as s:
        s.read_count(1, event="connection.established")
        s.idle(1.6)
        assert not s.closed


# --- suspected: purge during a resume, queue bytes, configuration ------------------------------------


def test_purge_between_planning_and_reading_a_replay_says_truncated(server: ThreadServer) -> None:
    ids = [server.publish_ok({"type": "custom.x", "user_id": "alice", "data": {"n": n}})[0] for n in range(4)]
    store = server.runtime.store
    real_read = store.read

    async def purge_first(**kw: Any) -> Any:  # a purge lands right before the replay's first read
        store.read = real_read
        await store.set_meta("purged_through", int(ids[1]))
        async with store._engine.begin() as conn:
            await conn.exec_driver_sql(f"DELETE FROM events WHERE id <= {int(ids[1])}")
        return await real_read(**kw)

    store.read = purge_first
    with server.stream("alice", headers={"Last-Event-ID": ids[0]}) as s:
        s.read_count(2)
        assert [m.event for m in s.messages][1] == "replay.truncated"
        assert [m.id for m in s.events()] == ids[2:]


def test_publish_queue_is_bounded_in_bytes(tmp_path: Path) -> None:
    async def run() -> BaseException | None:
        store = SQLEventStore(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}")
        await store.start()
        publisher = Publisher(store, MemoryBroker(), queue_max=1000, batch_max=10, queue_bytes=10_000)
        await publisher.start()
        try:
            big = [Event("custom.x", json.dumps({"z": "z" * 6000}), user_id="u")]
            first = asyncio.ensure_future(publisher.submit(big))
            await asyncio.sleep(0)  # the first is queued, not yet taken
            try:
                await publisher.submit(big)  # while the first is still queued: over 10,000 bytes
            except StoreUnavailable as exc:
                await first
                return exc
            return None
        finally:
            await publisher.close()
            await store.close()

    refused = asyncio.run(run())
    assert isinstance(refused, StoreUnavailable) and "bytes" in refused.message


def test_faults_are_refused_in_production() -> None:
    from pydantic import ValidationError

    from scribe_events.config import Settings

    with pytest.raises(ValidationError, match="production"):
        Settings(environment="production", jwt_secret="s" * 40, faults=["kill_after_commit"])


# --- background tasks never die silently -----------------------------------------------------------


def test_a_crashed_heartbeat_is_logged_counted_and_restarted(
    make_server: MakeServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = make_server(heartbeat_s=0.1)
    hub = server.runtime.hub
    real = hub.heartbeat
    crashed: list[bool] = []

    def once() -> None:
        if not crashed:
            crashed.append(True)
            raise RuntimeError("a bug in the heartbeat")
        real()

    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        hub.heartbeat = once
        s.read_count(3, event="heartbeat", timeout=5)  # it came back
    assert crashed
    assert "scribe-heartbeat crashed; restarting" in capfd.readouterr().err
    assert (
        'scribe_events_background_task_crashes_total{instance="test-instance",task="scribe-heartbeat"}'
        in (httpx.get(server.url + "/metrics").text)
    )


def test_cancel_reports_a_task_that_failed(caplog: pytest.LogCaptureFixture) -> None:
    from scribe_events.tasks import CRASHES, cancel, spawn

    async def run() -> None:
        async def boom() -> None:
            raise ValueError("lost")

        task = spawn(boom(), "test-boom")
        await asyncio.sleep(0.01)
        await cancel(task)

    before = CRASHES["test-boom"]
    asyncio.run(run())
    assert CRASHES["test-boom"] == before + 1 and "background task test-boom crashed" in caplog.text


def test_a_body_that_never_finishes_is_408(make_server: MakeServer) -> None:
    server = make_server(body_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        head = (
            "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.publisher()}\r\nContent-Length: 100\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"type": ')
        started = time.monotonic()
        answer = b""
        while b"request_timeout" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 3
        sock.settimeout(2)
        while sock.recv(65536):  # then the server closes the connection
            pass
    assert server.publish({"type": "custom.x", "user_id": "u"}).status_code == 202


# --- gaps found by reverting each fix in turn -----------------------------------------------------


def test_admins_pass_the_stream_caps(make_server: MakeServer) -> None:
    server = make_server(max_streams_per_user=1, max_streams_per_ip=2)
    admin = server.token("root", roles=["admin"])
    held = [server.stream(token=admin) for _ in range(3)]  # past both caps
    try:
        for s in held:
            assert s.status == 200
            s.read_count(1, event="connection.established")
        with server.stream("alice") as alice:  # a user at the address cap is still refused
            assert alice.status == 429 and alice.error_body["error"]["code"] == "too_many_streams"
    finally:
        for s in held:
            s.close()


def test_publisher_close_answers_what_it_cannot_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("scribe_events.publisher.CLOSE_TIMEOUT_S", 0.3)

    async def run() -> tuple[float, list[Any]]:
        store = SQLEventStore(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
        await store.start()
        publisher = Publisher(store, MemoryBroker(), queue_max=10, batch_max=1)
        await publisher.start()
        stuck = asyncio.Event()

        async def hangs(*_: Any, **__: Any) -> None:
            await stuck.wait()  # a store that never answers

        monkeypatch.setattr(store, "append", hangs)
        first = asyncio.ensure_future(publisher.submit([Event("custom.x", "{}", user_id="u")]))
        second = asyncio.ensure_future(publisher.submit([Event("custom.y", "{}", user_id="u")]))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await publisher.close()  # bounded, not forever
        took = time.monotonic() - started
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 2)
        await store.close()
        return took, results

    took, (first, second) = asyncio.run(run())
    assert took < 2
    # Both publishers are answered: the one cut off mid-commit, and the one still queued.
    assert isinstance(first, ShuttingDown) and "may have been stored" in first.message
    assert isinstance(second, ShuttingDown) and "stopped before storing" in second.message


def test_idempotency_key_is_checked_whole() -> None:
    from scribe_events.ids import IDEMPOTENCY_KEY

    assert IDEMPOTENCY_KEY.fullmatch("key-1") is not None
    for bad in ("key\n", "key\r", "", "k" * 201, "ke y"):
        assert IDEMPOTENCY_KEY.fullmatch(bad) is None, repr(bad)


def test_polling_checks_the_session_ids_form(server: ThreadServer) -> None:
    r = httpx.get(
        server.url + "/api/v1/events", params={"session_id": "s\n"}, headers=_bearer(server, "alice")
    )
    assert r.status_code in (400, 422) and r.json()["error"]["code"] == "invalid_session_id", r.text
    ok = httpx.get(
        server.url + "/api/v1/events", params={"session_id": "s1"}, headers=_bearer(server, "alice")
    )
    assert ok.status_code == 200


def test_an_event_that_cannot_be_framed_is_refused_before_it_is_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last line of defence: were an identifier rule ever too lax, the frame built before the
    commit still refuses what could not be sent."""
    from scribe_events import vocabulary
    from scribe_events.exceptions import ValidationFailed

    monkeypatch.setattr(vocabulary, "check_type_name", lambda value, field: value)  # a lax rule
    with pytest.raises(ValidationFailed, match="cannot be sent"):
        vocabulary.parse_publish({"type": "custom.x\n", "user_id": "u"}, max_event_bytes=65536)
