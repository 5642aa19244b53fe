"""Paths nobody else walks: the SQLite outbox after SIGKILL, graceful shutdown, key rotation from the
environment, single-instance bans, the push-mode and bench CLI, polling ``truncated``, the parked-live
cut, a full publish queue and a busy Idempotency-Key, a client that resets its socket, a store that
fails during a replay, and "committed before sent" seen at the socket write. Real servers on real
sockets; a hook only where a moment must be pinned (each says which)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import signal
import socket
import sqlite3
import struct
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from scribe_events.auth import mint_token
from scribe_events.crypto import new_key
from scribe_events.events import Event
from scribe_events.exceptions import StoreUnavailable
from tests.conftest import MakeServer
from tests.harness import SECRET, ProcessServer, RawStream, ThreadServer, cli, free_port, wait_for

STREAM = "/api/v1/events/stream"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _admin(server: ThreadServer) -> dict[str, str]:
    return _bearer(server.token("root", roles=["admin"]))


def _rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(conn.execute(sql, args).fetchall())


def _execute(db: Path, sql: str, *args: Any) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql, args)


def _poll(url: str, user: str, after: str = "0", **params: Any) -> httpx.Response:
    return httpx.get(
        url + "/api/v1/events",
        params={"after": after, **params},
        headers=_bearer(mint_token(SECRET, user)),
        timeout=10,
    )


def _poll_all(url: str, user: str) -> list[dict[str, Any]]:
    """Every retained event of ``user``, paged through from after=0."""
    out: list[dict[str, Any]] = []
    after = "0"
    while True:
        body = _poll(url, user, after, limit=500).json()
        assert "truncated" not in body, body
        out += body["events"]
        if not body["events"]:
            return out
        after = body["last_id"]


def _env(**extra: str) -> dict[str, str]:
    """A subprocess server on the embedded SQLite default (in its cwd), with the tests' secret."""
    return {"SCRIBE_EVENTS_JWT_SECRET": SECRET, "SCRIBE_EVENTS_HEARTBEAT_S": "0.5", **extra}


