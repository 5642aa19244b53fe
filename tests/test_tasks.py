"""Tasks over real sockets (R3, R4.5): routing by task_id to the owner and readers only, grants,
the task state's answers, throttled progress, heartbeats and stalls, coalesced chapters."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import MakeServer
from tests.harness import RawStream, ThreadServer, wait_for


def _started(task: str, owner: str, readers: list[str] | None = None, **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"task_id": task, "owner": owner, "title": "Chapter 3", **data}
    if readers is not None:
        body["readers"] = readers
    return {"type": "task.progress-started", "task_id": task, "data": body}


def _update(task: str, progress: float, **kw: Any) -> dict[str, Any]:
    return {
        "type": "task.progress-updated",
        "task_id": task,
        "data": {"task_id": task, "progress": progress, **kw},
    }


def _done(task: str) -> dict[str, Any]:
    return {"type": "task.progress-completed", "task_id": task, "data": {"task_id": task, "summary": "ok"}}


def _poll(server: ThreadServer, user: str, after: int = 0) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{server.url}/api/v1/events?after={after}&limit=500",
        headers={"Authorization": f"Bearer {server.token(user)}"},
    )
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


def _grant(server: ThreadServer, task: str, user: str, *, as_token: str | None = None) -> httpx.Response:
    token = as_token or server.publisher()
    return httpx.post(
        f"{server.url}/api/v1/tasks/{task}/grants",
        json={"user_id": user},
        headers={"Authorization": f"Bearer {token}"},
    )


def _ids(messages: list[Any]) -> list[str]:
    return [m.json()["id"] for m in messages]


def _open(server: ThreadServer, user: str, **kw: Any) -> RawStream:
    s = server.stream(user, **kw)
    s.read_count(1, event="connection.established")
    return s


@pytest.fixture
def quiet(make_server: MakeServer) -> ThreadServer:
    """No throttle or coalescing: routing tests see every event."""
    return make_server(progress_throttle_s=0, coalesce_window_s=0)


def test_task_events_reach_owner_and_readers_only_on_stream_replay_and_polling(quiet: ThreadServer) -> None:
    server = quiet
    with _open(server, "alice") as alice, _open(server, "bob") as bob, _open(server, "carol") as carol:
        started = server.publish_ok(_started("t1", "alice", ["bob"], estimated_duration_s=60))
        ids = started + [server.publish_ok(_update("t1", p))[0] for p in (10, 20)]
        ids += server.publish_ok(_done("t1"))
        server.publish_ok({"type": "custom.marker", "user_id": "carol"})
        for s in (alice, bob):
            got = s.read_count(4)
            assert _ids(got) == ids
            assert [m.id for m in got] == ids  # in order, with their id lines
        carol.read_count(1)
        carol.idle(0.2)
        assert [m.event for m in carol.events()] == ["custom.marker"]
    first = alice.events()[0].json()
    assert first["task_id"] == "t1"
    state = httpx.get(
        f"{server.url}/api/v1/tasks/t1", headers={"Authorization": f"Bearer {server.token('bob')}"}
    ).json()
    assert (state["status"], state["progress"], state["owner"], state["readers"]) == (
        "completed",
        20,
        "alice",
        ["bob"],
    )
    assert state["ended_at"] is not None and state["started_at"] <= state["updated_at"] <= state["ended_at"]
    assert "owner" not in first["data"] and "readers" not in first["data"]  # routing is never sent
    # Replay (resume from before the task) and polling agree with the live stream.
    stored = [ids[0], ids[2], ids[3]]  # only the latest progress update of a task is kept
    for user in ("alice", "bob"):
        with server.stream(user, headers={"Last-Event-ID": "0"}) as again:
            assert _ids(again.read_count(3)) == stored
        assert [e["id"] for e in _poll(server, user)] == stored
    assert [e["type"] for e in _poll(server, "carol")] == ["custom.marker"]
    with server.stream("carol", headers={"Last-Event-ID": "0"}) as again:
        again.read_count(1)
        again.idle(0.2)
        assert [m.event for m in again.events()] == ["custom.marker"]


def test_a_reader_granted_mid_task_gets_what_follows_and_nothing_before(quiet: ThreadServer) -> None:
    server = quiet
    before = server.publish_ok(_started("t2", "alice")) + server.publish_ok(
        {"type": "custom.step", "task_id": "t2", "data": {"n": 1}}
    )
    with _open(server, "dave") as dave, _open(server, "erin") as stranger:
        r = _grant(server, "t2", "dave", as_token=server.token("alice"))  # the owner may grant
        assert r.status_code == 200, r.text
        assert r.json()["readers"] == ["dave"] and r.json()["owner"] == "alice"
        after = server.publish_ok({"type": "custom.step", "task_id": "t2", "data": {"n": 2}})
        after += server.publish_ok(_done("t2"))
        assert _ids(dave.read_count(2)) == after
        dave.idle(0.2)
        assert _ids(dave.events()) == after
        stranger.idle(0.3)
        assert stranger.events() == []
    assert [e["id"] for e in _poll(server, "dave")] == after
    with server.stream("dave", headers={"Last-Event-ID": "0"}) as again:
        assert _ids(again.read_count(2)) == after
        again.idle(0.2)
        assert _ids(again.events()) == after
    assert [e["id"] for e in _poll(server, "alice")] == before + after
    assert _poll(server, "erin") == []


def test_grants_need_the_owner_a_publisher_or_an_admin(quiet: ThreadServer) -> None:
    server = quiet
    server.publish_ok(_started("t3", "alice"))
    assert _grant(server, "t3", "mallory", as_token=server.token("mallory")).status_code == 403
    assert _grant(server, "nope", "bob").json()["error"]["code"] == "unknown_task"
    assert _grant(server, "nope", "bob").status_code == 404
    assert _grant(server, "t3", "bob", as_token=server.token("root", roles=["admin"])).status_code == 200
    seen = httpx.get(
        f"{server.url}/api/v1/tasks/t3", headers={"Authorization": f"Bearer {server.token('bob')}"}
    )
    assert seen.status_code == 200 and seen.json()["status"] == "running"
    hidden = httpx.get(
        f"{server.url}/api/v1/tasks/t3", headers={"Authorization": f"Bearer {server.token('eve')}"}
    )
    assert hidden.status_code == 404


@pytest.mark.parametrize(
    ("events", "status", "code", "field"),
    [
        ([_update("ghost", 5)], 422, "unknown_task", "task_id"),
        (
            [_started("t4", "alice"), _update("t4", 50), _update("t4", 40)],
            422,
            "progress_backwards",
            "data.progress",
        ),
        ([_started("t4", "alice"), _done("t4"), _update("t4", 60)], 422, "task_ended", "type"),
        ([_update("t4", 101)], 422, "validation_error", "data.progress"),
        (
            [{"type": "task.progress-started", "task_id": "t5", "data": {"task_id": "t5"}}],
            422,
            "validation_error",
            "data.owner",
        ),
        (
            [{"type": "custom.x", "task_id": "t6", "data": {"task_id": "other"}}],
            422,
            "validation_error",
            "data.task_id",
        ),
    ],
)
def test_task_state_refuses_what_would_misroute_or_mislead(
    quiet: ThreadServer, events: list[dict[str, Any]], status: int, code: str, field: str
) -> None:
    *setup, last = events
    for body in setup:
        quiet.publish_ok(body)
    head = quiet.publish_ok({"type": "custom.head", "broadcast": True})
    r = quiet.publish(last)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"].startswith(field + ":")
    assert len(r.json()["error"]["message"]) > len(field) + 10  # and says why
    assert quiet.publish_ok({"type": "custom.after", "broadcast": True}) > head  # nothing else was hurt


def test_a_bad_task_event_fails_only_its_own_request(quiet: ThreadServer) -> None:
    """Publishes committed together (group commit): the store refuses one request's events, the
    other requests of the same batch are stored and sent."""
    server = quiet
    server.publish_ok(_started("t7", "alice"))
    with _open(server, "alice") as alice, ThreadPoolExecutor(8) as pool:
        alice.read_count(1)  # the task's state on connect
        bodies = [{"type": "custom.n", "task_id": "t7", "data": {"n": n}} for n in range(20)]
        bodies.insert(10, {"events": [_update("t7", 30), _update("ghost", 1)]})
        answers = list(pool.map(server.publish, bodies))
        refused = [r for r in answers if r.status_code != 202]
        assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(422, "unknown_task")]
        ok = sorted((r.json()["ids"][0] for r in answers if r.status_code == 202), key=int)
        assert sorted(_ids(alice.read_count(21)[1:]), key=int) == ok
        alice.idle(0.2)
        assert len(alice.events()) == 21  # the refused request stored and sent nothing


def test_progress_is_throttled_to_one_a_second_and_the_last_value_comes_before_completion(
    make_server: MakeServer,
) -> None:
    server = make_server(progress_throttle_s=1.0)
    server.publish_ok(_started("t8", "alice"))
    server.publish_ok(_started("o1", "bob"))
    with _open(server, "alice") as alice, _open(server, "bob") as other:
        alice.read_count(1)  # the task's state on connect
        t0 = time.monotonic()
        for first in range(1, 41, 10):  # 40 updates in four requests, well within a second
            server.publish_ok({"events": [_update("t8", p) for p in range(first, first + 10)]})
            if first == 11:
                # Another task and another type are not held back by this task's window.
                server.publish_ok(_update("o1", 50))
                server.publish_ok({"type": "custom.ping", "user_id": "alice"})
                assert other.read_count(2)[-1].json()["data"]["progress"] == 50
                alice.read_count(1, event="custom.ping", timeout=0.5)
        burst_s = time.monotonic() - t0
        server.publish_ok(_done("t8"))
        alice.read_count(1, event="task.progress-completed", timeout=5)
    assert burst_s < 1.0, burst_s
    updates = alice.events("task.progress-updated")
    assert len(updates) == 2, [u.json()["data"]["progress"] for u in updates]
    assert [u.json()["data"]["progress"] for u in updates] == [1, 40]
    kinds = [m.event for m in alice.events()]
    assert kinds[-2:] == ["task.progress-updated", "task.progress-completed"]  # the last value first


def test_a_pause_lets_the_held_value_out_when_its_window_ends(make_server: MakeServer) -> None:
    server = make_server(progress_throttle_s=0.5)
    server.publish_ok(_started("t9", "alice"))
    with _open(server, "alice") as alice:
        for p in (1, 2, 3):
            server.publish_ok(_update("t9", p))
        got = alice.read_count(2, event="task.progress-updated", timeout=3)
        assert [m.json()["data"]["progress"] for m in got] == [1, 3]
        assert got[0].id is not None and got[1].json()["id"]  # the held one: its envelope id kept


def test_a_silent_task_gets_heartbeats_then_stalled_also_after_a_restart(
    make_server: MakeServer, tmp_path: Any
) -> None:
    fast = {"task_heartbeat_s": 0.4, "task_stall_s": 1.2, "progress_throttle_s": 0}
    server = make_server(**fast)
    server.publish_ok(_started("t10", "alice"))
    server.publish_ok(_update("t10", 35))
    with _open(server, "alice") as alice:
        beats = alice.read_count(1, event="task.progress-heartbeat", timeout=5)
        data = beats[0].json()["data"]
        assert data["task_id"] == "t10" and data["progress"] == 35 and data["stalled"] is False
        assert data["last_update_at"].endswith("Z")
        assert beats[0].id is None  # live only
        alice.read_until(
            lambda ms: any(m.event == "task.progress-heartbeat" and m.json()["data"]["stalled"] for m in ms),
            timeout=5,
        )
    server.stop()
    again = make_server(**fast)  # the same SQLite file: task state lives in the store
    with _open(again, "alice") as alice:
        stalled = alice.read_count(1, event="task.progress-heartbeat", timeout=5)
        assert stalled[0].json()["data"]["stalled"] is True
        again.publish_ok(_update("t10", 50))  # a new update clears the stall
        alice.read_until(
            lambda ms: any(
                m.event == "task.progress-heartbeat"
                and m.json()["data"]["progress"] == 50
                and not m.json()["data"]["stalled"]
                for m in ms
            ),
            timeout=5,
        )
        again.publish_ok(_done("t10"))
        alice.read_count(1, event="task.progress-completed")
        n = len(alice.events("task.progress-heartbeat"))
        alice.idle(1.0)
        assert len(alice.events("task.progress-heartbeat")) == n  # heartbeats stop with completion


def test_a_stream_that_opens_gets_the_latest_progress_of_running_tasks(quiet: ThreadServer) -> None:
    server = quiet
    server.publish_ok(_started("t11", "alice"))
    for p in (10, 20, 30):
        server.publish_ok(_update("t11", p))
    server.publish_ok(_started("t12", "alice"))
    server.publish_ok(_started("t13", "alice"))
    server.publish_ok(_done("t13"))
    with server.stream("alice") as alice:
        state = alice.read_count(2, timeout=3)
        alice.idle(0.2)
    assert [(m.event, m.json()["data"].get("progress")) for m in alice.events()] == [
        ("task.progress-updated", 30),
        ("task.progress-started", None),
    ]
    assert all(m.id is None for m in state)  # state, not sequence: the client's Last-Event-ID stays


def test_chapter_updates_of_one_novel_in_a_window_arrive_as_one(make_server: MakeServer) -> None:
    server = make_server(coalesce_window_s=1.0)
    with _open(server, "alice") as alice:
        body = [
            {
                "type": "content.chapter-updated",
                "user_id": "alice",
                "data": {"novel_id": "n1", "chapter_id": f"c{i}", "summary": f"s{i}"},
            }
            for i in range(50)
        ]
        other = {
            "type": "content.chapter-updated",
            "user_id": "alice",
            "data": {"novel_id": "n2", "chapter_id": "x"},
        }
        server.publish_ok({"events": body[:25]})
        server.publish_ok(other)
        server.publish_ok({"events": body[25:]})
        wait_for(
            lambda: (
                len(
                    alice.read_until(
                        lambda ms: sum(m.event == "content.chapter-updated" for m in ms) >= 3, timeout=3
                    )
                )
                > 0
            )
        )
        alice.idle(1.2)
    n1 = [m.json() for m in alice.events("content.chapter-updated") if m.json()["data"]["novel_id"] == "n1"]
    assert 1 <= len(n1) <= 2
    named = [n1[0]["data"]["chapter_id"]] if "chapter_id" in n1[0]["data"] else []
    for e in n1:
        named += [c["chapter_id"] for c in e["data"].get("chapters", [])]
    assert sorted(named) == sorted(f"c{i}" for i in range(50))
    assert n1[-1]["data"]["coalesced"] == 49
    n2 = [m.json() for m in alice.events("content.chapter-updated") if m.json()["data"]["novel_id"] == "n2"]
    assert [e["data"]["chapter_id"] for e in n2] == ["x"]  # other novels are not mixed in


def _chapter(novel: str, chapter: str, user: str = "alice") -> dict[str, Any]:
    return {
        "type": "content.chapter-updated",
        "user_id": user,
        "data": {"novel_id": novel, "chapter_id": chapter},
    }


def test_a_chapter_held_for_coalescing_is_not_lost_by_a_client_that_leaves_in_the_window(
    make_server: MakeServer,
) -> None:
    """Regression (review): a held update goes out late without an id: line, after newer ids; a
    client that left before the window ended resumed past it and never got it. A resuming stream
    now gets the chapter updates at or below its resume point from the last window."""
    server = make_server(coalesce_window_s=1.0)
    with _open(server, "alice") as alice:
        first = server.publish_ok(_chapter("n1", "c1"))
        held = server.publish_ok(_chapter("n1", "c2"))  # within the window: held
        newer = server.publish_ok({"type": "custom.other", "user_id": "alice"})
        alice.read_until(lambda ms: any(m.id == newer[0] for m in ms))
    assert [m.json()["id"] for m in alice.events("content.chapter-updated")] == first  # c2 not yet
    time.sleep(1.3)  # the window ends while nobody is connected: c2 goes out to no one
    with server.stream("alice", headers={"Last-Event-ID": newer[0]}) as again:
        got = again.read_until(
            lambda ms: any(m.event == "content.chapter-updated" and m.json()["id"] == held[0] for m in ms),
            timeout=3,
        )
    late = [m for m in got if m.event == "content.chapter-updated" and m.json()["id"] == held[0]]
    assert late[0].id is None  # state, not sequence: the client's Last-Event-ID stays


def test_held_events_go_out_before_the_streams_end_at_shutdown(make_server: MakeServer) -> None:
    server = make_server(coalesce_window_s=30.0, progress_throttle_s=30.0)
    server.publish_ok(_started("t20", "alice"))
    with _open(server, "alice") as alice:
        alice.read_count(1)  # the task's state
        server.publish_ok(_update("t20", 10))
        server.publish_ok(_update("t20", 20))  # held for 30 s
        server.publish_ok(_chapter("n2", "a"))
        server.publish_ok(_chapter("n2", "b"))  # held for 30 s
        alice.read_count(3)
        server.stop()
        alice.wait_closed(timeout=10)
    progress = [m.json()["data"]["progress"] for m in alice.events("task.progress-updated")]
    assert progress[-1] == 20
    assert [m.json()["data"].get("chapter_id") for m in alice.events("content.chapter-updated")][-1] == "b"


def test_a_grant_mid_window_never_sends_an_older_progress_after_a_newer_one(
    quiet_throttle: ThreadServer,
) -> None:
    """Regression (review): the throttle's key held the readers, so a grant opened a second window
    for the task and the owner got 30 % and then the older 20 %."""
    server = quiet_throttle
    server.publish_ok(_started("t21", "alice"))
    with _open(server, "alice") as alice:
        alice.read_count(1)
        for p in (10, 20):
            server.publish_ok(_update("t21", p))
        assert _grant(server, "t21", "bob").status_code == 200
        server.publish_ok(_update("t21", 30))
        alice.read_until(
            lambda ms: any(
                m.event == "task.progress-updated" and m.json()["data"]["progress"] == 30 for m in ms
            ),
            timeout=3,
        )
        alice.idle(0.7)
    values = [m.json()["data"]["progress"] for m in alice.events("task.progress-updated")]
    assert values == sorted(values) and values[-1] == 30, values


@pytest.fixture
def quiet_throttle(make_server: MakeServer) -> ThreadServer:
    return make_server(progress_throttle_s=0.5, coalesce_window_s=0)


def test_a_fresh_stream_reads_task_state_only_up_to_where_it_starts(quiet: ThreadServer) -> None:
    """Regression (review): a fresh stream's task state was read with no upper bound, after the
    stream was registered; an update newer than one parked for it came first, and the parked
    older one then looked current. The state is read at or below the stream's start."""
    server = quiet
    server.publish_ok(_started("t22", "alice"))
    server.publish_ok(_update("t22", 50))
    seen: list[Any] = []
    live = server.runtime.live
    real = live.snapshot

    async def spy(user: str, session: str | None, through: int, *, resuming: bool) -> Any:
        seen.append((through, server.runtime.hub.last_seq, resuming))
        return await real(user, session, through, resuming=resuming)

    live.snapshot = spy
    try:
        with _open(server, "alice") as alice:
            alice.read_count(1)
    finally:
        live.snapshot = real
    assert seen == [(server.runtime.hub.last_seq, server.runtime.hub.last_seq, False)]


def test_a_heartbeat_pass_that_began_before_a_start_does_not_hide_it() -> None:
    """Regression (review): the pass's answer (no running task) overwrote the flag a start had just
    set, and streams opening then skipped the task state."""
    import asyncio

    from scribe_events.hub import Hub
    from scribe_events.live_tasks import LiveTasks

    class SlowStore:
        async def silent_tasks(self, *, silent_since_ms: int, limit: int = 1000) -> list[Any]:
            live._started()  # a task starts while this query runs; the answer predates it
            return []

    hub = Hub(instance="i", heartbeat_s=30, max_buffer=1024)
    live = LiveTasks(hub, SlowStore(), throttle_s=1, coalesce_s=1, heartbeat_s=60, stall_s=300)  # type: ignore[arg-type]
    live.any_running = False
    asyncio.run(live.beat())
    assert live.any_running
