"""The hub's mechanics on a sink we control (the socket-level behaviour is in test_stream_*)."""

from __future__ import annotations

import asyncio
import json

from scribe_events import sse
from scribe_events.broker import MemoryBroker
from scribe_events.config import Settings
from scribe_events.control import Control
from scribe_events.events import Delivery, Event, TypeFilter
from scribe_events.hub import Connection, Hub
from scribe_events.state import Ban, MemoryState


class FakeSink:
    """A transport stand-in whose write buffer only drains when the test says so."""

    def __init__(self) -> None:
        self.accepts = False  # True: the kernel takes every write at once, as on a healthy socket
        self.buffered = 0
        self.received: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        if self.closing:
            raise RuntimeError("unable to perform operation on a closed transport")
        self.received.append(data)
        if not self.accepts:
            self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def drain(self) -> None:
        self.buffered = 0


def _delivery(seq: int, size: int = 1000) -> Delivery:
    return Event("custom.n", json.dumps({"pad": "x" * size}), user_id="u", id=seq).delivery()


def test_hub_flush_pending_paced_by_the_socket_never_cuts_a_healthy_client() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink, replaying=True)
    hub.add(conn, from_seq=0)
    hub.dispatch([_delivery(n) for n in range(1, 401)])  # 400 KB parked during the replay
    assert conn.pending is not None and len(conn.pending) == 400
    while not hub.flush_pending(conn, 50):
        assert not sink.aborted
        sink.drain()  # the client reads
    assert conn.pending is None and conn.id in hub.connections
    assert len(sink.received) == 400 and conn.last_seq == 400
    hub.dispatch([_delivery(401), _delivery(400)])  # live again; a duplicate is skipped
    assert len(sink.received) == 401


def test_hub_write_to_a_client_that_left_is_a_disconnect_not_a_failure() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    cuts: list[str] = []
    hub.on_cut.append(lambda c, reason: cuts.append(reason))
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    sink.closing = True  # connection_lost happened; the stream's handler has not run yet
    hub.dispatch([_delivery(1)])
    assert conn.id not in hub.connections and conn.closed_reason == "client_closed"
    assert cuts == [] and hub.cut_off == 0


def test_hub_slow_client_is_cut_and_reported() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=4 * 1024, max_queue=2 * 1024)
    cuts: list[tuple[str, int]] = []
    hub.on_cut.append(lambda c, reason: cuts.append((reason, c.flushed_seq)))
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    sink.accepts = True
    hub.dispatch([_delivery(1)])  # left at once
    sink.accepts = False  # then the client stops reading
    hub.dispatch([_delivery(n) for n in range(2, 10)])
    assert cuts == [("slow_client", 1)]  # event 1 left the buffer; 2.. are the failed ones
    assert sink.aborted and conn.id not in hub.connections


def _typed(seq: int, type_: str, task: str | None = None, size: int = 1000) -> Delivery:
    data = (
        {"task_id": task, "progress": seq} if task else {"level": "critical", "impact": "x", "message": "m"}
    )
    data["pad"] = "x" * size
    return Event(type_, json.dumps(data), user_id="u", id=seq, task_id=task).delivery()


def _ids_of(chunks: list[bytes]) -> list[str]:
    """The envelope ids of the frames written, in order (with or without an id: line)."""
    out = []
    for chunk in chunks:
        for line in sse.unchunk(chunk).split(b"\n"):
            if line.startswith(b"data: "):
                out.append(json.loads(line[6:])["id"])
    return out


def _id_lines(chunks: list[bytes]) -> list[str]:
    return [
        line[4:].decode()
        for chunk in chunks
        for line in sse.unchunk(chunk).split(b"\n")
        if line.startswith(b"id: ")
    ]


def _drain_all(hub: Hub, conn: Connection, sink: FakeSink) -> None:
    while conn.backlog is not None:
        sink.drain()  # the client reads; the transport says it can take more
        hub.drain(conn)
        assert not sink.aborted


