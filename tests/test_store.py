"""The store on both backends: the same tests on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import sqlalchemy as sa

from scribe_events.crypto import Cipher, new_key
from scribe_events.events import Event, now_ms
from scribe_events.exceptions import StoreUnavailable
from scribe_events.store import FailedDelivery, IdempotencyRecord, migrate, retention
from scribe_events.store.sql import SQLEventStore
from scribe_events.store.sql_common import LOCK_NAMESPACE
from tests.harness import cli

T = TypeVar("T")
DAY = 86_400_000


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make(config: dict[str, Any], **kw: Any) -> SQLEventStore:
    return SQLEventStore(
        config["database_url"],
        schema=config.get("database_schema"),
        auto_migrate=config.get("auto_migrate"),
        **kw,
    )


def ev(user: str | None = "u", *, type_: str = "custom.e", n: int = 0, **kw: Any) -> Event:
    return Event(type_, json.dumps({"n": n}), user_id=user, **kw)


async def _with_store(config: dict[str, Any], body: Any, **kw: Any) -> Any:
    store = make(config, **kw)
    await store.start()
    try:
        return await body(store)
    finally:
        await store.close()


def test_store_ids_rise_and_reads_respect_visibility(store_config: dict[str, Any]) -> None:
    async def body(store: SQLEventStore) -> None:
        batch = [ev("u", n=1), ev("u", n=2, session_id="s1"), ev("v", n=3), ev(None, n=4, broadcast=True)]
        await store.append(batch)
        ids = [e.id for e in batch]
        assert ids == sorted(ids) and len(set(ids)) == 4
        more = [ev("u", n=5)]
        await store.append(more)
        assert more[0].id > ids[-1]  # type: ignore[operator]
        seen = await store.read(after=0, user_id="u", session_id=None, limit=100)
        assert [json.loads(e.data_json)["n"] for e in seen] == [1, 4, 5]
        with_session = await store.read(after=0, user_id="u", session_id="s1", limit=100)
        assert [json.loads(e.data_json)["n"] for e in with_session] == [1, 2, 4, 5]
        assert [e.id for e in await store.read(after=ids[1], user_id="u", session_id="s1", limit=1)] == [
            ids[3]
        ]
        assert await store.head() == more[0].id
        assert await store.oldest() == ids[0]

    run(_with_store(store_config, body))


def test_store_keeps_latest_progress_per_task(store_config: dict[str, Any]) -> None:
    async def body(store: SQLEventStore) -> None:
        for p in (10, 20):
            await store.append([ev("u", n=p, type_="task.progress-updated", replace_key="k:t1")])
        await store.append(
            [
                ev("u", n=30, type_="task.progress-updated", replace_key="k:t1"),
                ev("u", n=99, type_="task.progress-updated", replace_key="k:t2"),
            ]
        )
        rows = await store.read(after=0, user_id="u", session_id=None, limit=10)
        assert [json.loads(e.data_json)["n"] for e in rows] == [30, 99]

    run(_with_store(store_config, body))


def test_store_idempotency_and_failures_roundtrip(store_config: dict[str, Any]) -> None:
    async def body(store: SQLEventStore) -> None:
        batch = [ev("u"), ev("u")]
        await store.append(batch, [(IdempotencyRecord("pub", "k1", "h", ()), batch)])
        record = await store.idempotency("pub", "k1")
        assert record is not None and record.ids == tuple(str(e.id) for e in batch)
        assert await store.idempotency("pub", "other") is None
        now = now_ms()
        await store.record_failures([FailedDelivery(batch[0].id, "u", None, "c1", "slow_client", now)])  # type: ignore[arg-type]
        [failure] = await store.failures(user_id="u")
        assert (failure.event_id, failure.reason, failure.type) == (batch[0].id, "slow_client", "custom.e")
        assert await store.failures(user_id="nobody") == []
        await store.mark_resent([failure.id], now + 1)  # type: ignore[list-item]
        assert await store.failures(user_id="u") == []
        [done] = await store.failures(user_id="u", include_resent=True)
        assert done.resend_count == 1 and done.resent_ms == now + 1

    run(_with_store(store_config, body))


def test_store_purge_removes_exactly_the_old_events(store_config: dict[str, Any]) -> None:
    now = now_ms()
    cutoff = now - 7 * DAY
    ages = {
        "ten_days": now - 10 * DAY,
        "eight_days": now - 8 * DAY,
        "just_older": cutoff - 60_000,
        "just_newer": cutoff + 60_000,
        "now": now,
    }

    async def body(store: SQLEventStore) -> None:
        if store.dialect == "postgresql":
            async with store._engine.begin() as conn:  # day partitions for the old days too
                for t in ages.values():
                    await retention.ensure(conn, t)
        rows = {name: ev("u", time_ms=t) for name, t in ages.items()}
        for e in rows.values():
            await store.append([e])
        assert await store.count_older(cutoff) == 3
        assert await store.purge(cutoff) == 3
        left = await store.read(after=0, user_id="u", session_id=None, limit=10)
        assert [e.id for e in left] == [rows["just_newer"].id, rows["now"].id]
        assert await store.purged_through() == rows["just_older"].id
        assert await store.head() == rows["now"].id
        assert await store.purge(cutoff) == 0
        if store.dialect == "postgresql":
            async with store._engine.connect() as conn:
                names = set(await retention._partitions(conn))
            assert retention.partition_name(retention.day_start(ages["ten_days"])) not in names
            assert retention.partition_name(retention.day_start(now)) in names

    run(_with_store(store_config, body))


def test_store_sensitive_data_is_encrypted_and_keys_rotate(store_config: dict[str, Any]) -> None:
    old_key, new_key_ = new_key(), new_key()
    secret = "the dragon's true name"

    async def write_old(store: SQLEventStore) -> int:
        e = Event("custom.secret", json.dumps({"text": secret}), user_id="u", sensitive=True)
        await store.append([e])
        return e.id  # type: ignore[return-value]

    async def raw_rows(store: SQLEventStore) -> list[Any]:
        async with store._engine.connect() as conn:
            return list(
                (await conn.execute(sa.text("SELECT id, data, key_id FROM events ORDER BY id"))).all()
            )

    old_id = run(_with_store(store_config, write_old, cipher=Cipher(old_key)))

    async def rotate(store: SQLEventStore) -> None:
        e = Event("custom.secret", json.dumps({"text": secret + " 2"}), user_id="u", sensitive=True)
        await store.append([e])
        rows = await raw_rows(store)
        assert all(secret not in r.data and "dragon" not in r.data for r in rows)
        assert [r.key_id for r in rows] == [Cipher(old_key).current, Cipher(new_key_).current]
        back = await store.read(after=0, user_id="u", session_id=None, limit=10)
        assert [json.loads(x.data_json)["text"] for x in back] == [secret, secret + " 2"]
        assert back[0].id == old_id and back[0].sensitive

    run(_with_store(store_config, rotate, cipher=Cipher(f"{new_key_},{old_key}")))

    async def without_old_key(store: SQLEventStore) -> None:
        # The row sealed with the removed key is skipped (logged, counted), never a failed read:
        # one unreadable event must not wedge the user's polling and replay.
        back = await store.read(after=0, user_id="u", session_id=None, limit=10)
        assert [json.loads(x.data_json)["text"] for x in back] == [secret + " 2"]
        assert back.through == back[0].id and not back.full and store.unreadable == 1

    run(_with_store(store_config, without_old_key, cipher=Cipher(new_key_)))


_WRITER = textwrap.dedent("""
    import asyncio, json, os, random, sys
    from scribe_events.events import Event
    from scribe_events.store.sql import SQLEventStore

    async def main():
        store = SQLEventStore(os.environ["URL"], schema=os.environ.get("SCHEMA") or None, auto_migrate=False)
        await store.start()
        tag = sys.argv[1]
        async def worker(w):
            for i in range(int(os.environ["BATCHES"])):
                batch = [Event("custom.w", json.dumps({"w": tag}), user_id="u")
                         for _ in range(random.randint(1, 3))]
                await store.append(batch)
        await asyncio.gather(*(worker(w) for w in range(4)))
        await store.close()

    asyncio.run(main())
