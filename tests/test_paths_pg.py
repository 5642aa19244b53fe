"""PostgreSQL paths: `scribe-events bench store` on a throw-away schema; retention in a running server."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from scribe_events.store import retention
from tests.conftest import PG_URL, MakeServer
from tests.harness import cli
from tests.test_durability import _pg_rows


def test_cli_bench_store_on_postgresql_drops_its_schema(tmp_path: Path, pg_schema: str) -> None:
    # pg_schema: skips without PostgreSQL (fails in CI); the bench makes a schema of its own.
    run = cli(
        "bench",
        "store",
        "--database-url",
        PG_URL,
        "--lone",
        "10",
        "--events",
        "100",
        "--concurrency",
        "10",
        "--json",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    match = re.fullmatch(re.escape(PG_URL) + r" \(schema (bench_[0-9a-f]{12})\)", result["store"])
    assert match, result["store"]
    assert result["lone"]["events"] == 10 and result["loaded"]["events"] == 100
    assert 2 < result["loaded"]["events_per_batch"] <= 10
    left = _pg_rows(pg_schema, f"SELECT nspname FROM pg_namespace WHERE nspname = '{match.group(1)}'")
    assert left == []  # the throw-away schema is gone


def _partitions(schema: str) -> set[str]:
    rows = _pg_rows(
        schema,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'events' "
        f"AND p.relnamespace = '{schema}'::regnamespace",
    )
    return {r["relname"] for r in rows}


def _purge(server: Any, days: float) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/api/v1/admin/events/purge",
        headers={"Authorization": f"Bearer {server.token('root', roles=['admin'])}"},
        json={"older_than_days": days},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_retention_on_postgresql_in_a_running_server(make_server: MakeServer, pg_schema: str) -> None:
    """Partitions days ahead; an old day dropped whole; a day whose DROP cannot get its lock in
    time has its rows deleted instead, and is dropped by the next run."""
    now = int(time.time() * 1000)
    today = retention.day_start(now)
    server = make_server(
        database_url=PG_URL, database_schema=pg_schema, auto_migrate=True, retention_days=365
    )
    ahead = {
        retention.partition_name(today + n * retention.DAY_MS) for n in range(-1, retention.DAYS_AHEAD + 1)
    }
    assert ahead <= _partitions(pg_schema)
    # Two old days, each in a partition of its own, with rows (as days that have passed would be).
    old = {age: today - age * retention.DAY_MS for age in (6, 5)}
    names = {age: retention.partition_name(day) for age, day in old.items()}
    for age, day in old.items():
        _pg_rows(
            pg_schema,
            f'CREATE TABLE "{names[age]}" PARTITION OF events FOR VALUES FROM ({day}) TO ({day + retention.DAY_MS})',
        )
        _pg_rows(
            pg_schema,
            "INSERT INTO events (id, time_ms, type, user_id, broadcast, sensitive, data) "
            f"SELECT nextval('events_id_seq'), {day + 3_600_000}, 'custom.old', 'demo', false, false, '{{}}' "
            "FROM generate_series(1, 3)",
        )
    [kept] = server.publish_ok({"type": "custom.new", "user_id": "demo"})

    async def purge_while_a_reader_holds_day_5() -> tuple[dict[str, Any], float]:
        holder = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await holder.execute(f'SET search_path = "{pg_schema}"')
            tx = holder.transaction()
            await tx.start()
            await holder.fetch(f'SELECT * FROM "{names[5]}" LIMIT 1')  # a long reader of that day
            started = time.monotonic()
            answer = await asyncio.to_thread(_purge, server, 3)
            took = time.monotonic() - started
            await tx.rollback()
            return answer, took
        finally:
            await holder.close()

    answer, took = asyncio.run(purge_while_a_reader_holds_day_5())
    assert answer["events"] == 6 and took < 10  # day 6 dropped, day 5's rows deleted: no long stall
    assert names[6] not in _partitions(pg_schema) and names[5] in _partitions(pg_schema)
    assert _pg_rows(pg_schema, f'SELECT count(*) AS n FROM "{names[5]}"')[0]["n"] == 0
    assert _purge(server, 3)["events"] == 0
    assert names[5] not in _partitions(pg_schema)  # the next run drops the day left over
    assert ahead <= _partitions(pg_schema)
    polled = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('demo')}"}
    ).json()
    assert [e["id"] for e in polled["events"]] == [kept]
    with server.stream("demo", headers={"Last-Event-ID": "1"}) as s:  # from before the purge
        s.read_count(1, event="replay.truncated")
