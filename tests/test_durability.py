"""Durability end to end: store-then-push, crash recovery, concurrent instances, failed deliveries,
resend, purge and encryption, through real servers."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from scribe_events.auth import mint_token
from scribe_events.crypto import new_key
from tests.conftest import PG_URL, MakeServer
from tests.harness import SECRET, ProcessServer, RawStream, ThreadServer, cli, wait_for


def _admin(server: ThreadServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token('root', roles=['admin'])}"}


def _pg_rows(schema: str, sql: str) -> list[Any]:
    async def fetch() -> list[Any]:
        conn = await asyncpg.connect(
            PG_URL.replace("postgresql+asyncpg://", "postgresql://"), server_settings={"search_path": schema}
        )
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def test_important_event_is_in_postgresql_before_any_client_receives_it(
    make_server: MakeServer, pg_schema: str
) -> None:
    server = make_server(database_url=PG_URL, database_schema=pg_schema, auto_migrate=True)
    seen_in_table: list[bool] = []
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        server.publish_ok(
            {"type": "content.novel-created", "user_id": "u", "data": {"novel_id": "n", "title": "t"}}
        )
        [message] = s.read_count(1)
        # The moment the client has it, a separate connection finds the row committed.
        rows = _pg_rows(pg_schema, f"SELECT type, user_id FROM events WHERE id = {int(message.id)}")
        seen_in_table.append(bool(rows))
        assert [tuple(r) for r in rows] == [("content.novel-created", "u")]
    assert seen_in_table == [True]


def _pg_env(schema: str, **extra: str) -> dict[str, str]:
    return {
        "SCRIBE_EVENTS_DATABASE_URL": PG_URL,
        "SCRIBE_EVENTS_DATABASE_SCHEMA": schema,
        "SCRIBE_EVENTS_AUTO_MIGRATE": "true",
        "SCRIBE_EVENTS_JWT_SECRET": SECRET,
        "SCRIBE_EVENTS_HEARTBEAT_S": "0.5",
        **extra,
    }


def test_sigkill_between_commit_and_publish_then_restart_delivers(tmp_path: Path, pg_schema: str) -> None:
    crashing = ProcessServer(
        tmp_path, env=_pg_env(pg_schema, SCRIBE_EVENTS_FAULTS='["kill_after_commit"]')
    ).start()
    token = mint_token(SECRET, "u")
    publisher = mint_token(SECRET, "worker", roles=["publisher"])
    with RawStream(crashing.port, "/api/v1/events/stream", {"Authorization": f"Bearer {token}"}) as s:
        s.read_count(1, event="connection.established")
        with pytest.raises(httpx.HTTPError):
            httpx.post(
                crashing.url + "/api/v1/events",
                headers={"Authorization": f"Bearer {publisher}"},
                json={
                    "type": "workflow.status-changed",
                    "user_id": "u",
                    "data": {"workflow_id": "w1", "old_status": "draft", "new_status": "review"},
                },
                timeout=10,
            )
        s.wait_closed(timeout=5)  # the process died: the stream is gone
        assert not s.events()  # and the event never reached this client
    assert crashing.stop() == -9
    [row] = _pg_rows(pg_schema, "SELECT id, type FROM events")
    watermark = _pg_rows(pg_schema, "SELECT value FROM store_meta WHERE key = 'published_through'")
    assert row["type"] == "workflow.status-changed"
    assert not watermark or watermark[0]["value"] < row["id"]  # committed, never published

    restarted = ProcessServer(tmp_path, env=_pg_env(pg_schema)).start()
    try:
        assert "relaying 1 stored event(s)" in restarted.text()
        with RawStream(
            restarted.port,
            "/api/v1/events/stream",
            {"Authorization": f"Bearer {token}", "Last-Event-ID": "0"},
        ) as s:
            [message] = s.read_count(1)
            assert message.id == str(row["id"]) and message.event == "workflow.status-changed"
            s.idle(0.3)
            assert len(s.events()) == 1
    finally:
        restarted.stop()
        restarted.close()
        crashing.close()
    [saved] = _pg_rows(pg_schema, "SELECT value FROM store_meta WHERE key = 'published_through'")
    assert saved["value"] >= row["id"]


def test_two_publishing_instances_and_a_resuming_client_lose_and_repeat_nothing(
    tmp_path: Path, pg_schema: str
) -> None:
    servers = [
        ProcessServer(tmp_path, env=_pg_env(pg_schema, SCRIBE_EVENTS_INSTANCE_ID=name)).start()
        for name in ("pub-a", "pub-b", "reader")
    ]
    publisher = mint_token(SECRET, "worker", roles=["publisher"])
    token = mint_token(SECRET, "u")
    published: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hammer(server: ProcessServer) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {publisher}"}, timeout=10) as http:
            while not stop.is_set():
                r = http.post(
                    server.url + "/api/v1/events", json={"events": [{"type": "custom.n", "user_id": "u"}] * 2}
                )
                assert r.status_code == 202
                with lock:
                    published.extend(r.json()["ids"])

    threads = [threading.Thread(target=hammer, args=(s,)) for s in servers[:2] for _ in range(3)]
    received: list[str] = []
    last: str | None = None
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # resume again and again while both instances publish
            headers = {"Authorization": f"Bearer {token}", **({"Last-Event-ID": last} if last else {})}
            with RawStream(servers[2].port, "/api/v1/events/stream", headers) as s:
                s.idle(0.15)
                got = [m.id for m in s.events()]
            received += got
            if got:
                last = got[-1]
            elif last is None:
                last = "0"
        stop.set()
        for t in threads:
            t.join()
        with RawStream(
            servers[2].port,
            "/api/v1/events/stream",
            {"Authorization": f"Bearer {token}", "Last-Event-ID": last or "0"},
        ) as s:
            s.idle(0.5)
            received += [m.id for m in s.events()]
    finally:
        stop.set()
        for t in threads:
            t.join()
        for server in servers:
            server.stop()
            server.close()
    assert len(published) > 100
    assert received == sorted(published, key=int)


def test_slow_client_cut_off_is_recorded_and_can_be_resent(make_server: MakeServer) -> None:
    server = make_server(max_connection_buffer=64 * 1024)
    slow = server.stream("alice", rcvbuf=4096)
    try:
        slow.read_count(1, event="connection.established")
        batch = {"events": [{"type": "custom.big", "user_id": "alice", "data": {"blob": "z" * 16_000}}] * 40}
        ids: list[str] = []
        for _ in range(20):
            ids += server.publish_ok(batch)
            if server.runtime.hub.cut_off:
                break
        wait_for(lambda: server.connections() == 0, timeout=3)
        failed = wait_for_failed(server)
        assert failed and all(f["reason"] == "slow_client" and f["user_id"] == "alice" for f in failed)
        assert {f["event_id"] for f in failed} <= set(ids)
        assert ids[-1] in {f["event_id"] for f in failed}  # the last one certainly never arrived

        # Nobody to send them to: nothing is sent or marked resent, and the answer says why.
        for dry_run in (True, False):
            nobody = httpx.post(
                server.url + "/api/v1/admin/events/resend",
                headers=_admin(server),
                json={"user_id": "alice", "dry_run": dry_run},
            ).json()
            assert nobody["resent"] == [] and len(nobody["not_resent"]) == len(failed)
            assert {r["why"] for r in nobody["not_resent"]} == {"no live connection of this user and session"}
        with server.stream("alice") as again:
            again.read_count(1, event="connection.established")
            wait_for(lambda: server.connections() == 1)
            dry = httpx.post(
                server.url + "/api/v1/admin/events/resend",
                headers=_admin(server),
                json={"user_id": "alice", "dry_run": True},
            ).json()
            assert dry["dry_run"] and len(dry["resent"]) == len(failed) and dry["not_resent"] == []
            done = httpx.post(
                server.url + "/api/v1/admin/events/resend",
                headers=_admin(server),
                json={"event_ids": [int(failed[-1]["event_id"])]},
            ).json()
            assert [r["event_id"] for r in done["resent"]] == [failed[-1]["event_id"]]
            [message] = again.read_count(1)
            assert message.id is None  # resent: no id: line, so Last-Event-ID never goes back
            assert message.json()["id"] == failed[-1]["event_id"]
        left = httpx.get(
            server.url + "/api/v1/admin/events/failed", headers=_admin(server), params={"user_id": "alice"}
        ).json()["failed"]
        assert len(left) == len(failed) - 1
    finally:
        slow.close()


def wait_for_failed(server: ThreadServer) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = httpx.get(server.url + "/api/v1/admin/events/failed", headers=_admin(server)).json()[
            "failed"
        ]
        return bool(found)

    wait_for(check, timeout=3)
    return found


def test_admin_endpoints_need_admin_and_a_selection(server: ThreadServer) -> None:
    user = {"Authorization": f"Bearer {server.token('u')}"}
    assert httpx.get(server.url + "/api/v1/admin/events/failed", headers=user).status_code == 403
    r = httpx.post(server.url + "/api/v1/admin/events/resend", headers=_admin(server), json={})
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_selection"
    r = httpx.post(
        server.url + "/api/v1/admin/events/purge", headers=_admin(server), json={"older_than_days": -1}
    )
    assert r.status_code == 422


def test_sensitive_events_round_trip_only_to_their_audience(make_server: MakeServer) -> None:
    server = make_server(encryption_keys=new_key())
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        server.publish_ok(
            {"type": "custom.secret", "user_id": "u", "sensitive": True, "data": {"card": "4111-1111"}}
        )
        [live] = s.read_count(1)
        assert live.json()["data"] == {"card": "4111-1111"}
    with sqlite3.connect(server.db_path) as db:
        [(raw, key_id)] = db.execute("SELECT data, key_id FROM events").fetchall()
    assert "4111" not in raw and key_id
    mine = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('u')}"}
    )
    assert mine.json()["events"][0]["data"] == {"card": "4111-1111"}
    theirs = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('v')}"}
    )
    assert theirs.json()["events"] == []
    with server.stream("u", headers={"Last-Event-ID": "0"}) as again:
        assert again.read_count(1)[0].json()["data"] == {"card": "4111-1111"}


def _old_events(db: Path, ages_days: list[float]) -> None:
    now = int(time.time() * 1000)
    with sqlite3.connect(db) as conn:
        for age in ages_days:
            conn.execute(
                "INSERT INTO events (time_ms, type, user_id, broadcast, sensitive, data) VALUES (?, ?, ?, 0, 0, ?)",
                (now - int(age * 86_400_000), "custom.old", "demo", json.dumps({"age": age})),
            )


def test_cli_purge_and_resend_against_a_running_server(tmp_path: Path) -> None:
    # Embedded defaults in tmp_path; a long retention so the server's own job leaves the old rows
    # this test inserts to the purge command.
    server = ProcessServer(tmp_path, env={"SCRIBE_EVENTS_RETENTION_DAYS": "365"}).start()
    url = ["--url", server.url]
    try:
        db = tmp_path / "scribe-events.db"
        _old_events(db, [30, 10, 8, 6, 1])
        dry = cli("purge", "--older-than", "7d", "--dry-run", cwd=tmp_path)
        assert dry.returncode == 0 and "would purge 3 events" in dry.stdout
        done = cli("purge", "--older-than", "7d", "--json", cwd=tmp_path)
        assert json.loads(done.stdout)["events"] == 3
        with sqlite3.connect(db) as conn:
            ages = sorted(json.loads(r[0])["age"] for r in conn.execute("SELECT data FROM events"))
            assert ages == [1, 6]
            [(event_id,)] = conn.execute("SELECT id FROM events WHERE data LIKE '%\"age\": 6%'").fetchall()
            conn.execute(
                "INSERT INTO failed_deliveries (event_id, user_id, connection_id, reason, failed_ms, resend_count) "
                "VALUES (?, 'demo', 'c1', 'write_error', ?, 0)",
                (event_id, int(time.time() * 1000)),
            )
        demo = cli("token", "--user", "demo", cwd=tmp_path).stdout.strip()
        listening = RawStream(server.port, "/api/v1/events/stream", {"Authorization": f"Bearer {demo}"})
        listening.read_count(1, event="connection.established")
        table = cli("resend", "--user", "demo", "--dry-run", *url, cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert "would resend (1)" in table.stdout and "write_error" in table.stdout
        real = cli("resend", "--since", "1h", "--json", *url, cwd=tmp_path)
        assert [r["event_id"] for r in json.loads(real.stdout)["resent"]] == [str(event_id)]
        nothing = cli("resend", "--user", "demo", "--json", *url, cwd=tmp_path)
        assert json.loads(nothing.stdout)["resent"] == []
        assert cli("resend", *url, cwd=tmp_path).returncode == 1
        listening.close()
    finally:
        server.stop()
        server.close()


def test_cli_keygen_makes_a_usable_key(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "scribe_events_cli", "keygen"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_EVENTS_")},
    )
    from scribe_events.crypto import Cipher

    cipher = Cipher(out.stdout.strip())
    kid, token = cipher.encrypt("x", "ctx")
    assert cipher.decrypt(kid, token, "ctx") == "x"


def test_publish_the_store_cannot_take_is_503_and_nothing_half_done(
    make_server: MakeServer, pg_schema: str
) -> None:
    server = make_server(database_url=PG_URL, database_schema=pg_schema, auto_migrate=True)
    [first] = server.publish_ok({"type": "custom.a", "user_id": "u"})
    _pg_rows(pg_schema, "ALTER TABLE events RENAME TO events_away")
    try:
        r = server.publish({"type": "custom.b", "user_id": "u"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "store_unavailable"
        assert r.headers["retry-after"] == "1"
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 200  # the database answers; only that table is gone
    finally:
        _pg_rows(pg_schema, "ALTER TABLE events_away RENAME TO events")
    [second] = server.publish_ok({"type": "custom.c", "user_id": "u"})
    body = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('u')}"}
    )
    assert [e["type"] for e in body.json()["events"]] == ["custom.a", "custom.c"]
    assert int(second) > int(first)


def test_admin_purge_endpoint(make_server: MakeServer) -> None:
    server = make_server(retention_days=365)  # the retention job must not purge them first
    _old_events(server.db_path, [12, 9])
    server.publish_ok({"type": "custom.new", "user_id": "demo"})
    dry = httpx.post(
        server.url + "/api/v1/admin/events/purge",
        headers=_admin(server),
        json={"older_than_days": 7, "dry_run": True},
    ).json()
    assert dry["dry_run"] is True and dry["events"] == 2
    done = httpx.post(
        server.url + "/api/v1/admin/events/purge", headers=_admin(server), json={"older_than_days": 7}
    ).json()
    assert done["events"] == 2
    left = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('demo')}"}
    )
    assert [e["type"] for e in left.json()["events"]] == ["custom.new"]
    # A client resuming from before the purge is told so.
    with server.stream("demo", headers={"Last-Event-ID": "1"}) as s:
        assert s.read_count(1, event="replay.truncated")[0].json()["last_event_id"] == "1"


def test_instances_starting_together_on_a_fresh_postgresql_schema_migrate_once(
    tmp_path: Path, pg_schema: str
) -> None:
    env = {
        "SCRIBE_EVENTS_DATABASE_URL": PG_URL,
        "SCRIBE_EVENTS_DATABASE_SCHEMA": pg_schema,
        "SCRIBE_EVENTS_AUTO_MIGRATE": "true",
        "SCRIBE_EVENTS_JWT_SECRET": SECRET,
    }
    servers = [ProcessServer(tmp_path, env={**env, "SCRIBE_EVENTS_INSTANCE_ID": f"i{n}"}) for n in range(3)]
    errors: list[BaseException] = []

    def start(server: ProcessServer) -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []  # before the migration lock, one raced on CREATE TABLE alembic_version
        assert [r["version_num"] for r in _pg_rows(pg_schema, "SELECT version_num FROM alembic_version")]
    finally:
        for server in servers:
            if server.proc is not None:
                server.stop()
            server.close()
