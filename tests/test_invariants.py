"""The promises the service rests on, each defended end to end by a test that a mutation of the line
keeping it makes fail: duplicates reach a stream once, a session is always its user's, the hub's
newest id never moves backwards, and the replay seam has neither gap nor duplicate (forced by a
hook, not by sleeps). The cross-instance publish lock is in test_redis.py."""

from __future__ import annotations

from typing import Any

import httpx

from scribe_events.vocabulary import parse_publish
from tests.conftest import MakeServer
from tests.harness import ThreadServer


def _bearer(server: ThreadServer, user: str, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(user, **kw)}"}


async def _relay_from(server: ThreadServer, after: int) -> None:
    """What the outbox relay does after a crash or a broker failure: publish again every stored
    event after ``after`` (here: events every client already has)."""
    publisher = server.runtime.publisher
    publisher.published_through = after
    publisher.behind = True
    await publisher._relay()


def test_an_event_published_again_reaches_a_stream_once(server: ThreadServer) -> None:
    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        sent = [
            server.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0] for n in range(3)
        ]
        s.read_count(3)
        server.call(_relay_from(server, 0))  # all three again, the newest among them
        [last] = server.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": 3}})
        s.read_count(4)
        s.idle(0.2)
        assert [m.id for m in s.events()] == [*sent, last]


def test_the_hubs_newest_id_never_moves_backwards(server: ThreadServer) -> None:
    first = [
        server.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0] for n in range(3)
    ]

    async def publish_again(ids: list[str]) -> None:
        runtime = server.runtime
        await runtime.broker.publish(await runtime.store.read_ids([int(i) for i in ids]))

    server.call(publish_again(first[:1]))  # an old event comes again (a relay): the hub stays at 3
    assert server.runtime.hub.last_seq == int(first[-1])
    with server.stream("alice") as fresh:  # a fresh stream starts from now ...
        fresh.read_count(1, event="connection.established")
        server.call(publish_again(first[1:2]))  # ... so an older event relayed again is not for it
        [new] = server.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": 3}})
        fresh.read_count(1)
        fresh.idle(0.2)
        assert [m.id for m in fresh.events()] == [new]


def test_two_users_with_the_same_session_id_see_only_their_own(server: ThreadServer) -> None:
    def to(user: str, session: str | None = None) -> str:
        body: dict[str, Any] = {"type": "custom.for", "user_id": user, "data": {"user": user}}
        if session:
            body["session_id"] = session
        return str(server.publish_ok(body)[0])

    with server.stream("alice", path="/api/v1/events/stream?session_id=s1") as live:
        live.read_count(1, event="connection.established")
        mine = [to("alice", "s1"), to("alice")]
        theirs = [to("bob", "s1"), to("bob")]
        mine.append(to("alice", "s1"))
        live.read_count(3)
        live.idle(0.2)
        assert [m.id for m in live.events()] == mine
    with server.stream(
        "alice", path="/api/v1/events/stream?session_id=s1", headers={"Last-Event-ID": "0"}
    ) as replay:
        replay.read_count(3)
        replay.idle(0.2)
        assert [m.id for m in replay.events()] == mine
    polled = httpx.get(
        server.url + "/api/v1/events",
        params={"after": "0", "session_id": "s1"},
        headers=_bearer(server, "alice"),
    ).json()
    assert [e["id"] for e in polled["events"]] == mine
    bound = httpx.get(
        server.url + "/api/v1/events?after=0", headers=_bearer(server, "alice", session_id="s1")
    ).json()
    assert [e["id"] for e in bound["events"]] == mine
    assert not set(theirs) & {e["id"] for e in polled["events"] + bound["events"]}


def _seam(
    server: ThreadServer, *, before_read: bool, after_read: bool = False
) -> tuple[list[str], list[str]]:
    """Resume alice from her first event, and commit one more event at the seam: just before the
    replay's last read (it is then both read and parked) or just after it (parked only); with
    both, the parked list holds a duplicate and then a new event."""
    sent = [
        server.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0] for n in range(3)
    ]
    runtime = server.runtime
    store, real_read = runtime.store, runtime.store.read
    seam: list[str] = []

    async def commit_one() -> None:
        event = parse_publish({"type": "custom.seam", "user_id": "alice"}, max_event_bytes=65536)
        seam.extend(await runtime.publisher.submit([event]))

    async def hooked(**kw: Any) -> Any:
        if kw.get("user_id") != "alice" or seam:
            return await real_read(**kw)
        store.read = real_read
        if before_read:
            await commit_one()
        page = await real_read(**kw)
        if after_read:
            await commit_one()
        return page

    store.read = hooked
    with server.stream("alice", headers={"Last-Event-ID": sent[0]}) as s:
        s.read_count(2 + len(seam))
        s.idle(0.2)
        return [m.id for m in s.events()], [*sent[1:], *seam]


def test_replay_seam_event_committed_just_before_the_last_read_comes_once(server: ThreadServer) -> None:
    got, expected = _seam(server, before_read=True)
    assert got == expected


def test_replay_seam_event_committed_just_after_the_last_read_is_not_lost(make_server: MakeServer) -> None:
    got, expected = _seam(make_server(), before_read=False, after_read=True)
    assert got == expected


def test_replay_seam_a_duplicate_parked_before_a_new_event_loses_nothing(make_server: MakeServer) -> None:
    got, expected = _seam(make_server(), before_read=True, after_read=True)
    assert len(expected) == 4 and got == expected


def test_delivered_counts_each_event_written_to_each_stream_once(server: ThreadServer) -> None:
    def delivered() -> float:  # every type family's
        lines = httpx.get(server.url + "/metrics").text.splitlines()
        found = [
            float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("scribe_events_events_delivered_total")
        ]
        assert found, "no scribe_events_events_delivered_total"
        return sum(found)

    streams = [server.stream(f"u{n}", path="/api/v1/events/stream?types=custom.*") for n in range(3)]
    try:
        for s in streams:
            s.read_count(1, event="connection.established")
        before = delivered()
        server.publish_ok({"events": [{"type": "custom.all", "broadcast": True}] * 2})
        server.publish_ok({"type": "other.skipped", "broadcast": True})  # filtered out: not delivered
        server.publish_ok({"type": "custom.one", "user_id": "u1"})
        for s in streams:
            s.read_count(3 if s is streams[1] else 2)
        assert delivered() - before == 3 * 2 + 1
    finally:
        for s in streams:
            s.close()