def test_hub_backlog_holds_what_a_full_socket_cannot_take_and_drains_it_in_order() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=4 * 1024, max_queue=64 * 1024)
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    hub.dispatch([_delivery(n) for n in range(1, 6)])  # 5 KB: past the high-water mark
    assert conn.backlog is not None
    written = len(_ids_of(sink.received))
    assert written == 4  # up to the one that crossed the mark, as lone writes would: the rest wait
    hub.dispatch([_delivery(n) for n in range(6, 21)])
    assert len(_ids_of(sink.received)) == written and len(conn.backlog) == 20 - written  # held, not cut
    hub.dispatch([_delivery(12)])  # a duplicate of a held one is still skipped
    _drain_all(hub, conn, sink)
    assert _ids_of(sink.received) == [str(n) for n in range(1, 21)]
    assert conn.id in hub.connections and conn.last_seq == 20
    sink.drain()
    hub.dispatch([_delivery(21)])  # drained: straight to the socket again
    assert conn.backlog is None and _ids_of(sink.received[-1:]) == ["21"]


def test_hub_backlog_past_its_budget_cuts_the_client() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=2 * 1024, max_queue=8 * 1024)
    cuts: list[str] = []
    hub.on_cut.append(lambda c, reason: cuts.append(reason))
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    hub.dispatch([_delivery(n) for n in range(1, 20)])
    assert cuts == ["slow_client"] and sink.aborted and conn.id not in hub.connections


def test_hub_backlog_lets_system_error_jump_and_keeps_one_progress_update_per_task() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=2 * 1024, max_queue=64 * 1024)
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    hub.dispatch([_delivery(n) for n in range(1, 4)])  # the socket is full from here on
    assert conn.backlog is not None
    before = len(sink.received)
    hub.dispatch(
        [
            _typed(4, "task.progress-updated", "t1"),
            _delivery(5),
            _typed(6, "task.progress-updated", "t2"),
            _typed(7, "task.progress-updated", "t1"),  # replaces 4
            _typed(8, "system.error"),
        ]
    )
    urgent = sink.received[before:]
    assert _ids_of(urgent) == ["8"] and _id_lines(urgent) == []  # at once, without an id: line
    assert conn.backlog.replaced == 1
    _drain_all(hub, conn, sink)
    later = sink.received[before + 1 :]
    # In order; the error again, with its id; update 4 replaced by 7 of the same task.
    assert _id_lines(later) == [x for x in ("3", "5", "6", "7", "8") if x in _id_lines(later)]
    assert _id_lines(later)[-4:] == ["5", "6", "7", "8"]
    assert "4" not in _ids_of(sink.received)


def test_backlog_counts_its_bytes_exactly_and_takes_up_to_a_budget() -> None:
    from scribe_events.backlog import Backlog

    b = Backlog()
    ds = [
        _delivery(1),
        _typed(2, "task.progress-updated", "t1"),
        _delivery(3),
        _typed(4, "task.progress-updated", "t1"),
    ]
    for d in ds:
        b.add(d)
    assert len(b) == 3 and b.replaced == 1  # 4 replaced 2
    assert b.bytes == sum(len(d.chunk) for d in (ds[0], ds[2], ds[3]))
    first = b.take(len(ds[0].chunk) + 1)  # past the first chunk: a second one is taken too
    assert first == [ds[0].chunk, ds[2].chunk] and b.bytes == len(ds[3].chunk)
    assert b.take(0) == [ds[3].chunk] and b.bytes == 0 and len(b) == 0  # always at least one
    b.add(_typed(5, "task.progress-updated", "t1"))  # its task's earlier update already left
    assert b.replaced == 1 and len(b) == 1 and b.bytes == len(b.items[next(iter(b.items))].chunk)
    assert b.take(10**9) and b.take(10**9) == []


def test_backlog_replaces_only_progress_updates_of_the_same_task() -> None:
    from scribe_events.backlog import Backlog

    b = Backlog()
    other = Event("custom.x", "{}", user_id="u", id=3, task_id="t1").delivery()  # a task's, not progress
    for d in (_typed(1, "task.progress-updated", "t1"), _typed(2, "task.progress-updated", "t2"), other):
        b.add(d)
    b.add(_typed(4, "task.progress-updated", "t1"))
    b.add(_typed(5, "task.progress-updated", "t1"))
    assert b.replaced == 2
    assert _ids_of(b.take(10**9)) == ["2", "3", "5"]