def _failed(server: ThreadServer, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(server.url + "/api/v1/admin/events/failed", headers=_admin(server), params=params)
    assert r.status_code == 200, r.text
    return list(r.json()["failed"])


def _metric(url: str, name: str, label: str = "") -> float:
    """The value of the sample ``name`` whose labels hold ``label`` (e.g. ``reason="x"``)."""
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{name}\{{[^}}]*{re.escape(label)}[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _removed_reasons(server: ThreadServer) -> list[tuple[str, str | None]]:
    """(user, closed_reason) of every connection the hub forgets from now on (an observer hook)."""
    seen: list[tuple[str, str | None]] = []
    server.runtime.hub.on_remove.append(lambda c: seen.append((c.user_id, c.closed_reason)))
    return seen


class _QueuedStream(RawStream):
    """A RawStream that says when its request is on the wire (before it waits for the answer), so a
    test can open it while the server is down and the kernel holds it on the listening socket."""

    def __init__(self, *args: Any, sent: threading.Event, **kw: Any) -> None:
        self._sent = sent
        super().__init__(*args, **kw)

    def _read_head(self) -> tuple[int, dict[str, str], Any]:
        self._sent.set()
        return super()._read_head()


# --- 1. the outbox relay after SIGKILL, on the SQLite default -------------------------------------


def test_sqlite_sigkill_between_commit_and_publish_then_restart_relays(tmp_path: Path) -> None:
    crashing = ProcessServer(tmp_path, env=_env(SCRIBE_EVENTS_FAULTS='["kill_after_commit"]')).start()
    token = mint_token(SECRET, "u")
    publisher = _bearer(mint_token(SECRET, "worker", roles=["publisher"]))
    db = tmp_path / "scribe-events.db"
    restarted: ProcessServer | None = None
    queued: dict[str, RawStream] = {}
    try:
        with RawStream(crashing.port, STREAM, _bearer(token)) as s:
            s.read_count(1, event="connection.established")
            with pytest.raises(httpx.HTTPError):
                httpx.post(
                    crashing.url + "/api/v1/events",
                    headers=publisher,
                    json={
                        "type": "workflow.status-changed",
                        "user_id": "u",
                        "data": {"workflow_id": "w1", "old_status": "draft", "new_status": "review"},
                    },
                    timeout=10,
                )
            s.wait_closed(timeout=5)
            assert not s.events()  # the process died between COMMIT and publish
        assert crashing.stop() == -9
        [(row_id, row_type)] = _rows(db, "SELECT id, type FROM events")
        assert row_type == "workflow.status-changed"
        watermark = _rows(db, "SELECT value FROM store_meta WHERE key = 'published_through'")
        assert not watermark or watermark[0][0] < row_id  # committed, never published

        # Two streams opened while no process serves the socket (the test still holds it, so the
        # kernel queues them): one resuming from 0, one fresh.
        sent = {name: threading.Event() for name in ("resumed", "fresh")}
        extra = {"resumed": {"Last-Event-ID": "0"}, "fresh": {}}

        def open_stream(name: str) -> None:
            queued[name] = _QueuedStream(
                crashing.port, STREAM, {**_bearer(token), **extra[name]}, sent=sent[name], timeout=30
            )

        openers = [threading.Thread(target=open_stream, args=(n,)) for n in sent]
        for t in openers:
            t.start()
        for event in sent.values():
            assert event.wait(5)

        restarted = ProcessServer(tmp_path, env=_env())  # no fault; the same folder and socket
        assert restarted.sock is not None
        restarted.sock.close()
        restarted.sock, crashing.sock = crashing.sock, None
        restarted.port, restarted.url = crashing.port, crashing.url
        restarted.start()
        for t in openers:
            t.join(15)
        assert "relaying 1 stored event(s)" in restarted.text()
        resumed, fresh = queued["resumed"], queued["fresh"]
        resumed.timeout = fresh.timeout = 5
        assert resumed.status == 200 and fresh.status == 200
        assert [(m.id, m.event) for m in resumed.read_count(1)] == [(str(row_id), "workflow.status-changed")]
        fresh.read_count(1, event="connection.established")
        r = httpx.post(
            restarted.url + "/api/v1/events",
            headers=publisher,
            json={"type": "custom.after-restart", "user_id": "u"},
            timeout=10,
        )
        assert r.status_code == 202
        [new] = r.json()["ids"]
        resumed.read_count(2)
        fresh.read_count(1)
        resumed.idle(0.3)
        fresh.idle(0.05)
        assert [m.id for m in resumed.events()] == [str(row_id), new]  # the relayed one once, in order
        # A stream without Last-Event-ID starts from now: the event was committed before it connected.
        assert [m.id for m in fresh.events()] == [new]
    finally:
        for s in queued.values():
            s.close()
        if restarted is not None and restarted.proc is not None:
            restarted.stop()
            restarted.close()
        crashing.close()
    [(saved,)] = _rows(db, "SELECT value FROM store_meta WHERE key = 'published_through'")
    assert saved >= int(new)


# --- 2. graceful shutdown -------------------------------------------------------------------------


def test_stream_opened_during_shutdown_is_refused_503_shutting_down(server: ThreadServer) -> None:
    hub = server.runtime.hub
    ticket = httpx.post(server.url + "/api/v1/events/tickets", headers=_bearer(server.token("u"))).json()
    hub.closing = True  # what Hub.close sets first when the server begins to stop
    try:
        with server.stream("u") as refused:
            assert refused.status == 503
            assert refused.error_body["error"]["code"] == "shutting_down"
            assert refused.headers["retry-after"] == "1"
        with server.stream(path=f"{STREAM}?ticket={ticket['ticket']}") as by_ticket:
            assert by_ticket.status == 503 and by_ticket.error_body["error"]["code"] == "shutting_down"
        assert server.connections() == 0
    finally:
        hub.closing = False
    # Refused before it was redeemed: the ticket still opens a stream (e.g. on another instance).
    with server.stream(path=f"{STREAM}?ticket={ticket['ticket']}") as later:
        assert later.status == 200

    # Shutdown beginning while the request is being checked (during its awaits) is caught too.
    service = server.runtime.service
    real_plan = service.plan_resume

    async def plan_then_shutdown(last_event_id: str | None) -> Any:
        plan = await real_plan(last_event_id)
        hub.closing = True
        return plan

    service.plan_resume = plan_then_shutdown
    try:
        with server.stream("u", headers={"Last-Event-ID": "0"}) as late:
            assert late.status == 503 and late.error_body["error"]["code"] == "shutting_down"
    finally:
        service.plan_resume = real_plan
        hub.closing = False
    assert server.connections() == 0
    with server.stream("u") as ok:
        assert ok.status == 200  # the refusals were the shutdown's, nothing else


def _publish_until_stopped(server: ProcessServer, sig: signal.Signals) -> tuple[list[str], int, int]:
    """Twelve publishers post one event after another; once a batch is through (the next one in
    flight: every commit takes 0.5 s), the server gets ``sig``. Returns the ids answered 202, how
    many of those were sent before the signal and answered after it, and the exit code."""
    publisher = _bearer(mint_token(SECRET, "worker", roles=["publisher"]))
    accepted: list[tuple[float, float, list[str]]] = []  # (sent at, answered at, ids)
    lock = threading.Lock()

    def hammer(worker: int) -> None:
        with httpx.Client(headers=publisher, timeout=10) as http:
            for n in range(1000):
                sent_at = time.monotonic()
                try:
                    r = http.post(
                        server.url + "/api/v1/events",
                        json={"type": "custom.n", "user_id": "u", "data": {"w": worker, "n": n}},
                    )
                except httpx.HTTPError:
                    return  # the server stopped listening
                if r.status_code != 202:
                    return
                with lock:
                    accepted.append((sent_at, time.monotonic(), r.json()["ids"]))

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(12)]
    try:
        with RawStream(server.port, STREAM, _bearer(mint_token(SECRET, "u"))) as s:
            s.read_count(1, event="connection.established")
            for t in threads:
                t.start()
            wait_for(lambda: len(accepted) >= 12, timeout=10)
            signalled_at = time.monotonic()
            code = server.stop(sig)
            s.wait_closed(timeout=5)
            assert s.ended  # the open stream got the end of its body, not a reset
    finally:
        for t in threads:
            t.join(15)
        if server.proc is not None and server.proc.poll() is None:
            server.stop(signal.SIGKILL)
    finished = sum(1 for sent_at, answered_at, _ in accepted if sent_at < signalled_at < answered_at)
    return [i for *_, ids in accepted for i in ids], finished, code


def test_graceful_shutdown_stores_every_accepted_event(make_server: MakeServer, tmp_path: Path) -> None:
    port = free_port()  # the server binds it itself, so once it stops listening new connects fail fast
    slow = _env(SCRIBE_EVENTS_FAULTS='["pause_before_commit"]')  # every commit takes 0.5 s
    server = ProcessServer(tmp_path, env=slow, port=port).start()
    accepted, finished, code = _publish_until_stopped(server, signal.SIGTERM)
    assert code == -signal.SIGTERM, server.text()  # stopped by itself (uvicorn re-raises the signal)
    assert finished > 0, "no publish was in flight when the signal came"
    assert "answering what is left 503" not in server.text()
    restarted = make_server("scribe-events.db")  # the service again, on the file `serve` used
    stored = [e["id"] for e in _poll_all(restarted.url, "u")]
    assert len(accepted) == len(set(accepted))
    assert sorted(accepted, key=int) == stored  # every 202 is stored, and nothing else


# --- 3. key rotation from the environment; ciphertext bound to type and audience --------------------


def _kid(key: str) -> str:
    return hashlib.sha256(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))).hexdigest()[:8]


