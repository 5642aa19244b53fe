"""Routing (user, session, broadcast), type filters, resume and replay, disconnects, slow clients."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import MakeServer
from tests.harness import ThreadServer, wait_for


def _ready(*streams):  # type: ignore[no-untyped-def]
    for s in streams:
        s.read_count(1, event="connection.established")


def test_routing_user_session_and_broadcast(server: ThreadServer) -> None:
    with (
        server.stream("alice", path="/api/v1/events/stream?session_id=s1") as a1,
        server.stream("alice", path="/api/v1/events/stream?session_id=s2") as a2,
        server.stream(token=server.token("bob", session_id="s1")) as b,
    ):
        _ready(a1, a2, b)
        server.publish_ok({"type": "custom.user", "user_id": "alice", "data": {"n": 1}})
        server.publish_ok(
            {"type": "custom.session", "user_id": "alice", "session_id": "s1", "data": {"n": 2}}
        )
        server.publish_ok({"type": "custom.bob", "user_id": "bob", "session_id": "s1", "data": {"n": 3}})
        server.publish_ok({"type": "custom.all", "broadcast": True, "data": {"n": 4}})
        a1.read_count(3)
        a2.read_count(2)
        b.read_count(2)
        for s in (a1, a2, b):
            s.idle(0.3)
        assert [m.event for m in a1.events()] == ["custom.user", "custom.session", "custom.all"]
        assert [m.event for m in a2.events()] == ["custom.user", "custom.all"]
        assert [m.event for m in b.events()] == ["custom.bob", "custom.all"]
        assert all(m.json()["session_id"] == "s1" for m in a1.events("custom.session"))


def test_routing_user_b_never_sees_user_a(server: ThreadServer) -> None:
    with server.stream("alice") as a, server.stream("bob") as b:
        _ready(a, b)
        for i in range(20):
            server.publish_ok({"type": "custom.secret", "user_id": "alice", "data": {"i": i}})
        server.publish_ok({"type": "custom.mine", "user_id": "bob"})
        a.read_count(20)
        b.read_count(1)
        b.idle(0.3)
        assert [m.event for m in b.events()] == ["custom.mine"]
        poll = server.token("bob")
        import httpx

        body = httpx.get(
            server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {poll}"}
        ).json()
        assert [e["type"] for e in body["events"]] == ["custom.mine"]


def test_stream_types_filter(server: ThreadServer) -> None:
    with server.stream("alice", path="/api/v1/events/stream?types=task.*,custom.keep") as s:
        _ready(s)
        server.publish_ok({"type": "custom.drop", "user_id": "alice"})
        server.publish_ok({"type": "custom.keep", "user_id": "alice"})
        server.publish_ok(
            {
                "type": "task.progress-updated",
                "user_id": "alice",
                "data": {"task_id": "t1", "progress": 50, "status_text": "half"},
            }
        )
        s.read_count(2)
        s.idle(0.2)
        assert [m.event for m in s.events()] == ["custom.keep", "task.progress-updated"]


def test_resume_after_restart_replays_missed_events_once_in_order(make_server: MakeServer) -> None:
    first = make_server("shared.db")
    with first.stream("alice") as s:
        _ready(s)
        seen = [
            first.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0] for n in range(3)
        ]
        s.read_count(3)
        last = s.parser.last_event_id
        assert last == seen[-1]
    missed = [
        first.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0] for n in range(3, 8)
    ]
    first.publish_ok({"type": "custom.other", "user_id": "bob"})
    first.stop()

    second = make_server("shared.db")
    with second.stream("alice", headers={"Last-Event-ID": last}) as s:
        hello = s.read_count(1, event="connection.established")[0].json()
        assert hello["resumed_from"] == last
        s.read_count(5)
        live = second.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": 8}})
        s.read_count(6)
        s.idle(0.3)
        got = [m.id for m in s.events()]
        assert got == missed + live
        assert [m.json()["data"]["n"] for m in s.events()] == list(range(3, 9))
        assert not s.events("replay.truncated")


def test_resume_seam_has_no_gap_or_duplicate_under_load(server: ThreadServer) -> None:
    ids: list[str] = []
    stop = threading.Event()

    def publish_forever() -> None:
        while not stop.is_set():
            ids.extend(
                server.publish_ok({"type": "custom.tick", "user_id": "alice", "data": {"pad": "x" * 200}})
            )

    with server.stream("alice") as s:
        _ready(s)
        worker = threading.Thread(target=publish_forever)
        worker.start()
        try:
            s.read_count(10)
            resume_from = s.events()[9].id
            s.close()
            time.sleep(0.2)
            with server.stream("alice", headers={"Last-Event-ID": resume_from}) as again:
                time.sleep(0.3)
                stop.set()
                worker.join()
                expected = ids[ids.index(resume_from) + 1 :]
                again.read_count(len(expected), timeout=10)
                again.idle(0.3)
                assert [m.id for m in again.events()] == expected
        finally:
            stop.set()
            worker.join()


def test_resume_with_garbage_or_unknown_id_sends_replay_truncated(server: ThreadServer) -> None:
    [first_id] = server.publish_ok({"type": "custom.n", "user_id": "alice"})
    for bad in ("not-a-number", "999999", "-1", "01"):
        with server.stream("alice", headers={"Last-Event-ID": bad}) as s:
            s.read_count(1, event="replay.truncated")
            truncated = s.events("replay.truncated")[0]
            assert truncated.json() == {"last_event_id": bad, "oldest_available": first_id}
            assert truncated.id is None
            [live] = server.publish_ok({"type": "custom.live", "user_id": "alice"})
            assert [m.id for m in s.read_count(1)] == [live]


def test_resume_via_query_parameter(server: ThreadServer) -> None:
    a = server.publish_ok({"type": "custom.n", "user_id": "alice"})[0]
    b = server.publish_ok({"type": "custom.n", "user_id": "alice"})[0]
    with server.stream("alice", path=f"/api/v1/events/stream?last_event_id={a}") as s:
        assert [m.id for m in s.read_count(1)] == [b]


def test_closing_a_client_removes_it_within_a_second(server: ThreadServer) -> None:
    s = server.stream("alice")
    _ready(s)
    assert server.connections() == 1
    s.close()
    took = wait_for(lambda: server.connections() == 0, timeout=1.0)
    assert took < 1.0


def test_slow_client_is_cut_off_while_others_keep_receiving(make_server: MakeServer) -> None:
    server = make_server(max_connection_buffer=64 * 1024)
    slow = server.stream("alice", rcvbuf=4096)
    fast = server.stream("alice")
    try:
        _ready(slow, fast)
        # More than the kernel's socket buffers can hide (tcp_wmem reaches 4 MiB): 12 MiB in all.
        batch = {"events": [{"type": "custom.big", "broadcast": True, "data": {"blob": "z" * 16_000}}] * 40}
        ids = []
        for _ in range(20):
            ids += server.publish_ok(batch)
            fast.read_count(len(ids), timeout=5)
        assert [m.id for m in fast.events()] == ids
        wait_for(lambda: server.connections() == 1, timeout=2)
        assert server.runtime.hub.cut_off == 1
        slow.wait_closed(timeout=5)
    finally:
        slow.close()
        fast.close()


def test_disconnect_is_logged_with_its_reason(server: ThreadServer, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="scribe_events.hub")
    s = server.stream("alice")
    hello = s.read_count(1, event="connection.established")[0].json()
    s.close()
    wait_for(lambda: server.connections() == 0, timeout=1.0)
    closed = [r.getMessage() for r in caplog.records if "closed" in r.getMessage()]
    assert any(hello["connection_id"] in m and "reason=client_closed" in m for m in closed), closed


def test_each_event_is_encoded_once_for_all_connections(server: ThreadServer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from scribe_events import events

    calls: list[str | None] = []
    real = events.sse.frame

    def counting(data: str, **kw):  # type: ignore[no-untyped-def]
        calls.append(kw.get("event"))
        return real(data, **kw)

    streams = [server.stream(f"user{i}") for i in range(5)]
    try:
        _ready(*streams)
        monkeypatch.setattr(events.sse, "frame", counting)
        server.publish_ok({"type": "custom.everyone", "broadcast": True})
        for s in streams:
            s.read_count(1)
        assert calls.count("custom.everyone") == 1
    finally:
        for s in streams:
            s.close()


def test_stream_cors_for_allowed_origin_only(make_server: MakeServer) -> None:
    server = make_server(cors_origins=["https://app.example"])
    with server.stream("alice", headers={"Origin": "https://app.example"}) as s:
        assert s.headers["access-control-allow-origin"] == "https://app.example"
    with server.stream("alice", headers={"Origin": "https://evil.example"}) as s:
        assert "access-control-allow-origin" not in s.headers
    import httpx

    pre = httpx.options(
        server.url + "/api/v1/events/stream",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_stream_works_through_asgi_send_on_a_plain_server(make_server: MakeServer, protocol: str) -> None:
    """Without our protocol (no transport in the scope) the stream falls back to ASGI send."""
    server = make_server(http=protocol, heartbeat_s=0.3)
    with server.stream("alice", headers={"Last-Event-ID": "0"}) as s:
        s.read_count(1, event="connection.established")
        ids = server.publish_ok(
            {"events": [{"type": "custom.n", "user_id": "alice", "data": {"n": n}} for n in range(3)]}
        )
        assert [m.id for m in s.read_count(3)] == ids
        s.read_count(1, event="heartbeat", timeout=2)
        assert server.connections() == 1
    wait_for(lambda: server.connections() == 0, timeout=2)
    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        server.stop()
        s.wait_closed(timeout=5)
        assert s.ended


def test_system_error_overtakes_the_backlog_of_a_slow_reader(make_server: MakeServer) -> None:
    """R4.7: a system.error published while a slow reader has a backlog waiting for its socket
    arrives before the end of that backlog (without an id: line), and again in order with its id;
    nothing is lost or cut."""
    server = make_server(max_connection_buffer=64 * 1024, max_connection_queue=32 * 1024 * 1024)
    slow = server.stream("alice", rcvbuf=4096)
    try:
        _ready(slow)
        batch = {"events": [{"type": "custom.big", "user_id": "alice", "data": {"blob": "z" * 16_000}}] * 40}
        ids: list[str] = []
        for _ in range(16):  # 10 MiB: more than the kernel's buffers can hide
            ids += server.publish_ok(batch)
        hub = server.runtime.hub
        (conn,) = hub.connections.values()
        wait_for(lambda: conn.backlog is not None and len(conn.backlog) > 0, timeout=5)
        error = {
            "type": "system.error",
            "user_id": "alice",
            "data": {"level": "critical", "impact": "all", "message": "db down"},
        }
        (error_id,) = server.publish_ok(error)
        slow.read_until(lambda ms: any(m.id == error_id for m in ms), timeout=30)
    finally:
        slow.close()
    kinds = [(m.event, m.id) for m in slow.events()]
    first_error = kinds.index(("system.error", None))
    assert first_error < kinds.index(("custom.big", ids[-1]))  # ahead of the end of the backlog
    assert [i for e, i in kinds if e == "custom.big"] == ids  # the backlog itself: whole, in order
    assert kinds[-1] == ("system.error", error_id)  # and again in order, with its id
    assert server.runtime.hub.cut_off == 0
