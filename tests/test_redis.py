"""Several instances behaving as one through the real Redis (and PostgreSQL) on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from scribe_events.auth import mint_token
from tests.conftest import PG_URL, REDIS_URL, _pg_execute
from tests.harness import SECRET, ProcessServer, RawStream, bound_socket, cli, wait_for


def _env(schema: str, prefix: str, name: str, redis_url: str = REDIS_URL, **extra: str) -> dict[str, str]:
    return {
        "SCRIBE_EVENTS_DATABASE_URL": PG_URL,
        "SCRIBE_EVENTS_DATABASE_SCHEMA": schema,
        "SCRIBE_EVENTS_AUTO_MIGRATE": "true",
        "SCRIBE_EVENTS_JWT_SECRET": SECRET,
        "SCRIBE_EVENTS_REDIS_URL": redis_url,
        "SCRIBE_EVENTS_REDIS_PREFIX": prefix,
        "SCRIBE_EVENTS_INSTANCE_ID": name,
        "SCRIBE_EVENTS_HEARTBEAT_S": "1",
        **extra,
    }


@contextlib.contextmanager
def instances(
    tmp_path: Path, schema: str, prefix: str, *names: str, **extra: str
) -> Iterator[list[ProcessServer]]:
    started: list[ProcessServer] = []
    try:
        for name in names:
            started.append(ProcessServer(tmp_path, env=_env(schema, prefix, name, **extra)).start())
        yield started
    finally:
        for server in started:
            server.stop()
            server.close()


def _stream(
    server: ProcessServer, user: str, path: str = "/api/v1/events/stream", **headers: str
) -> RawStream:
    s = RawStream(server.port, path, {"Authorization": f"Bearer {mint_token(SECRET, user)}", **headers})
    s.read_count(1, event="connection.established")
    return s


def _publish(server: ProcessServer, body: dict[str, Any], **headers: str) -> list[str]:
    token = mint_token(SECRET, "worker", roles=["publisher"])
    r = httpx.post(
        server.url + "/api/v1/events",
        json=body,
        headers={"Authorization": f"Bearer {token}", **headers},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return list(r.json()["ids"])


def _status(server: ProcessServer, user: str) -> int:
    with RawStream(
        server.port, "/api/v1/events/stream", {"Authorization": f"Bearer {mint_token(SECRET, user)}"}
    ) as s:
        return s.status


def _admin(server: ProcessServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, 'root', roles=['admin'])}"}


def test_redis_routes_user_session_and_broadcast_across_instances(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    with (
        instances(tmp_path, pg_schema, redis_prefix, "one", "two") as (one, two),
        _stream(one, "alice", "/api/v1/events/stream?session_id=s1") as a1,
        _stream(one, "alice", "/api/v1/events/stream?session_id=s2") as a2,
        _stream(one, "bob") as b,
    ):
        sent = [
            _publish(two, {"type": "custom.user", "user_id": "alice"})[0],
            _publish(two, {"type": "custom.session", "user_id": "alice", "session_id": "s1"})[0],
            _publish(two, {"type": "custom.all", "broadcast": True})[0],
        ]
        a1.read_count(3)
        a2.read_count(2)
        b.read_count(1)
        for s in (a1, a2, b):
            s.idle(0.3)
        assert [m.id for m in a1.events()] == sent
        assert [m.event for m in a2.events()] == ["custom.user", "custom.all"]
        assert [m.event for m in b.events()] == ["custom.all"]


def test_redis_ticket_minted_on_one_instance_is_redeemed_on_the_other(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    with instances(tmp_path, pg_schema, redis_prefix, "one", "two") as (one, two):
        r = httpx.post(
            one.url + "/api/v1/events/tickets",
            headers={"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"},
        )
        ticket = r.json()["ticket"]
        with RawStream(two.port, f"/api/v1/events/stream?ticket={ticket}", {}) as s:
            assert s.status == 200
            s.read_count(1, event="connection.established")
        with RawStream(one.port, f"/api/v1/events/stream?ticket={ticket}", {}) as again:
            assert again.status == 401  # single use, across instances


def test_redis_connections_lists_both_instances_and_forgets_a_killed_one(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    env = {"SCRIBE_EVENTS_REDIS_URL": REDIS_URL, "SCRIBE_EVENTS_REDIS_PREFIX": redis_prefix}
    with (
        instances(tmp_path, pg_schema, redis_prefix, "one", "two") as (one, two),
        _stream(one, "alice"),
        _stream(two, "alice", "/api/v1/events/stream?session_id=s9"),
        _stream(two, "bob"),
    ):
        listed = json.loads(cli("connections", "--json", cwd=tmp_path, env=env).stdout)["connections"]
        assert sorted((c["instance"], c["user_id"]) for c in listed) == [
            ("one", "alice"),
            ("two", "alice"),
            ("two", "bob"),
        ]
        assert all(
            c["remote"].startswith("127.0.0.1:") and c["last_seen"] >= c["connected_at"] for c in listed
        )
        alice = json.loads(cli("connections", "--user", "alice", "--json", cwd=tmp_path, env=env).stdout)
        assert {c["instance"] for c in alice["connections"]} == {"one", "two"}
        session = json.loads(
            cli("connections", "--user", "alice", "--session", "s9", "--json", cwd=tmp_path, env=env).stdout
        )
        assert [c["instance"] for c in session["connections"]] == ["two"]
        over_http = httpx.get(one.url + "/api/v1/admin/connections", headers=_admin(one)).json()
        assert len(over_http["connections"]) == 3
        table = cli("connections", cwd=tmp_path, env=env)
        assert "3 live connection(s)" in table.stdout

        two.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        two.proc.wait()  # type: ignore[union-attr]
        killed_at = time.monotonic()

        def only_one_left() -> bool:
            rows = httpx.get(one.url + "/api/v1/admin/connections", headers=_admin(one)).json()["connections"]
            return [c["instance"] for c in rows] == ["one"]

        wait_for(only_one_left, timeout=4, interval=0.05)
        assert time.monotonic() - killed_at <= 2 * 1.0 + 0.2  # two heartbeat intervals (and a poll)
        rows = json.loads(cli("connections", "--json", cwd=tmp_path, env=env).stdout)["connections"]
        assert [c["instance"] for c in rows] == ["one"]


def test_redis_push_mode_and_bans_hold_on_every_instance(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    with instances(tmp_path, pg_schema, redis_prefix, "one", "two") as (one, two):
        with _stream(two, "alice") as s:
            r = httpx.put(one.url + "/api/v1/admin/push-mode", json={"mode": "polling"}, headers=_admin(one))
            assert r.status_code == 200
            [message] = s.read_count(1, event="system.push-mode")
            assert message.json()["data"]["mode"] == "polling"
            config = httpx.get(
                two.url + "/api/v1/events/config",
                headers={"Authorization": f"Bearer {mint_token(SECRET, 'zed')}"},
            ).json()
            assert config["mode"] == "polling"

            r = httpx.post(
                one.url + "/api/v1/admin/bans",
                json={"user_id": "alice", "reason": "spam"},
                headers=_admin(one),
            )
            assert r.status_code == 201
            s.wait_closed(timeout=3)  # alice's stream on the other instance is closed
        with RawStream(
            two.port, "/api/v1/events/stream", {"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"}
        ) as refused:
            assert refused.status == 403 and refused.error_body["error"]["code"] == "banned"
        # An address ban does not lock out the admin who lifts it.
        banned_ip = httpx.post(
            one.url + "/api/v1/admin/bans", json={"ip": "127.0.0.1", "ttl_s": 60}, headers=_admin(one)
        )
        assert banned_ip.status_code == 201
        wait_for(lambda: _status(two, "bob") == 403)
        lifted = httpx.delete(two.url + "/api/v1/admin/bans", params={"ip": "127.0.0.1"}, headers=_admin(two))
        assert lifted.status_code == 200
        assert (
            httpx.delete(
                two.url + "/api/v1/admin/bans", params={"user_id": "alice"}, headers=_admin(two)
            ).status_code
            == 200
        )
        wait_for(lambda: httpx.get(one.url + "/api/v1/admin/bans", headers=_admin(one)).json()["bans"] == [])
        with _stream(one, "alice"):
            pass


def test_redis_idempotency_key_holds_across_instances(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    with instances(tmp_path, pg_schema, redis_prefix, "one", "two") as (one, two):
        body = {"type": "custom.once", "user_id": "alice"}
        results: list[list[str]] = []

        def post(server: ProcessServer) -> None:
            results.append(_publish(server, body, **{"Idempotency-Key": "order-7"}))

        threads = [threading.Thread(target=post, args=(s,)) for s in (one, two, one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({tuple(r) for r in results}) == 1
        poll = httpx.get(
            one.url + "/api/v1/events?after=0",
            headers={"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"},
        ).json()
        assert [e["id"] for e in poll["events"]] == results[0]


def test_redis_any_instance_relays_what_a_killed_one_committed(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    with instances(tmp_path, pg_schema, redis_prefix, "one") as (one,):
        crasher = ProcessServer(
            tmp_path,
            env=_env(pg_schema, redis_prefix, "crasher", SCRIBE_EVENTS_FAULTS='["kill_after_commit"]'),
        ).start()
        try:
            with _stream(one, "alice") as s:
                with pytest.raises(httpx.HTTPError):
                    _publish(crasher, {"type": "custom.survivor", "user_id": "alice"})
                assert crasher.proc.wait(5) == -9  # type: ignore[union-attr]
                # No restart, no reconnect: instance one's relay publishes it and the client gets it live.
                [message] = s.read_count(1, timeout=5)
                assert message.event == "custom.survivor" and message.id is not None
        finally:
            crasher.stop()
            crasher.close()


def _redis_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(client), timeout=5)
    finally:
        client.close()
    return proc


def _redis_on_socket(path: Path) -> subprocess.Popen[bytes]:
    """A private redis-server on a Unix socket of this test's own: no TCP port to pick and hope
    nobody takes before a restart."""
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(path), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(path))
    try:
        wait_for(lambda: _pings(client), timeout=5)
    finally:
        client.close()
    return proc


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_redis_restart_mid_stream_loses_no_important_event(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    path = tmp_path / "redis.sock"
    own_redis = _redis_on_socket(path)
    url = f"unix://{path}"
    servers: list[ProcessServer] = []
    try:
        for name in ("one", "two"):
            servers.append(
                ProcessServer(tmp_path, env=_env(pg_schema, redis_prefix, name, redis_url=url)).start()
            )
        one, two = servers
        with _stream(one, "alice") as s:
            sent = [
                _publish(two, {"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0] for n in range(3)
            ]
            s.read_count(3)
            own_redis.send_signal(signal.SIGKILL)
            own_redis.wait()
            wait_for(lambda: httpx.get(one.url + "/health/ready").status_code == 503, timeout=10)
            ready = httpx.get(two.url + "/health/ready")
            assert ready.status_code == 503 and ready.json()["dependencies"]["broker"] == "down"
            assert 'scribe_events_broker_up{instance="two"} 0.0' in httpx.get(two.url + "/metrics").text
            # Published while Redis is down: accepted (stored), not lost.
            sent += [
                _publish(two, {"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0]
                for n in range(3, 6)
            ]
            # ...and the open stream on the other instance still gets them, from the store.
            s.read_count(6, timeout=5)
            own_redis = _redis_on_socket(path)
            wait_for(lambda: httpx.get(one.url + "/health/ready").status_code == 200, timeout=15)
            sent += _publish(two, {"type": "custom.n", "user_id": "alice", "data": {"n": 6}})
            s.read_count(7, timeout=15)
            s.idle(0.5)
            assert [m.id for m in s.events()] == sent  # every event once, in order, on the same stream
        assert "lost the Redis subscription" in one.text()
    finally:
        for server in servers:
            server.stop()
            server.close()
        own_redis.kill()
        own_redis.wait()


def test_redis_down_at_start_still_serves_and_reports_not_ready(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    nobody = bound_socket()  # bound, never listening, held by the test: connections are refused
    dead = f"redis://127.0.0.1:{nobody.getsockname()[1]}/0"
    server = ProcessServer(tmp_path, env=_env(pg_schema, redis_prefix, "lonely", redis_url=dead)).start()
    try:
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 503 and ready.json()["dependencies"]["broker"] == "down"
        assert httpx.get(server.url + "/health").status_code == 200
        with _stream(server, "alice") as alice:
            # Events are accepted (stored) and still reach the stream, read from the store.
            sent = [
                _publish(server, {"type": "custom.n", "user_id": "alice", "data": {"n": n}})[0]
                for n in range(3)
            ]
            alice.read_count(3, timeout=5)
            alice.idle(0.4)
            assert [m.id for m in alice.events()] == sent
    finally:
        server.stop()
        server.close()
        nobody.close()


def test_redis_two_deployments_sharing_a_prefix_ignore_each_other(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    other_schema = pg_schema + "_b"
    asyncio.run(_pg_execute(f'CREATE SCHEMA "{other_schema}"'))
    try:
        ours = ProcessServer(tmp_path, env=_env(pg_schema, redis_prefix, "ours")).start()
        theirs = ProcessServer(tmp_path, env=_env(other_schema, redis_prefix, "theirs")).start()
        try:
            # Their ids run ahead of ours: before the fix, ours dropped its own events as "already
            # dispatched" until its ids passed theirs, and their alice events reached our alice.
            for _ in range(5):
                _publish(theirs, {"type": "custom.theirs", "user_id": "alice"})
            with _stream(ours, "alice") as alice:
                _publish(theirs, {"type": "custom.theirs", "user_id": "alice"})
                [mine] = _publish(ours, {"type": "custom.ours", "user_id": "alice"})
                alice.read_count(1)
                alice.idle(0.5)
                assert [(m.event, m.id) for m in alice.events()] == [("custom.ours", mine)]
            ready = httpx.get(ours.url + "/health/ready").json()
            assert ready["status"] == "ok" and "another deployment" in ready["warnings"][0]
            metrics = httpx.get(ours.url + "/metrics").text
            assert "scribe_events_broker_foreign_messages_total" in metrics
            assert "ignoring broker messages from another deployment" in ours.text()
        finally:
            for server in (ours, theirs):
                server.stop()
                server.close()
    finally:
        asyncio.run(_pg_execute(f'DROP SCHEMA "{other_schema}" CASCADE'))


def test_redis_with_sqlite_is_refused_at_start(tmp_path: Path, redis_prefix: str) -> None:
    out = cli(
        "serve",
        "--port",
        "0",  # never bound: it refuses first
        cwd=tmp_path,
        env={"SCRIBE_EVENTS_REDIS_URL": REDIS_URL, "SCRIBE_EVENTS_REDIS_PREFIX": redis_prefix},
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "needs PostgreSQL" in out.stderr.replace("\n", " ") or "several instances need" in out.stderr


def test_redis_tickets_per_user_are_capped_on_every_instance(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    with instances(
        tmp_path, pg_schema, redis_prefix, "one", "two", SCRIBE_EVENTS_MAX_TICKETS_PER_USER="2"
    ) as (one, two):

        def mint(server: ProcessServer, user: str) -> int:
            headers = {"Authorization": f"Bearer {mint_token(SECRET, user)}"}
            return httpx.post(server.url + "/api/v1/events/tickets", headers=headers).status_code

        assert [mint(one, "alice"), mint(two, "alice"), mint(one, "alice")] == [200, 200, 429]
        assert mint(two, "bob") == 200


def test_redis_publish_lock_keeps_ids_rising_across_instances(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    """Two checks the outbox and then pauses before its COMMIT (a fault); one commits during that
    pause and pauses after its COMMIT, before its PUBLISH. Without the publish lock two's later id
    reaches Redis first, and every stream then skips one's event as already seen."""
    one = ProcessServer(
        tmp_path, env=_env(pg_schema, redis_prefix, "one", SCRIBE_EVENTS_FAULTS='["pause_after_commit"]')
    )
    two = ProcessServer(
        tmp_path, env=_env(pg_schema, redis_prefix, "two", SCRIBE_EVENTS_FAULTS='["pause_before_commit"]')
    )
    try:
        one.start()
        two.start()
        with _stream(one, "alice") as on_one, _stream(two, "alice") as on_two:
            ids: dict[str, str] = {}
            second = threading.Thread(
                target=lambda: ids.update(two=_publish(two, {"type": "custom.two", "user_id": "alice"})[0])
            )
            second.start()
            time.sleep(0.15)  # two is inside its pause before COMMIT
            ids["one"] = _publish(one, {"type": "custom.one", "user_id": "alice"})[0]
            second.join(10)
            expected = sorted(ids.values(), key=int)
            for s in (on_one, on_two):
                s.read_count(2, timeout=5)
                s.idle(0.3)
                assert [m.id for m in s.events()] == expected
    finally:
        for server in (one, two):
            if server.proc is not None:
                server.stop()
            server.close()