def test_key_rotation_from_the_environment_and_ciphertext_bound_to_its_row(
    make_server: MakeServer, tmp_path: Path
) -> None:
    k1, k2 = new_key(), new_key()
    publisher = _bearer(mint_token(SECRET, "worker", roles=["publisher"]))
    db = tmp_path / "scribe-events.db"

    def secret(url: str, n: int) -> str:
        r = httpx.post(
            url + "/api/v1/events",
            headers=publisher,
            json={"type": "custom.secret", "user_id": "alice", "sensitive": True, "data": {"card": f"c-{n}"}},
            timeout=10,
        )
        assert r.status_code == 202, r.text
        return str(r.json()["ids"][0])

    first = make_server("scribe-events.db", encryption_keys=k1)  # the file `serve` uses in tmp_path
    old = [secret(first.url, 1), secret(first.url, 2)]
    first.stop()
    server = ProcessServer(tmp_path, env=_env(SCRIBE_EVENTS_ENCRYPTION_KEYS=f"{k2},{k1}")).start()
    try:
        new = [secret(server.url, 3), secret(server.url, 4)]
        ids = old + new
        rows = _rows(db, "SELECT id, key_id, data FROM events ORDER BY id")
        assert [(str(i), kid) for i, kid, _ in rows] == [
            (ids[0], _kid(k1)),
            (ids[1], _kid(k1)),
            (ids[2], _kid(k2)),
            (ids[3], _kid(k2)),
        ]  # the first key encrypts; old rows keep theirs
        assert not any('"card"' in data for _, _, data in rows)  # sealed, never in clear

        cards = {e["id"]: e["data"]["card"] for e in _poll_all(server.url, "alice")}
        assert cards == {ids[0]: "c-1", ids[1]: "c-2", ids[2]: "c-3", ids[3]: "c-4"}
        alice = _bearer(mint_token(SECRET, "alice"))
        with RawStream(server.port, STREAM, {**alice, "Last-Event-ID": "0"}) as replay:
            got = replay.read_count(4)
            assert [(m.id, m.json()["data"]["card"]) for m in got] == [
                (ids[0], "c-1"),
                (ids[1], "c-2"),
                (ids[2], "c-3"),
                (ids[3], "c-4"),
            ]

        # Move an old-key row to another user, and retype a new-key row: neither can be read now.
        _execute(db, "UPDATE events SET user_id = 'mallory' WHERE id = ?", int(ids[1]))
        _execute(db, "UPDATE events SET type = 'custom.other' WHERE id = ?", int(ids[3]))
        unreadable = ("scribe_events_events_dropped_total", 'reason="unreadable"')
        before = _metric(server.url, *unreadable)
        mallory = _poll(server.url, "mallory")
        assert mallory.status_code == 200 and mallory.json()["events"] == []  # not delivered to her
        assert _metric(server.url, *unreadable) == before + 1
        with RawStream(
            server.port, STREAM, {**_bearer(mint_token(SECRET, "mallory")), "Last-Event-ID": "0"}
        ) as theirs:
            theirs.read_count(1, event="connection.established")
            theirs.idle(0.3)
            assert theirs.events() == [] and not theirs.closed
        assert _metric(server.url, *unreadable) == before + 2
        assert [e["id"] for e in _poll_all(server.url, "alice")] == [ids[0], ids[2]]
        assert _metric(server.url, *unreadable) == before + 3
    finally:
        server.stop()
        server.close()
    assert f"stored event {ids[1]} cannot be read" in server.text()
    assert f"stored event {ids[3]} cannot be read" in server.text()