""")


def test_store_concurrent_writers_in_two_processes_never_skip_or_repeat(store_config: dict[str, Any]) -> None:
    # Create the schema first, then two processes write with 4 concurrent tasks each while this
    # process reads "everything after the last id I saw" in a loop, as a resuming client does.
    run(_with_store(store_config, lambda store: asyncio.sleep(0)))
    env = {
        **os.environ,
        "URL": store_config["database_url"],
        "SCHEMA": store_config.get("database_schema") or "",
        "BATCHES": "60",
    }
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, tag], env=env) for tag in ("a", "b")]

    async def read_along(store: SQLEventStore) -> tuple[list[int], list[int]]:
        seen: list[int] = []
        last = 0
        while True:
            done = all(w.poll() is not None for w in writers)
            batch = await store.read(after=last, user_id="u", session_id=None, limit=50)
            seen += [e.id for e in batch]  # type: ignore[misc]
            if batch:
                last = batch[-1].id  # type: ignore[assignment]
            elif done:
                break
            else:
                await asyncio.sleep(0.002)
        everything = [e.id for e in await store.read_all(after=0, limit=100_000)]
        return seen, everything  # type: ignore[return-value]

    seen, everything = run(_with_store(store_config, read_along))
    assert all(w.wait() == 0 for w in writers)
    assert len(everything) >= 2 * 4 * 60
    assert seen == everything  # nothing skipped, nothing twice, in order


def test_db_upgrade_and_current_commands(store_config: dict[str, Any], tmp_path: Path) -> None:
    env = {"SCRIBE_EVENTS_DATABASE_URL": store_config["database_url"]}
    if store_config.get("database_schema"):
        env["SCRIBE_EVENTS_DATABASE_SCHEMA"] = store_config["database_schema"]

    before = cli("db", "current", cwd=tmp_path, env=env)
    assert before.returncode == 1 and "needs `scribe-events db upgrade`" in before.stdout
    upgraded = cli("db", "upgrade", cwd=tmp_path, env=env)
    assert upgraded.returncode == 0 and "upgraded" in upgraded.stdout, upgraded.stderr
    again = cli("db", "upgrade", cwd=tmp_path, env=env)
    assert "up to date" in again.stdout
    current = json.loads(cli("db", "current", "--json", cwd=tmp_path, env=env).stdout)
    assert current["current"] == current["head"] == migrate.head() == "0003"
    assert migrate.scripts_head() == migrate.HEAD  # a new migration bumps HEAD


def test_store_started_on_a_current_schema_does_not_load_alembic(store_config: dict[str, Any]) -> None:
    """Alembic (about 80 ms to import) is loaded to migrate only: an instance starting on a
    database already at the head reads the version table itself, migrating or checking."""
    run(_with_store(store_config, lambda store: asyncio.sleep(0)))  # migrated now
    probe = textwrap.dedent(
        """
        import asyncio, json, sys
        from scribe_events.store.sql import SQLEventStore
        config = json.loads(sys.argv[1])
        async def main():
            for auto in (True, False):
                store = SQLEventStore(config["database_url"], schema=config.get("database_schema"),
                                      auto_migrate=auto)
                await store.start()
                await store.close()
        asyncio.run(main())
        print("alembic" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(store_config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _version_table(config: dict[str, Any]) -> sa.TableClause:
    """Alembic's version table in the test's database or schema."""
    return sa.table(migrate.VERSION_TABLE, sa.column("version_num"), schema=config.get("database_schema"))


def test_a_schema_at_a_revision_this_version_does_not_know_is_one_error(
    store_config: dict[str, Any], tmp_path: Path
) -> None:
    """A rollback: a newer version migrated the database, an older one starts on it. Alembic's
    "Can't locate revision" was a traceback from `serve` and `db upgrade`."""
    schema = store_config.get("database_schema")

    async def body(store: SQLEventStore) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(sa.update(_version_table(store_config)).values(version_num="9999"))
        for auto, message in ((True, "newer scribe-events"), (False, "at revision 9999")):
            again = make({**store_config, "auto_migrate": auto})
            with pytest.raises(StoreUnavailable, match=message):
                await again.start()
            await again.close()

    run(_with_store(store_config, body))
    env = {"SCRIBE_EVENTS_DATABASE_URL": store_config["database_url"]}
    if schema:
        env["SCRIBE_EVENTS_DATABASE_SCHEMA"] = schema
    upgraded = cli("db", "upgrade", cwd=tmp_path, env=env)
    assert upgraded.returncode == 1 and "Traceback" not in upgraded.stderr + upgraded.stdout
    assert "newer scribe-events" in upgraded.stderr
    asked = cli("db", "upgrade", "0002x", cwd=tmp_path, env=env)
    assert asked.returncode == 1 and "'0002x'" in asked.stderr and "Traceback" not in asked.stderr
    current = cli("db", "current", cwd=tmp_path, env=env)
    assert current.returncode == 1 and "unknown to this version" in " ".join(current.stdout.split())


def test_store_refuses_a_version_table_naming_two_revisions(store_config: dict[str, Any]) -> None:
    async def body(store: SQLEventStore) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(sa.insert(_version_table(store_config)).values(version_num="0002"))
        for auto in (True, False):
            again = make({**store_config, "auto_migrate": auto})
            with pytest.raises(StoreUnavailable, match="2 schema revisions"):
                await again.start()
            await again.close()

    run(_with_store(store_config, body))


def test_retention_job_purges_by_age_then_by_size(store_config: dict[str, Any]) -> None:
    from scribe_events.config import Settings
    from scribe_events.retention import RetentionJob

    now = now_ms()

    async def body(store: SQLEventStore) -> None:
        for age_days in (9, 8, 3, 2, 0):
            await store.append([ev("u", n=age_days, time_ms=now - age_days * DAY - 1000)])
        job = RetentionJob(store, Settings(retention_days=7, jwt_secret="x" * 40))
        assert await job.run_once() == 2  # the 9- and 8-day-old events
        left = await store.read(after=0, user_id="u", session_id=None, limit=10)
        assert [json.loads(e.data_json)["n"] for e in left] == [3, 2, 0]
        job.max_bytes = 1  # far over the size limit: oldest days go, today's events stay
        assert await job.run_once() == 2
        left = await store.read(after=0, user_id="u", session_id=None, limit=10)
        assert [json.loads(e.data_json)["n"] for e in left] == [0]

    run(_with_store(store_config, body))


def test_store_append_under_the_publish_lock_dies_with_the_lock(pg_schema: str) -> None:
    """Regression (fault suite, pg_terminate_backend): the publish lock was held on one session and
    the batch committed on another. When only the lock's session was killed, another instance took
    the lock and published a newer id before this batch's older one reached the broker, so live
    streams dropped the older one as already seen. A batch written under the lock now goes through
    the lock's session: lose the session and the batch is lost with it, never committed."""
    from tests.conftest import PG_URL, _pg_dsn

    async def body(store: SQLEventStore) -> None:
        async with store.publish_lock() as held:
            assert held
            killer = await asyncpg.connect(_pg_dsn(), timeout=5)
            try:
                killed = await killer.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_locks"
                    " WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND granted",
                    LOCK_NAMESPACE + 1,
                    store._lock_key,
                )
            finally:
                await killer.close()
            assert killed == 1
            with pytest.raises(StoreUnavailable):
                await store.append([ev("u", n=1)])
        assert await store.head() == 0  # nothing was committed without the lock

    async def outer() -> None:
        store = make({"database_url": PG_URL, "database_schema": pg_schema, "auto_migrate": True})
        await store.start()
        try:
            with contextlib.suppress(StoreUnavailable):  # releasing a lock whose session is gone
                await body(store)
            assert await store.head() == 0
        finally:
            await store.close()

    run(outer())


def _task_event(type_: str, task: str, **data: Any) -> Event:
    """A task event addressed to the task (the task_id audience), as the vocabulary builds it."""
    from scribe_events.vocabulary import parse_publish

    return parse_publish(
        {"type": type_, "task_id": task, "data": {"task_id": task, **data}}, max_event_bytes=65536
    )


def test_store_task_readers_grants_and_visibility(store_config: dict[str, Any]) -> None:
    """The one visibility rule of tasks, on both backends: readers named at the start see the task
    from its start, a reader granted later only what was stored after the grant; the readers a
    live delivery carries (resolved when storing, and again by read_ids and read_all) agree."""

    async def body(store: SQLEventStore) -> None:
        assert await store.grant("nope", "bob") is None  # no such task
        async with store._engine.connect() as conn:  # and no reader left behind for it
            assert (await conn.execute(sa.text("SELECT count(*) FROM task_readers"))).scalar() == 0
        started = _task_event("task.progress-started", "t1", owner="alice", readers=["bob"])
        started.time_ms -= 2 * DAY  # old events; the task itself is heard of now
        await store.append([started])
        assert started.readers == ("alice", "bob")
        first = _task_event("custom.step", "t1", n=1)
        first.time_ms -= 2 * DAY
        await store.append([first])
        granted = await store.grant("t1", "carol")
        assert granted is not None and granted.readers == ("alice", "bob", "carol")
        assert (await store.grant("t1", "carol")).readers == ("alice", "bob", "carol")  # once
        second = _task_event("custom.step", "t1", n=2)
        second.time_ms -= 2 * DAY
        await store.append([second])
        assert second.readers == ("alice", "bob", "carol")
        ids = [started.id, first.id, second.id]
        for user, seen in (("alice", ids), ("bob", ids), ("carol", [second.id]), ("dave", [])):
            page = await store.read(after=0, user_id=user, session_id=None, limit=100)
            assert [e.id for e in page] == seen, user
        again = await store.read_ids([second.id, first.id])  # any order in, id order out
        assert [e.id for e in again] == [first.id, second.id]
        assert [e.readers for e in again] == [("alice", "bob"), ("alice", "bob", "carol")]
        assert await store.read_ids([]) == []
        relay = await store.read_all(after=0, limit=100)
        assert [e.readers for e in relay] == [("alice", "bob"), ("alice", "bob"), ("alice", "bob", "carol")]
        # The readers of a live-only event: everyone granted by now.
        live = _task_event("custom.ping", "t1")
        live.persist = False
        await store.append([], live=[live])
        assert live.readers == ("alice", "bob", "carol")
        # Retention may purge every event of a task that goes on: a grant still works.
        await store.purge(now_ms() - DAY)
        assert await store.read_ids([started.id, first.id, second.id]) == []
        assert (await store.grant("t1", "erin")).readers[-1] == "erin"
        third = _task_event("custom.step", "t1", n=3)
        await store.append([third])
        page = await store.read(after=0, user_id="erin", session_id=None, limit=100)
        assert [e.id for e in page] == [third.id]

    run(_with_store(store_config, body))


def test_store_retention_forgets_tasks_nobody_heard_of_since_the_cutoff(store_config: dict[str, Any]) -> None:
    """Regression (review): tasks were never deleted, so a task whose worker died stayed running
    (and heartbeating stalled) for ever."""

    async def body(store: SQLEventStore) -> None:
        await store.append([_task_event("task.progress-started", "old", owner="alice", readers=["bob"])])
        assert [t.task_id for t in await store.silent_tasks(silent_since_ms=now_ms() + 1)] == ["old"]
        await store.purge(now_ms() + DAY)
        assert await store.silent_tasks(silent_since_ms=now_ms() + DAY) == []
        assert await store.task("old") is None

    run(_with_store(store_config, body))


def test_store_events_read_back_keep_their_routing_and_sealed_ones_open(store_config: dict[str, Any]) -> None:
    """What the relay and resend send again comes back from the store exactly as it was routed;
    a sensitive event for a session opens (its ciphertext is bound to type, user, session and
    broadcast), and one that cannot be opened is skipped and counted, never failing the read."""

    async def body(store: SQLEventStore) -> None:
        batch = [
            ev("u", n=1, session_id="s1", sensitive=True),
            ev(None, n=2, broadcast=True),
            ev("v", n=3, novel_id="n9"),
        ]
        await store.append(batch)
        back = list(await store.read_all(after=0, limit=10))
        assert [(e.user_id, e.session_id, e.broadcast, e.novel_id) for e in back] == [
            ("u", "s1", False, None),
            (None, None, True, None),
            ("v", None, False, "n9"),
        ]
        assert [json.loads(e.data_json)["n"] for e in back] == [1, 2, 3]
        assert [e.envelope() for e in back] == [e.envelope() for e in batch]
        # The sealed row moved to another audience no longer opens: skipped, counted, the rest read.
        async with store._engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE events SET session_id = 's2' WHERE id = :id"), {"id": batch[0].id}
            )
        page = await store.read_all(after=0, limit=10)
        assert [e.id for e in page] == [batch[1].id, batch[2].id] and store.unreadable == 1
        assert page.through == batch[2].id

    run(_with_store(store_config, body, cipher=Cipher(new_key())))