def test_redis_task_events_reach_the_readers_on_every_instance_and_heartbeat_there(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    """A task started on one instance: its readers' streams on the other get its events (the
    readers travel with the event through Redis), a reader granted on the other instance gets
    what follows the grant, a stranger nothing; heartbeats come from the instance a stream is on."""
    fast = {"SCRIBE_EVENTS_TASK_HEARTBEAT_S": "0.5", "SCRIBE_EVENTS_PROGRESS_THROTTLE_S": "0"}
    with (
        instances(tmp_path, pg_schema, redis_prefix, "one", "two", **fast) as (one, two),
        _stream(two, "bob") as bob,
        _stream(two, "dave") as dave,
        _stream(two, "carol") as carol,
    ):
        started = _publish(
            one,
            {
                "type": "task.progress-started",
                "task_id": "rt1",
                "data": {"task_id": "rt1", "owner": "alice", "readers": ["bob"]},
            },
        )
        update = {
            "type": "task.progress-updated",
            "task_id": "rt1",
            "data": {"task_id": "rt1", "progress": 5},
        }
        first = _publish(one, update)
        r = httpx.post(
            two.url + "/api/v1/tasks/rt1/grants",
            json={"user_id": "dave"},
            headers={"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"},
        )
        assert r.status_code == 200, r.text
        later = _publish(one, {**update, "data": {"task_id": "rt1", "progress": 9}})
        got = bob.read_until(lambda ms: len([m for m in ms if m.id]) >= 3)
        assert [m.id for m in got if m.id] == started + first + later
        assert [m.id for m in dave.read_count(1, event="task.progress-updated")] == later
        beat = dave.read_count(1, event="task.progress-heartbeat", timeout=5)[0].json()["data"]
        assert beat["task_id"] == "rt1" and beat["progress"] == 9
        carol.idle(0.3)
        assert carol.events() == []


def test_redis_keeps_every_instances_history_and_the_report_reads_it(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    """With Redis the snapshots go there: any instance answers for all, and ``report`` shows both,
    its delivered counts matching each instance's /metrics."""
    extra = {"SCRIBE_EVENTS_HISTORY_INTERVAL_S": "0.2"}
    with (
        instances(tmp_path, pg_schema, redis_prefix, "one", "two", **extra) as (one, two),
        _stream(two, "alice") as alice,
    ):
        _publish(one, {"events": [{"type": "custom.h", "user_id": "alice"}] * 3})
        alice.read_count(3)
        seen: dict[str, Any] = {}

        def both_have_delivered() -> bool:
            seen.update(httpx.get(one.url + "/api/v1/admin/history?since_s=60", headers=_admin(one)).json())
            points = seen["instances"].get("two", [])
            return "one" in seen["instances"] and any(
                p["metrics"].get('scribe_events_events_delivered_total{family="custom"}') == 3 for p in points
            )

        wait_for(both_have_delivered, timeout=10)
        assert seen["answered_by"] == "one" and seen["store"]["backend"] == "postgresql"
        keys = redis.Redis.from_url(REDIS_URL).keys(redis_prefix + "history*")
        assert {k.decode() for k in keys} == {
            f"{redis_prefix}history",
            f"{redis_prefix}history:one",
            f"{redis_prefix}history:two",
        }
        report = cli(
            "report",
            "--since",
            "5m",
            "--json",
            cwd=tmp_path,
            env={"SCRIBE_EVENTS_URL": one.url, "SCRIBE_EVENTS_JWT_SECRET": SECRET},
        )
        assert report.returncode == 0, report.stderr
        body = json.loads(report.stdout)
        assert sorted(body["instances"]) == ["one", "two"]
        # The report's delivered count is what two's /metrics says (it started with nothing delivered).
        metrics = httpx.get(two.url + "/metrics").text
        line = next(
            x
            for x in metrics.splitlines()
            if x.startswith('scribe_events_events_delivered_total{family="custom"')
        )
        assert body["instances"]["two"]["totals"]["delivered"] == float(line.rsplit(" ", 1)[1]) == 3


def test_redis_rate_limits_hold_across_instances(tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    extra = {"SCRIBE_EVENTS_RATE_LIMIT_POLLING_PER_USER": "3/minute"}
    with instances(tmp_path, pg_schema, redis_prefix, "one", "two", **extra) as (one, two):
        headers = {"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"}
        statuses = [httpx.get(s.url + "/api/v1/events", headers=headers) for s in (one, two, one, two)]
        assert [r.status_code for r in statuses] == [200, 200, 200, 429]
        assert statuses[-1].json()["error"]["code"] == "rate_limited"
        assert int(statuses[-1].headers["retry-after"]) >= 1
        bob = {"Authorization": f"Bearer {mint_token(SECRET, 'bob')}"}
        assert httpx.get(two.url + "/api/v1/events", headers=bob).status_code == 200
        assert redis.Redis.from_url(REDIS_URL).keys(f"{redis_prefix}ratelimit*")  # counted in Redis
        pool = re.search(
            r"^scribe_events_redis_connections\{[^}]*\} (\S+)$", httpx.get(one.url + "/metrics").text, re.M
        )
        assert pool is not None and 1 <= float(pool.group(1)) <= 50  # the command pool, bounded


def test_redis_failed_logins_across_instances_ban_the_address_on_both(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    extra = {"SCRIBE_EVENTS_TRUSTED_PROXIES": '["127.0.0.1"]'}
    with instances(tmp_path, pg_schema, redis_prefix, "one", "two", **extra) as (one, two):
        forged = {"Authorization": "Bearer not.a.token", "X-Forwarded-For": "203.0.113.66"}
        statuses = [httpx.get(s.url + "/api/v1/events", headers=forged).status_code for s in (one, two) * 3]
        assert statuses == [401] * 6  # the 6th, on two, counted with one's three
        good = {"Authorization": f"Bearer {mint_token(SECRET, 'alice')}", "X-Forwarded-For": "203.0.113.66"}
        wait_for(
            lambda: all(
                httpx.get(s.url + "/api/v1/events", headers=good).status_code == 403 for s in (one, two)
            )
        )
        lifted = httpx.request("DELETE", one.url + "/api/v1/admin/bans?ip=203.0.113.66", headers=_admin(one))
        assert lifted.status_code == 200, lifted.text
        wait_for(
            lambda: all(
                httpx.get(s.url + "/api/v1/events", headers=good).status_code == 200 for s in (one, two)
            )
        )


def test_redis_pool_gauge_counts_open_connections_only(redis_prefix: str) -> None:
    """The pool keeps the objects of connections it closed; the gauge (and the fault suite's fd
    check, which subtracts it) counts sockets, so a closed one is not counted."""
    from scribe_events.constants import pool_size, redis_client

    async def run() -> tuple[int, int, int]:
        client = redis_client(REDIS_URL, max_connections=4)
        try:
            await asyncio.gather(*(client.ping() for _ in range(3)))
            opened = pool_size(client)
            await client.connection_pool.disconnect()
            closed = pool_size(client)
            await client.ping()
            return opened, closed, pool_size(client)
        finally:
            await client.aclose()

    opened, closed, again = asyncio.run(run())
    assert opened >= 1
    assert closed == 0
    assert again == 1
