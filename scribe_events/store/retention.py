"""Retention (R7.5): day partitions on PostgreSQL, purging old events, measuring the store.

On PostgreSQL ``events`` is partitioned by UTC day on ``time_ms``; partitions are made a few days
ahead (a DEFAULT partition catches anything else). Purging drops every partition that lies wholly
before the cutoff — no rows rewritten, the live partitions untouched — then deletes what is left
before the cutoff (the boundary day, the default partition) in small batches. SQLite deletes in
batches. The highest purged id is kept as the ``purged_through`` watermark, so a client resuming
from before it is told ``replay.truncated`` instead of silently missing events.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scribe_events.store.schema import (
    events,
    failed_deliveries,
    idempotency_keys,
    store_meta,
    task_readers,
    tasks,
)

DAY_MS = 86_400_000
DAYS_AHEAD = 3
BATCH = 5000
_PARTITION = re.compile(r"^events_p(\d{8})$")

# progress(done, total): called as a purge advances (the CLI draws a progress bar with it).
Progress = Callable[[int, int], None]


def day_start(ms: int) -> int:
    return ms - ms % DAY_MS


def partition_name(day_ms: int) -> str:
    return "events_p" + datetime.fromtimestamp(day_ms / 1000, UTC).strftime("%Y%m%d")


def _partition_day(name: str) -> int | None:
    match = _PARTITION.match(name)
    if match is None:
        return None
    day = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC)
    return int(day.timestamp() * 1000)


async def _partitions(conn: AsyncConnection) -> list[str]:
    rows = await conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname = 'events' AND p.relnamespace = to_regnamespace(current_schema())::oid"
        )
    )
    return [r[0] for r in rows]


async def ensure(conn: AsyncConnection, now: int) -> None:
    """Make the day partitions from yesterday to a few days ahead (PostgreSQL).

    Instances starting together (or their hourly jobs) take turns: a transaction lock per schema.
    """
    await conn.execute(sa.text("SELECT pg_advisory_xact_lock(23523, hashtext(current_schema()))"))
    existing = set(await _partitions(conn))
    today = day_start(now)
    for n in range(-1, DAYS_AHEAD + 1):
        start = today + n * DAY_MS
        name = partition_name(start)
        if name in existing:
            continue
        # A day whose rows already went to the default partition stays there (purged by rows).
        clash = await conn.execute(
            sa.text("SELECT 1 FROM events_default WHERE time_ms >= :a AND time_ms < :b LIMIT 1"),
            {"a": start, "b": start + DAY_MS},
        )
        if clash.first() is not None:
            continue
        await conn.execute(
            sa.text(
                f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF events FOR VALUES FROM ({start}) TO ({start + DAY_MS})'
            )
        )


async def set_meta(conn: AsyncConnection, key: str, value: int, *, only_up: bool = True) -> None:
    current = (await conn.execute(sa.select(store_meta.c.value).where(store_meta.c.key == key))).scalar()
    if current is None:
        await conn.execute(sa.insert(store_meta).values(key=key, value=value))
    elif not only_up or value > current:
        await conn.execute(sa.update(store_meta).where(store_meta.c.key == key).values(value=value))


async def purge(engine: AsyncEngine, dialect: str, cutoff_ms: int, progress: Progress | None = None) -> int:
    old = events.c.time_ms < cutoff_ms
    async with engine.begin() as conn:
        total, newest = (
            await conn.execute(sa.select(sa.func.count(), sa.func.max(events.c.id)).where(old))
        ).one()
        old_days = (
            [
                n
                for n in sorted(await _partitions(conn))
                if (d := _partition_day(n)) and d + DAY_MS <= cutoff_ms
            ]
            if dialect == "postgresql"
            else []
        )
        if not total and not old_days:
            await _forget_old(conn, cutoff_ms)
            if progress:
                progress(0, 0)
            return 0
        if total:
            # The watermark goes first: a resume from before it answers replay.truncated.
            await set_meta(conn, "purged_through", int(newest))
    done = 0
    if old_days:
        # Also the old days left empty by an earlier run whose DROP could not get its lock.
        for name in old_days:
            # One short transaction per day: counting reads only that partition; the DROP holds the
            # parent's lock for a moment, and gives up (lock_timeout) rather than queue behind
            # long readers and stall the writers behind it. A day left over is dropped next run.
            async with engine.begin() as conn:
                count = int((await conn.execute(sa.text(f'SELECT count(*) FROM "{name}"'))).scalar() or 0)
            try:
                async with engine.begin() as conn:
                    await conn.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                    await conn.execute(sa.text(f'DROP TABLE "{name}"'))
            except DBAPIError:
                continue  # busy: its rows are deleted below, or the day is dropped next time
            done += count
            if progress:
                progress(done, total)
    while True:
        async with engine.begin() as conn:
            ids = sa.select(events.c.id).where(old).order_by(events.c.id).limit(BATCH).scalar_subquery()
            deleted = (await conn.execute(sa.delete(events).where(events.c.id.in_(ids)))).rowcount or 0
        done += deleted
        if progress:
            progress(min(done, total), total)
        if deleted < BATCH:
            break
    async with engine.begin() as conn:
        await _forget_old(conn, cutoff_ms)
    return done


async def _forget_old(conn: AsyncConnection, cutoff_ms: int) -> None:
    """Idempotency keys, failure records and tasks last heard of before the cutoff (a task whose
    worker died stays running, silent, until retention forgets it)."""
    await conn.execute(sa.delete(idempotency_keys).where(idempotency_keys.c.created_ms < cutoff_ms))
    await conn.execute(sa.delete(failed_deliveries).where(failed_deliveries.c.failed_ms < cutoff_ms))
    old_tasks = sa.select(tasks.c.task_id).where(tasks.c.updated_ms < cutoff_ms).scalar_subquery()
    await conn.execute(sa.delete(task_readers).where(task_readers.c.task_id.in_(old_tasks)))
    await conn.execute(sa.delete(tasks).where(tasks.c.updated_ms < cutoff_ms))


async def size_bytes(conn: AsyncConnection, dialect: str) -> int:
    """Bytes the events take (PostgreSQL: all partitions with indexes; SQLite: pages in use)."""
    if dialect == "postgresql":
        names = ["events_default", *await _partitions(conn)]
        total = 0
        for name in set(names):
            total += int(
                (await conn.execute(sa.text(f"SELECT pg_total_relation_size('\"{name}\"')"))).scalar() or 0
            )
        return total
    page_size = (await conn.exec_driver_sql("PRAGMA page_size")).scalar() or 0
    pages = (await conn.exec_driver_sql("PRAGMA page_count")).scalar() or 0
    free = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar() or 0
    return int(page_size) * (int(pages) - int(free))


def cutoff_for(days: float, now_ms: int) -> int:
    return now_ms - int(timedelta(days=days).total_seconds() * 1000)