# --- 4. bans on one instance (no Redis) -----------------------------------------------------------


def _ban(server: ThreadServer, **body: Any) -> httpx.Response:
    return httpx.post(server.url + "/api/v1/admin/bans", headers=_admin(server), json=body)


def _code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else ""


def test_user_ban_refuses_every_endpoint_closes_streams_and_is_lifted(server: ThreadServer) -> None:
    removed = _removed_reasons(server)
    alice_pub = _bearer(server.token("alice", roles=["publisher"]))
    ticket = httpx.post(server.url + "/api/v1/events/tickets", headers=alice_pub).json()["ticket"]
    with server.stream("alice") as open_, server.stream("bob") as bob:
        open_.read_count(1, event="connection.established")
        bob.read_count(1, event="connection.established")
        r = _ban(server, user_id="alice", reason="spam")
        assert r.status_code == 201
        assert r.json() == {"user_id": "alice", "reason": "spam", "until": None}
        open_.wait_closed(timeout=3)
        bob.idle(0.1)
        assert not bob.closed  # only hers
    assert ("alice", "banned") in removed

    publish = httpx.post(
        server.url + "/api/v1/events", headers=alice_pub, json={"type": "custom.x", "user_id": "bob"}
    )
    assert _code(publish) == (403, "banned") and publish.json()["error"]["message"] == "banned: spam"
    assert _code(_poll(server.url, "alice")) == (403, "banned")
    tickets = httpx.post(server.url + "/api/v1/events/tickets", headers=alice_pub)
    assert _code(tickets) == (403, "banned")
    with server.stream("alice") as refused:
        assert refused.status == 403 and refused.error_body["error"]["code"] == "banned"
    with server.stream(path=f"{STREAM}?ticket={ticket}") as by_ticket:  # minted before the ban
        assert by_ticket.status == 403 and by_ticket.error_body["error"]["code"] == "banned"
    assert _poll(server.url, "bob").status_code == 200

    listed = httpx.get(server.url + "/api/v1/admin/bans", headers=_admin(server)).json()
    assert listed == {"bans": [{"user_id": "alice", "reason": "spam", "until": None}]}
    lifted = httpx.delete(
        server.url + "/api/v1/admin/bans", headers=_admin(server), params={"user_id": "alice"}
    )
    assert lifted.status_code == 200 and lifted.json() == {"lifted": "user:alice"}
    again = httpx.delete(
        server.url + "/api/v1/admin/bans", headers=_admin(server), params={"user_id": "alice"}
    )
    assert _code(again) == (404, "not_found")
    assert _poll(server.url, "alice").status_code == 200
    with server.stream("alice") as back:
        assert back.status == 200


def test_user_ban_with_a_ttl_expires_by_itself(server: ThreadServer) -> None:
    r = _ban(server, user_id="bob", reason="cool off", ttl_s=1)
    assert r.status_code == 201 and r.json()["until"] is not None
    assert _code(_poll(server.url, "bob")) == (403, "banned")
    took = wait_for(lambda: _poll(server.url, "bob").status_code == 200, timeout=3, interval=0.05)
    assert took < 2.5
    assert httpx.get(server.url + "/api/v1/admin/bans", headers=_admin(server)).json() == {"bans": []}
    with server.stream("bob") as s:
        assert s.status == 200


def test_address_ban_closes_and_refuses_non_admins_and_an_admin_lifts_it(server: ThreadServer) -> None:
    removed = _removed_reasons(server)
    with server.stream("carol") as carol:
        carol.read_count(1, event="connection.established")
        r = _ban(server, ip="127.0.0.1", reason="flood", ttl_s=60)
        assert r.status_code == 201 and r.json()["ip"] == "127.0.0.1"
        carol.wait_closed(timeout=3)
    assert removed == [("carol", "banned")]
    with server.stream("carol") as refused:
        assert refused.status == 403 and refused.error_body["error"]["code"] == "banned"
    assert _code(_poll(server.url, "dave")) == (403, "banned")  # anyone from that address
    publish = server.publish({"type": "custom.x", "user_id": "dave"})  # a publisher is no admin
    assert _code(publish) == (403, "banned")
    # Admins pass, so the ban can be lifted from the banned address.
    with server.stream(token=server.token("root", roles=["admin"])) as admin_stream:
        assert admin_stream.status == 200
    listed = httpx.get(server.url + "/api/v1/admin/bans", headers=_admin(server)).json()["bans"]
    assert [(b["ip"], b["reason"]) for b in listed] == [("127.0.0.1", "flood")]
    lifted = httpx.delete(
        server.url + "/api/v1/admin/bans", headers=_admin(server), params={"ip": "127.0.0.1"}
    )
    assert lifted.json() == {"lifted": "ip:127.0.0.1"}
    with server.stream("carol") as back:
        assert back.status == 200
    assert server.publish({"type": "custom.x", "user_id": "dave"}).status_code == 202


