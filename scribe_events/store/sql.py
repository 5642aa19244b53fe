"""The event store on SQLAlchemy's async engine: SQLite (aiosqlite) embedded, PostgreSQL (asyncpg).

Writes come from the publisher's single group-commit loop, so on SQLite (one writer) ids become
visible in the order they were given out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from scribe_events.events import Event, TypeFilter, now_ms
from scribe_events.exceptions import StoreUnavailable
from scribe_events.store.base import EventStore, IdempotencyClaim, IdempotencyRecord

metadata = sa.MetaData()

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("time_ms", sa.BigInteger, nullable=False),
    sa.Column("user_id", sa.String(200)),
    sa.Column("session_id", sa.String(200)),
    sa.Column("broadcast", sa.Boolean, nullable=False),
    sa.Column("task_id", sa.String(200)),
    sa.Column("novel_id", sa.String(200)),
    sa.Column("replace_key", sa.String(420)),
    sa.Column("sensitive", sa.Boolean, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_events_user_id", "user_id", "id"),
    sa.Index("ix_events_replace_key", "replace_key"),
    sa.Index("ix_events_time_ms", "time_ms"),
    sqlite_autoincrement=True,  # ids are never reused after a delete
)

idempotency_table = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("owner", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("ids", sa.Text, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

meta_table = sa.Table(
    "store_meta",
    metadata,
    sa.Column("key", sa.String(100), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

_COLUMNS = (
    events_table.c.id,
    events_table.c.type,
    events_table.c.time_ms,
    events_table.c.user_id,
    events_table.c.session_id,
    events_table.c.broadcast,
    events_table.c.task_id,
    events_table.c.novel_id,
    events_table.c.data,
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed important event survives a crash
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


class SQLEventStore(EventStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine | None = None

    @property
    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise StoreUnavailable("the store is not started")
        return self.engine

    async def start(self) -> None:
        self.engine = create_async_engine(self.url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            sa_event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(f"cannot open the store at {self.engine.url!r}: {exc}") from exc

    def describe(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    async def append(self, events: Sequence[Event], idempotency: Sequence[IdempotencyClaim] = ()) -> None:
        try:
            async with self._engine.begin() as conn:
                if events:
                    rows = [
                        {
                            "type": e.type,
                            "time_ms": e.time_ms,
                            "user_id": e.user_id,
                            "session_id": e.session_id,
                            "broadcast": e.broadcast,
                            "task_id": e.task_id,
                            "novel_id": e.novel_id,
                            "replace_key": e.replace_key,
                            "sensitive": e.sensitive,
                            "data": e.data_json,
                        }
                        for e in events
                    ]
                    stmt = sa.insert(events_table).returning(events_table.c.id, sort_by_parameter_order=True)
                    result = await conn.execute(stmt, rows)
                    ids = [row[0] for row in result]
                    newest: dict[str, int] = {}
                    for e, id_ in zip(events, ids, strict=True):
                        e.id = id_
                        if e.replace_key is not None:
                            newest[e.replace_key] = id_
                    if newest:
                        await conn.execute(
                            sa.delete(events_table).where(
                                events_table.c.replace_key == sa.bindparam("k"),
                                events_table.c.id < sa.bindparam("newest"),
                            ),
                            [{"k": k, "newest": v} for k, v in newest.items()],
                        )
                if idempotency:
                    await conn.execute(
                        sa.insert(idempotency_table),
                        [
                            {
                                "owner": r.owner,
                                "key": r.key,
                                "request_hash": r.request_hash,
                                "ids": json.dumps([e.wire_id for e in evs]),
                                "created_ms": now_ms(),
                            }
                            for r, evs in idempotency
                        ],
                    )
        except (SQLAlchemyError, OSError) as exc:
            for e in events:
                e.id = None
            raise StoreUnavailable(f"the store could not take the events: {type(exc).__name__}") from exc

    async def read(
        self,
        *,
        after: int,
        user_id: str,
        session_id: str | None,
        limit: int,
        types: TypeFilter | None = None,
    ) -> list[Event]:
        t = events_table.c
        session_ok = (
            t.session_id.is_(None)
            if session_id is None
            else sa.or_(t.session_id.is_(None), t.session_id == session_id)
        )
        where = [t.id > after, sa.or_(t.broadcast.is_(True), sa.and_(t.user_id == user_id, session_ok))]
        if types is not None:
            where.append(sa.or_(*(t.type.like(p, escape="\\") for p in types.sql_like())))
        stmt = sa.select(*_COLUMNS).where(*where).order_by(t.id).limit(limit)
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(stmt)).all()
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(f"the store could not be read: {type(exc).__name__}") from exc
        return [
            Event(
                r.type,
                r.data,
                id=r.id,
                time_ms=r.time_ms,
                user_id=r.user_id,
                session_id=r.session_id,
                broadcast=r.broadcast,
                task_id=r.task_id,
                novel_id=r.novel_id,
            )
            for r in rows
        ]

    async def _scalar(self, stmt: sa.Select[Any]) -> Any:
        try:
            async with self._engine.connect() as conn:
                return (await conn.execute(stmt)).scalar()
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(f"the store could not be read: {type(exc).__name__}") from exc

    async def head(self) -> int:
        newest = await self._scalar(sa.select(sa.func.max(events_table.c.id)))
        return max(int(newest or 0), await self.purged_through())

    async def oldest(self) -> int | None:
        value = await self._scalar(sa.select(sa.func.min(events_table.c.id)))
        return None if value is None else int(value)

    async def purged_through(self) -> int:
        value = await self._scalar(sa.select(meta_table.c.value).where(meta_table.c.key == "purged_through"))
        return int(value or 0)

    async def idempotency(self, owner: str, key: str) -> IdempotencyRecord | None:
        t = idempotency_table.c
        try:
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(sa.select(t.request_hash, t.ids).where(t.owner == owner, t.key == key))
                ).first()
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(f"the store could not be read: {type(exc).__name__}") from exc
        if row is None:
            return None
        return IdempotencyRecord(owner, key, row.request_hash, tuple(json.loads(row.ids)))

    async def ping(self) -> bool:
        try:
            await self._scalar(sa.select(sa.literal(1)))
        except StoreUnavailable:
            return False
        return True