def test_hub_drain_fills_the_socket_just_past_its_mark_and_counts_what_it_wrote() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=4 * 1024, max_queue=64 * 1024)
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    hub.dispatch([_delivery(n) for n in range(1, 21)])
    direct = len(_ids_of(sink.received))
    assert hub.delivered == direct
    sink.drain()
    hub.drain(conn)
    chunk = len(_delivery(1).chunk)
    # Past the high-water mark (so the transport pauses and says when it resumes), by one chunk at most.
    assert hub.max_buffer < sink.buffered <= hub.max_buffer + chunk
    assert hub.delivered == len(_ids_of(sink.received)) > direct  # one write may hold several
    sink.buffered = hub.max_buffer  # exactly at the mark: not past it, so one more goes out
    before = len(_ids_of(sink.received))
    hub.drain(conn)
    assert len(_ids_of(sink.received)) == before + 1


def test_hub_drain_that_cannot_write_cuts_the_connection() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=2 * 1024, max_queue=64 * 1024)
    cuts: list[str] = []
    hub.on_cut.append(lambda c, reason: cuts.append(reason))
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    hub.dispatch([_delivery(n) for n in range(1, 8)])
    sink.drain()

    def broken(data: bytes) -> None:
        raise OSError("broken pipe")

    conn.write = broken
    hub.drain(conn)
    assert cuts == ["write_error"] and conn.id not in hub.connections and conn.closed_reason == "write_error"


def test_hub_end_survives_a_sink_that_fails() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=2 * 1024)
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    sink.closing = True  # writes now raise
    hub.end(conn, "shutdown")
    assert conn.id not in hub.connections and conn.closed_reason == "shutdown"


def test_hub_heartbeat_drains_a_backlog_the_transport_never_said_it_could_take() -> None:
    """A sink without flow control (no resume callback): the shared heartbeat drains it."""
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=2 * 1024, max_queue=64 * 1024)
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    hub.dispatch([_delivery(n) for n in range(1, 10)])
    assert conn.backlog is not None
    hub.heartbeat()  # still full: nothing more is written, not even the heartbeat
    held = len(conn.backlog)
    assert held > 0 and not any(b"event: heartbeat" in c for c in sink.received)
    sink.drain()
    hub.heartbeat()
    assert conn.backlog is None or len(conn.backlog) < held
    while conn.backlog is not None:
        sink.drain()
        hub.heartbeat()
    assert _ids_of(sink.received) == [str(n) for n in range(1, 10)]


def test_hub_drain_never_writes_to_a_connection_it_forgot() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=2 * 1024, max_queue=64 * 1024)
    sink = FakeSink()
    conn = Connection("c1", "u", None, sink)
    hub.add(conn)
    hub.dispatch([_delivery(n) for n in range(1, 8)])
    assert conn.backlog is not None
    written = len(sink.received)
    hub.remove(conn, "client_closed")
    sink.drain()
    hub.drain(conn)
    assert len(sink.received) == written


def test_hub_a_sink_that_cannot_say_if_it_is_closing_counts_as_closed() -> None:
    class Broken(FakeSink):
        def is_closing(self) -> bool:
            raise OSError("gone")

        def write(self, data: bytes) -> None:
            raise OSError("gone")

    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    cuts: list[str] = []
    hub.on_cut.append(lambda c, reason: cuts.append(reason))
    conn = Connection("c1", "u", None, Broken())
    hub.add(conn)
    hub.dispatch([_delivery(1)])
    assert conn.closed_reason == "client_closed" and cuts == []  # an ordinary disconnect


def test_control_reload_applies_a_ban_missed_while_away() -> None:
    async def scenario() -> None:
        hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
        state, broker = MemoryState(), MemoryBroker()
        control = Control(Settings(jwt_secret="x" * 40), state, broker, hub)
        await control.start()
        sink = FakeSink()
        hub.add(Connection("c1", "mallory", None, sink))
        await state.save_ban(Ban("user:mallory", "spam", None))  # announced while we were away
        assert broker.on_subscribed is not None
        await broker.on_subscribed()
        assert sink.aborted and not hub.connections

    asyncio.run(scenario())


def test_hub_system_error_overtakes_a_replay_without_moving_last_event_id() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    sink = FakeSink()
    sink.accepts = True
    conn = Connection("c1", "u", None, sink, replaying=True)
    hub.add(conn, from_seq=0)
    error = Event(
        "system.error",
        json.dumps({"level": "critical", "impact": "all", "message": "down"}),
        broadcast=True,
        id=7,
    ).delivery()
    hub.dispatch([_delivery(6), error])
    assert len(sink.received) == 1 and b"id:" not in sink.received[0]  # at once, without id:
    assert b'"id":"7"' in sink.received[0]
    while not hub.flush_pending(conn, 10):
        pass
    assert [b"id: 6" in c for c in sink.received[1:]] == [True, False]
    assert b"id: 7\n" in sink.received[2]  # and again in order, with its id