def test_address_ban_leaves_an_admins_open_stream_open(server: ThreadServer) -> None:
    removed = _removed_reasons(server)
    admin_token = server.token("root", roles=["admin"])
    with server.stream(token=admin_token) as admin_stream, server.stream("carol") as carol:
        admin_stream.read_count(1, event="connection.established")
        carol.read_count(1, event="connection.established")
        assert _ban(server, ip="127.0.0.1", ttl_s=60).status_code == 201
        carol.wait_closed(timeout=3)
        admin_stream.idle(0.3)
        assert removed == [("carol", "banned")]  # today also ("root", "banned")
        assert not admin_stream.closed
        r = httpx.post(
            server.url + "/api/v1/events",
            headers=_bearer(admin_token),
            json={"type": "custom.for-root", "user_id": "root"},
        )
        assert r.status_code == 202
        assert [m.id for m in admin_stream.read_count(1, timeout=2)] == r.json()["ids"]


def test_cli_ban_add_list_remove(server: ThreadServer, tmp_path: Path) -> None:
    env = {"SCRIBE_EVENTS_JWT_SECRET": SECRET, "SCRIBE_EVENTS_URL": server.url}
    with server.stream("dave") as s:
        s.read_count(1, event="connection.established")
        added = cli("ban", "add", "--user", "dave", "--reason", "abuse", "--ttl", "1h", cwd=tmp_path, env=env)
        assert added.returncode == 0, added.stderr
        assert added.stdout.startswith("banned dave until ")
        s.wait_closed(timeout=3)
    refused = _poll(server.url, "dave")
    assert _code(refused) == (403, "banned") and refused.json()["error"]["message"] == "banned: abuse"
    listed = cli("ban", "list", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    [ban] = json.loads(listed.stdout)["bans"]
    assert (ban["user_id"], ban["reason"]) == ("dave", "abuse")
    assert abs(datetime.fromisoformat(ban["until"]).timestamp() - (time.time() + 3600)) < 120
    removed = cli("ban", "remove", "--user", "dave", cwd=tmp_path, env=env)
    assert removed.returncode == 0 and removed.stdout.strip() == "lifted user:dave"
    assert _poll(server.url, "dave").status_code == 200


# --- 5. push-mode and bench store from the command line -------------------------------------------


def test_cli_push_mode_switches_tells_clients_and_shows_it(server: ThreadServer, tmp_path: Path) -> None:
    env = {"SCRIBE_EVENTS_JWT_SECRET": SECRET, "SCRIBE_EVENTS_URL": server.url}
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        switched = cli("push-mode", "polling", cwd=tmp_path, env=env)
        assert switched.returncode == 0, switched.stderr
        assert switched.stdout.strip() == "push mode polling (100 % on SSE)"
        [told] = s.read_count(1, event="system.push-mode")
        assert told.id is None  # live only: it never moves Last-Event-ID
        assert told.json()["data"] == {"mode": "polling", "poll_interval_s": 30}
    config = httpx.get(server.url + "/api/v1/events/config", headers=_bearer(server.token("u"))).json()
    assert config["mode"] == "polling"
    shown = cli("push-mode", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "push mode for scribe-events-cli: polling (poll every 30 s)"


def test_cli_bench_store_prints_sane_json(tmp_path: Path) -> None:
    run = cli(
        "bench", "store", "--lone", "20", "--events", "200", "--concurrency", "10", "--json", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) == {"store", "lone", "loaded"}
    assert result["store"].startswith("sqlite+aiosqlite:///") and result["store"].endswith("bench.db")
    lone, loaded = result["lone"], result["loaded"]
    assert lone["events"] == 20 and loaded["events"] == 200 and loaded["concurrency"] == 10
    for part in (lone, loaded):
        assert part["events_per_s"] > 0
        assert 0 < part["p50_ms"] <= part["p99_ms"]
    # Ten publishers with one event each in flight: a batch holds at most ten, and group commit
    # makes them share transactions (they all resubmit before the publisher takes the next batch).
    assert 2 < loaded["events_per_batch"] <= 10
    assert not list(tmp_path.iterdir())  # a throw-away database, not one in the working directory


# --- 6. polling: truncated ------------------------------------------------------------------------


def test_poll_after_beyond_the_head_or_before_a_purge_is_truncated(make_server: MakeServer) -> None:
    server = make_server(retention_days=365)  # the retention job must leave the old rows to the test
    now = int(time.time() * 1000)
    for age_days in (10, 9):
        _execute(
            server.db_path,
            "INSERT INTO events (time_ms, type, user_id, broadcast, sensitive, data) VALUES (?, ?, ?, 0, 0, ?)",
            now - age_days * 86_400_000,
            "custom.old",
            "demo",
            json.dumps({"age": age_days}),
        )
    old = [str(i) for (i,) in _rows(server.db_path, "SELECT id FROM events ORDER BY id")]
    new = [
        server.publish_ok({"type": "custom.new", "user_id": "demo", "data": {"n": n}})[0] for n in range(3)
    ]
    head = new[-1]
    beyond = _poll(server.url, "demo", str(int(head) + 1)).json()
    assert beyond == {"events": [], "mode": "sse", "poll_interval_s": 30, "last_id": head, "truncated": True}

    purge = httpx.post(
        server.url + "/api/v1/admin/events/purge", headers=_admin(server), json={"older_than_days": 7}
    )
    assert purge.json()["events"] == 2
    before_purge = _poll(server.url, "demo", old[0]).json()
    assert before_purge["truncated"] is True and before_purge["events"] == []
    assert before_purge["last_id"] == head
    at_the_purge = _poll(server.url, "demo", old[1]).json()  # saw everything the purge removed
    assert "truncated" not in at_the_purge and [e["id"] for e in at_the_purge["events"]] == new
    at_head = _poll(server.url, "demo", head).json()
    assert "truncated" not in at_head and at_head["events"] == []
    # after=0 still pages through everything retained, one by one.
    paged, after = [], "0"
    for _ in range(10):
        body = _poll(server.url, "demo", after, limit=1).json()
        assert "truncated" not in body
        if not body["events"]:
            break
        paged += [e["id"] for e in body["events"]]
        after = body["last_id"]
    assert paged == new


# --- 7. the cut of a replaying stream with too many live events parked -----------------------------


def test_replaying_stream_with_too_many_parked_live_events_is_cut_slow_client(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("scribe_events.hub.MAX_PENDING", 50)  # 10,000 in production
    monkeypatch.setattr("scribe_events.web.stream._DRAIN_TIMEOUT_S", 60.0)  # so the drain cannot be why
    server = make_server(max_connection_buffer=32 * 1024)
    big = {"type": "custom.big", "user_id": "alice", "data": {"z": "z" * 60_000}}
    for _ in range(8):  # more than the kernel's socket buffers hold
        server.publish_ok({"events": [big] * 16})
    hub = server.runtime.hub
    removed = _removed_reasons(server)
    with server.stream("alice", headers={"Last-Event-ID": "0"}, rcvbuf=4096) as s:
        s.read_count(1, event="connection.established")

        def stuck_replaying() -> bool:
            conns = [c for c in list(hub.connections.values()) if c.user_id == "alice"]
            return bool(conns) and conns[0].pending is not None and conns[0].buffer_size() > 8 * 1024

        wait_for(stuck_replaying, timeout=5)  # replaying, waiting for the socket to drain
        [conn] = [c for c in hub.connections.values() if c.user_id == "alice"]
        cut_before = hub.cut_off
        few = server.publish_ok({"events": [{"type": "custom.live", "user_id": "alice"}] * 50})
        assert conn.id in hub.connections and len(conn.pending or []) == 50  # at the bound: kept
        more = server.publish_ok({"events": [{"type": "custom.live", "user_id": "alice"}] * 10})
        wait_for(lambda: conn.id not in hub.connections, timeout=2)
        assert hub.cut_off == cut_before + 1
    assert ("alice", "slow_client") in removed
    # The live events it was owed are failed deliveries; the backlog it asked to replay is not.
    failed: list[dict[str, Any]] = []

    def recorded() -> bool:
        failed[:] = _failed(server, user_id="alice")
        return len(failed) == 60

    wait_for(recorded, timeout=3)
    assert sorted((f["event_id"] for f in failed), key=int) == few + more
    assert {f["reason"] for f in failed} == {"slow_client"}


# --- 8. a full publish queue, a busy Idempotency-Key ----------------------------------------------


def test_full_publish_queue_answers_503_and_keeps_what_it_accepted(make_server: MakeServer) -> None:
    server = make_server(publish_queue=1)
    store = server.runtime.store
    real_append = store.append
    gate, entered = threading.Event(), threading.Event()

    async def held_append(*args: Any, **kw: Any) -> Any:  # the store is slow: the first commit waits
        entered.set()
        while not gate.is_set():
            await asyncio.sleep(0.005)
        return await real_append(*args, **kw)

    store.append = held_append
    results: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        results[name] = server.publish({"type": "custom.q", "user_id": "u", "data": {"name": name}})

    try:
        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert entered.wait(5)  # taken by the publisher, its commit held
        second = threading.Thread(target=post, args=("second",))
        second.start()
        wait_for(lambda: server.runtime.publisher._queue.qsize() == 1)  # the one place in the queue
        full = server.publish({"type": "custom.q", "user_id": "u", "data": {"name": "third"}})
        assert full.status_code == 503
        assert full.json()["error"]["code"] == "store_unavailable" and full.headers["retry-after"] == "1"
    finally:
        gate.set()
        store.append = real_append
    first.join(10)
    second.join(10)
    assert results["first"].status_code == 202 and results["second"].status_code == 202
    polled = _poll(server.url, "u").json()["events"]
    assert [(e["id"], e["data"]["name"]) for e in polled] == [
        (results["first"].json()["ids"][0], "first"),
        (results["second"].json()["ids"][0], "second"),
    ]


def test_idempotency_key_held_elsewhere_is_409_busy_then_stored_once(
    server: ThreadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("scribe_events.service.IDEMPOTENCY_WAIT_STEPS", 4)  # 4 x 50 ms instead of 10 s
    state = server.runtime.state
    # Another instance is storing this very request: it holds the key's claim.
    assert server.call(state.claim("worker", "order-7")) is True
    body = {"type": "custom.order", "user_id": "u"}
    started = time.monotonic()
    busy = server.publish(body, headers={"Idempotency-Key": "order-7"})
    assert _code(busy) == (409, "idempotency_busy")
    assert time.monotonic() - started < 2
    assert _poll(server.url, "u").json()["events"] == []  # nothing stored meanwhile
    server.call(state.release("worker", "order-7"))
    first = server.publish(body, headers={"Idempotency-Key": "order-7"})
    again = server.publish(body, headers={"Idempotency-Key": "order-7"})
    assert first.status_code == again.status_code == 202
    assert first.json()["ids"] == again.json()["ids"]
    assert [e["id"] for e in _poll(server.url, "u").json()["events"]] == first.json()["ids"]


def test_concurrent_requests_with_one_idempotency_key_on_one_instance_share_one_store(
    server: ThreadServer,
) -> None:
    store = server.runtime.store
    real_append = store.append
    gate, entered = threading.Event(), threading.Event()

    async def held_append(*args: Any, **kw: Any) -> Any:
        entered.set()
        while not gate.is_set():
            await asyncio.sleep(0.005)
        return await real_append(*args, **kw)

    store.append = held_append
    service = server.runtime.service
    real_publish = service.publish
    arrived: list[str | None] = []

    async def counted(*args: Any, **kw: Any) -> Any:  # an observer: which requests reached the service
        arrived.append(kw.get("idempotency_key"))
        return await real_publish(*args, **kw)

    service.publish = counted
    body = {"type": "custom.order", "user_id": "u"}
    answers: list[httpx.Response] = []
    try:
        first = threading.Thread(
            target=lambda: answers.append(server.publish(body, headers={"Idempotency-Key": "k"}))
        )
        first.start()
        assert entered.wait(5)  # the first is being stored
        other_body = server.publish(
            {"type": "custom.other", "user_id": "u"}, headers={"Idempotency-Key": "k"}
        )
        assert _code(other_body) == (409, "idempotency_key_reused")
        second = threading.Thread(
            target=lambda: answers.append(server.publish(body, headers={"Idempotency-Key": "k"}))
        )
        second.start()
        wait_for(lambda: len(arrived) == 3)  # the second is in while the first is still held
        assert answers == []
    finally:
        gate.set()
        store.append = real_append
        service.publish = real_publish
    first.join(10)
    second.join(10)
    assert [a.status_code for a in answers] == [202, 202]
    assert answers[0].json()["ids"] == answers[1].json()["ids"]
    assert [e["id"] for e in _poll(server.url, "u").json()["events"]] == answers[0].json()["ids"]


# --- 9. a client that resets its socket while live events are written --------------------------------


def _reset(stream: RawStream) -> None:
    """Close the client's socket with SO_LINGER 0: the kernel sends RST, not FIN."""
    stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.sock.close()
    stream.closed = True


def _observe_cuts(server: ThreadServer) -> list[tuple[str, str]]:
    """(user, reason) of every Hub.cut call from now on (the hub's own cut still runs)."""
    hub = server.runtime.hub
    real_cut = hub.cut
    cuts: list[tuple[str, str]] = []

    def observed(conn: Any, reason: str) -> None:
        cuts.append((conn.user_id, reason))
        real_cut(conn, reason)

    hub.cut = observed
    return cuts


def test_client_reset_while_events_are_written_ends_as_client_closed(server: ThreadServer) -> None:
    hub, broker = server.runtime.hub, server.runtime.broker
    removed = _removed_reasons(server)
    cuts = _observe_cuts(server)
    alice, bob = server.stream("alice"), server.stream("bob")
    real_publish = broker.publish

    async def reset_then_publish(events: Any) -> None:
        # Pinned: the client resets after the events are committed and right before they are written.
        if any(e.type == "custom.doomed" for e in events) and not alice.closed:
            _reset(alice)
        await real_publish(events)

    broker.publish = reset_then_publish
    try:
        alice.read_count(1, event="connection.established")
        bob.read_count(1, event="connection.established")
        cut_before = hub.cut_off
        ids = server.publish_ok(
            {
                "events": [
                    {"type": "custom.doomed", "user_id": "alice", "data": {"n": 1}},
                    {"type": "custom.doomed", "user_id": "alice", "data": {"n": 2}},
                    {"type": "custom.doomed", "broadcast": True, "data": {"n": 3}},
                ]
            }
        )
        assert [m.id for m in bob.read_count(1)] == [ids[2]]  # the rest of the batch went out
        wait_for(lambda: server.connections() == 1)
    finally:
        broker.publish = real_publish
        alice.close()
        bob.close()
    assert removed[:1] == [("alice", "client_closed")]  # an ordinary disconnect ...
    assert cuts == [] and hub.cut_off == cut_before  # ... not a cut


def test_write_after_the_client_reset_is_write_error_taken_as_client_closed(server: ThreadServer) -> None:
    hub = server.runtime.hub
    removed = _removed_reasons(server)
    cuts = _observe_cuts(server)
    alice, bob = server.stream("alice"), server.stream("bob")
    real_remove = hub.remove
    live = [
        Event("custom.live", json.dumps({"n": n}), broadcast=True, persist=False).delivery() for n in range(3)
    ]

    def remove_after_a_dispatch(conn: Any, reason: str) -> None:
        # Pinned: the socket is gone (connection_lost came, the stream handler is removing it) and
        # live events are dispatched at that very moment, so the hub's write to it raises.
        if conn.user_id == "alice" and reason == "client_closed" and conn.id in hub.connections:
            hub.remove = real_remove
            hub.dispatch(live)
        real_remove(conn, reason)

    try:
        alice.read_count(1, event="connection.established")
        bob.read_count(1, event="connection.established")
        cut_before = hub.cut_off
        hub.remove = remove_after_a_dispatch
        _reset(alice)
        assert [m.json()["data"]["n"] for m in bob.read_count(3)] == [0, 1, 2]  # the others got all
        wait_for(lambda: server.connections() == 1)
    finally:
        hub.remove = real_remove
        alice.close()
        bob.close()
    assert cuts and set(cuts) == {("alice", "write_error")}  # the writes found the socket gone ...
    assert removed[:1] == [("alice", "client_closed")]  # ... and the hub took it as the client leaving
    assert hub.cut_off == cut_before  # not counted (nor recorded) as a cut


# --- 10. the store failing during a replay --------------------------------------------------------


def test_store_failing_during_a_replay_cuts_the_stream_and_the_resume_gets_everything(
    server: ThreadServer,
) -> None:
    ids = [server.publish_ok({"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0] for n in range(5)]
    store = server.runtime.store
    real_read = store.read
    failures: list[int] = []

    async def failing_once(**kw: Any) -> Any:
        if kw.get("user_id") == "alice" and not failures:
            failures.append(kw["after"])
            raise StoreUnavailable("the store could not be read: OperationalError")
        return await real_read(**kw)

    store.read = failing_once
    removed = _removed_reasons(server)
    try:
        with server.stream("alice", headers={"Last-Event-ID": ids[1]}) as s:
            s.read_count(1, event="connection.established")
            s.wait_closed(timeout=3)
            assert s.events() == [] and not s.ended  # cut, not ended
        assert failures == [int(ids[1])]
        assert removed == [("alice", "store_unavailable")]
        with server.stream("alice", headers={"Last-Event-ID": ids[1]}) as again:
            assert [m.id for m in again.read_count(3)] == ids[2:]
            again.idle(0.2)
            assert [m.id for m in again.events()] == ids[2:]
    finally:
        store.read = real_read
    time.sleep(0.2)
    assert _failed(server) == []  # a replay backlog is not a failed delivery


# --- 11. committed before sent, seen at the moment of the socket write -----------------------------


def test_every_stored_event_is_committed_before_its_bytes_are_written(server: ThreadServer) -> None:
    hub = server.runtime.hub
    seen: list[tuple[int, bool]] = []  # (id, committed row found) at each write with an id: line
    db = server.db_path

    def watch(conn: Any) -> None:  # an observer: wraps the connection's write as it is registered
        real_write = conn.write

        def write(chunk: bytes) -> Any:
            for match in re.finditer(rb"(?m)^id: (\d+)$", chunk):
                event_id = int(match.group(1))
                # A separate SQLite connection sees only what is committed.
                found = _rows(db, "SELECT type, user_id FROM events WHERE id = ?", event_id)
                seen.append((event_id, found == [("custom.c", "alice")]))
            return real_write(chunk)

        conn.write = write

    hub.on_add.append(watch)
    try:
        [early] = server.publish_ok({"type": "custom.c", "user_id": "alice"})
        with server.stream("alice", headers={"Last-Event-ID": "0"}) as s:  # replay, then live
            s.read_count(1)
            live = [server.publish_ok({"type": "custom.c", "user_id": "alice"})[0] for _ in range(3)]
            live += server.publish_ok({"events": [{"type": "custom.c", "user_id": "alice"}] * 4})
            got = [m.id for m in s.read_count(8)]
    finally:
        hub.on_add.remove(watch)
    assert got == [early, *live]
    assert seen == [(int(i), True) for i in [early, *live]]
