"""The publisher SDK and the demo against a real server: throttled progress, retries sent once."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import httpx
import pytest

from scribe_events.demo import DemoPlan, run_demo
from scribe_events.sdk import EventPublisher, PublishError
from tests.conftest import MakeServer
from tests.harness import ThreadServer, cli


class AnswerDroppingProxy:
    """Forwards HTTP/1.1 connections to the server, losing what it is told to: the answers of the
    requests numbered in ``drop`` (1-based; they reached the server, the client never hears of
    them) and the requests numbered in ``refuse`` (they never reach the server). Either way the
    client's connection is closed instead."""

    def __init__(self, target: int, drop: int = 0, *, refuse: frozenset[int] = frozenset()) -> None:
        self.target = target
        self.drop = frozenset(range(1, drop + 1))
        self.refuse = refuse
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0  # requests seen
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        try:
            while True:
                request = _read_message(client)
                if request is None:
                    return
                self.forwarded += 1
                n = self.forwarded
                if n in self.refuse:
                    return
                upstream.sendall(request)
                answer = _read_message(upstream)
                if answer is None or n in self.drop:
                    return  # the server did the work; the client never hears of it
                client.sendall(answer)
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()


def _read_message(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


def _sdk(server: ThreadServer, url: str | None = None, **kw: Any) -> EventPublisher:
    return EventPublisher(url or server.url, token=server.publisher(), **kw)


def test_sdk_task_lifecycle_in_a_tight_loop_reaches_the_reader_throttled_and_complete(
    make_server: MakeServer,
) -> None:
    server = make_server(progress_throttle_s=1.0)

    async def work() -> EventPublisher:
        async with _sdk(server, progress_interval_s=0.5) as events:
            await events.task_started("s1", owner="alice", readers=["bob"], title="Chapter 1")
            for p in range(101):
                await events.task_progress("s1", p, status_text=f"{p}%")
                await asyncio.sleep(0.005)
            await events.task_completed("s1", summary="done")
            return events

    with server.stream("bob") as bob:
        bob.read_count(1, event="connection.established")
        events = asyncio.run(work())
        bob.read_count(1, event="task.progress-completed", timeout=5)
    updates = [m.json()["data"]["progress"] for m in bob.events("task.progress-updated")]
    assert events.held > 50  # the SDK held most of them back itself
    assert 1 <= len(updates) <= 4 and updates[-1] == 100, updates
    assert [m.event for m in bob.events()][-2:] == ["task.progress-updated", "task.progress-completed"]


def test_sdk_retry_after_a_lost_answer_is_stored_and_sent_once(server: ThreadServer) -> None:
    proxy = AnswerDroppingProxy(server.port, drop=1)

    async def work() -> str:
        async with _sdk(server, f"http://127.0.0.1:{proxy.port}", backoff_s=0.05) as events:
            event_id = await events.notify("info", "Hello", "once", user_id="alice")
            assert events.retries == 1
            return event_id

    try:
        with server.stream("alice") as alice:
            alice.read_count(1, event="connection.established")
            event_id = asyncio.run(work())
            alice.read_count(1)
            alice.idle(0.3)
    finally:
        proxy.close()
    assert proxy.forwarded == 2  # the request reached the server twice
    assert [m.id for m in alice.events()] == [event_id]  # and was stored and sent once
    polled = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('alice')}"}
    ).json()["events"]
    assert [e["id"] for e in polled] == [event_id]


def test_sdk_refusals_are_raised_not_retried(server: ThreadServer) -> None:
    async def work() -> None:
        async with _sdk(server) as events:
            await events.task_progress("never-started", 5)

    with pytest.raises(PublishError) as caught:
        asyncio.run(work())
    assert caught.value.status == 422 and caught.value.code == "unknown_task"


def test_sdk_gives_up_on_an_unreachable_server_with_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused

        async def work() -> None:
            async with EventPublisher(
                f"http://127.0.0.1:{port}", token="t", max_retries=2, backoff_s=0.01
            ) as e:
                await e.notify("info", "t", "m", broadcast=True)

        with pytest.raises(PublishError, match="cannot reach"):
            asyncio.run(work())


def test_demo_runs_tasks_a_reader_can_follow(server: ThreadServer) -> None:
    async def work() -> dict[str, int]:
        async with _sdk(server) as events:
            return await run_demo(events, DemoPlan(tasks=2, step_s=0.002, seed=7), report=lambda _: None)

    with server.stream("demo-reader") as reader, server.stream("demo") as owner:
        reader.read_count(1, event="connection.established")
        counts = asyncio.run(work())
        owner.read_count(1, event="system.notification", timeout=10)
        reader.read_count(2, event="task.progress-completed", timeout=5)
    assert counts == {"tasks": 2, "failed": 1, "progress_calls": counts["progress_calls"]}
    kinds = {m.event for m in reader.events()}
    assert {
        "task.progress-started",
        "task.progress-updated",
        "task.progress-failed",
        "task.progress-completed",
    } <= kinds
    assert len(reader.events("task.progress-completed")) == 2
    owner_kinds = {m.event for m in owner.events()}
    assert {"content.novel-created", "content.chapter-updated", "workflow.status-changed"} <= owner_kinds


def test_demo_command_against_a_running_server(server: ThreadServer, tmp_path: Any) -> None:
    env = {"SCRIBE_EVENTS_URL": server.url, "SCRIBE_EVENTS_TOKEN": server.publisher()}
    out = cli("demo", "--tasks", "1", "--step", "0.001", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "1 tasks completed" in out.stdout
    bad = cli("demo", "--tasks", "0", cwd=tmp_path, env=env)
    assert bad.returncode != 0


def test_sdk_completion_waits_for_a_held_update_still_on_its_way(server: ThreadServer) -> None:
    """Regression (review): the completion was posted while the held progress update was still
    retrying; the update then landed after it (refused: task_ended) and the last value was lost."""
    proxy = AnswerDroppingProxy(server.port, refuse=frozenset({3}))  # started, 1st update, then the held one

    async def work() -> EventPublisher:
        async with EventPublisher(
            f"http://127.0.0.1:{proxy.port}", token=server.publisher(), progress_interval_s=0.2, backoff_s=0.4
        ) as e:
            await e.task_started("s9", owner="alice")
            for p in range(1, 40):
                await e.task_progress("s9", p)
            await asyncio.sleep(0.3)  # the window ended: the held update (39) is on its way, retrying
            await e.task_completed("s9", summary="done")
            return e

    try:
        with server.stream("alice") as alice:
            alice.read_count(1, event="connection.established")
            asyncio.run(work())
            alice.read_count(1, event="task.progress-completed", timeout=5)
    finally:
        proxy.close()
    kinds = [
        (m.event, m.json()["data"].get("progress")) for m in alice.events() if m.event.startswith("task.")
    ]
    assert kinds[-2:] == [("task.progress-updated", 39), ("task.progress-completed", None)], kinds