def _healthy() -> FakeSink:
    sink = FakeSink()
    sink.accepts = True
    return sink


def test_hub_a_filtered_connection_never_spares_the_others() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    sinks = [_healthy() for _ in range(20)]
    for n, sink in enumerate(sinks):
        wanted = TypeFilter.parse("custom.*" if n % 2 else "other.*")
        hub.add(Connection(f"c{n}", f"u{n}", None, sink, types=wanted))
    hub.dispatch([Event("custom.x", "{}", broadcast=True, id=1).delivery()])
    assert [len(s.received) for s in sinks] == [n % 2 for n in range(20)]


def test_hub_heartbeat_cuts_a_broken_connection_and_beats_the_others() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    broken, fine = _healthy(), _healthy()
    broken.closing = True  # its writes raise, as on a transport that is going away
    hub.add(Connection("broken", "u1", None, broken))
    hub.add(Connection("fine", "u2", None, fine))
    hub.heartbeat()
    assert list(hub.connections) == ["fine"] and len(fine.received) == 1


def test_hub_expired_token_ends_the_stream_cleanly_even_on_a_closing_socket() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    reasons: list[str | None] = []
    hub.on_remove.append(lambda c: reasons.append(c.closed_reason))
    gone, closing, kept = _healthy(), _healthy(), _healthy()
    closing.closing = True
    hub.add(Connection("gone", "u1", None, gone, expires_at=1.0))
    hub.add(Connection("closing", "u2", None, closing, expires_at=1.0))
    hub.add(Connection("kept", "u3", None, kept, expires_at=None))
    hub.heartbeat()  # must not raise for the socket that is closing
    assert sorted(r or "" for r in reasons) == ["token_expired", "token_expired"]
    assert gone.received[-1] == sse.CHUNK_END and gone.closing and not gone.aborted
    assert list(hub.connections) == ["kept"] and len(kept.received) == 1


def test_hub_remote_ip_of_ipv4_and_ipv6_peers() -> None:
    from scribe_events.hub import remote_ip

    assert remote_ip("10.1.2.3:5000") == "10.1.2.3"
    assert remote_ip("::1:5000") == "::1"  # as the scope gives an IPv6 peer: host, then port
    assert remote_ip("fe80::1:2:443") == "fe80::1:2"
    assert remote_ip("") == ""


def test_hub_forgets_a_closed_connection_in_every_index() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    gone, stays = _healthy(), _healthy()
    a = Connection("a", "alice", "s1", gone, remote="10.0.0.1:1000")
    b = Connection("b", "alice", "s1", stays, remote="10.0.0.1:1001")
    hub.add(a)
    hub.add(b)
    assert (hub.count_user("alice"), hub.count_ip("10.0.0.1")) == (2, 2)
    hub.remove(a, "client_closed")
    assert (hub.count_user("alice"), hub.count_ip("10.0.0.1")) == (1, 1)
    hub.dispatch([Event("custom.x", "{}", user_id="alice", session_id="s1", id=1).delivery()])
    assert (len(gone.received), len(stays.received)) == (0, 1)
    hub.remove(b, "client_closed")
    hub.remove(b, "client_closed")  # idempotent: counts never go below zero
    assert (hub.count_user("alice"), hub.count_ip("10.0.0.1"), len(hub)) == (0, 0, 0)
    assert hub._per_ip == {} and hub._by_session == {} and hub._by_user == {}


def test_hub_writes_a_batch_once_per_connection_in_order() -> None:
    hub = Hub(instance="i", heartbeat_s=30, max_buffer=64 * 1024)
    sinks = [FakeSink() for _ in range(3)]
    for n, sink in enumerate(sinks):
        sink.accepts = True
        hub.add(Connection(f"c{n}", "u", None, sink))
    hub.dispatch([_delivery(n, size=100) for n in range(1, 4)])
    for sink in sinks:
        assert len(sink.received) == 1 and _ids_of(sink.received) == ["1", "2", "3"]  # one write each
    hub.dispatch([_delivery(4, size=100)])  # a lone event: straight out
    assert all(len(s.received) == 2 and _ids_of(s.received[-1:]) == ["4"] for s in sinks)
    assert hub.delivered == 12 and all(c.batch is None for c in hub.connections.values())
