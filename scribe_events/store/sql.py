"""The event store on SQLAlchemy's async engine: SQLite (aiosqlite) embedded, PostgreSQL (asyncpg).

Ids become visible in the order they are given out, which is what lets replay read "everything
after N" without ever skipping an event:
- SQLite has one writer at a time, and the id is assigned inside the writing transaction;
- PostgreSQL takes a transaction-scoped advisory lock before drawing ids from the sequence, so
  concurrent writers (on any number of instances) commit one batch at a time, in id order. With
  group commit a batch holds many events, so the lock costs one short wait per batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import secrets
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from scribe_events.crypto import Cipher, CryptoError
from scribe_events.events import Event, TypeFilter, now_ms
from scribe_events.exceptions import StoreRejected, StoreUnavailable
from scribe_events.store import migrate, retention
from scribe_events.store import tasks as task_store
from scribe_events.store.base import EventStore, IdempotencyClaim, IdempotencyRecord, Page
from scribe_events.store.schema import events, idempotency_keys, store_meta
from scribe_events.store.sql_common import EVENT_COLUMNS, LOCK_NAMESPACE, fail
from scribe_events.store.sql_upkeep import SQLUpkeep

log = logging.getLogger("scribe_events.store")

IDENTITY = "store_id"  # store_meta key of the store's identity (see EventStore.identity)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed important event survives a crash
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA case_sensitive_like=ON")  # type filters match case as the live stream does
    cur.close()


def _refused_rows(exc: BaseException) -> bool:
    """True when the error is about the rows (a constraint, a value the database or driver cannot
    take), not about reaching the store: retrying the same rows cannot help."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        return True  # the driver could not bind a value (e.g. text it cannot encode)
    return not isinstance(exc, SQLAlchemyError | OSError | StoreUnavailable)


def crypto_context(type_: str, user_id: str | None, session_id: str | None, broadcast: bool) -> str:
    """What a sensitive event's ciphertext is bound to: its type and audience."""
    return f"{type_}|{user_id or ''}|{session_id or ''}|{int(broadcast)}"


def _visible(user_id: str, session_id: str | None) -> Any:
    """SQL: the rows this user (and session) may read: broadcasts, theirs (a session sees the
    user's events for no session and for its own), and their tasks' (see store/tasks.py). The
    one visibility rule of replay and polling."""
    t = events.c
    session_ok = (
        t.session_id.is_(None)
        if session_id is None
        else sa.or_(t.session_id.is_(None), t.session_id == session_id)
    )
    return sa.or_(
        t.broadcast.is_(True), sa.and_(t.user_id == user_id, session_ok), task_store.visible_to(user_id)
    )


ROW_COLUMNS = (
    "time_ms",
    "type",
    "user_id",
    "session_id",
    "broadcast",
    "task_id",
    "novel_id",
    "replace_key",
    "sensitive",
    "key_id",
    "data",
)


class SQLEventStore(SQLUpkeep, EventStore):
    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        auto_migrate: bool | None = None,
        cipher: Cipher | None = None,
    ) -> None:
        self.url = url
        self.schema = schema
        self.dialect = sa.engine.make_url(url).get_backend_name()
        self.auto_migrate = self.dialect == "sqlite" if auto_migrate is None else auto_migrate
        self.cipher = cipher
        self.engine: AsyncEngine | None = None
        self._insert_sql: dict[bool, tuple[str, tuple[str, ...]]] = {}  # see _insert_rows
        self._lock_key = zlib.crc32((schema or "public").encode()) & 0x7FFFFFFF
        self._identity = 0
        self.unreadable = 0  # stored rows skipped because they could not be read
        self._unreadable_logged: set[int] = set()
        # The connection holding the publish lock, in the task that holds it (see publish_lock).
        self._locked: contextvars.ContextVar[AsyncConnection | None] = contextvars.ContextVar(
            f"publish_lock_{id(self)}", default=None
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def make_engine(self) -> AsyncEngine:
        connect_args: dict[str, Any] = {}
        if self.schema and self.dialect == "postgresql":
            connect_args["server_settings"] = {"search_path": self.schema}
        engine = create_async_engine(self.url, pool_pre_ping=True, connect_args=connect_args)
        if self.dialect == "sqlite":
            sa_event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine

    @property
    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise StoreUnavailable("the store is not started")
        return self.engine

    def describe(self) -> str:
        where = sa.engine.make_url(self.url).render_as_string(hide_password=True)
        return f"{where} (schema {self.schema})" if self.schema else where

    async def start(self) -> None:
        self.engine = self.make_engine()
        try:
            if self.auto_migrate:
                await migrate.upgrade(self.engine, self.schema)
            else:
                at, wanted = await migrate.current(self.engine, self.schema), migrate.head()
                if at != wanted:
                    raise StoreUnavailable(
                        f"the database schema is at revision {at or 'none'}, this version needs {wanted}: "
                        "run `scribe-events db upgrade`",
                        code="schema_out_of_date",
                    )
            if self.dialect == "postgresql":
                async with self.engine.begin() as conn:
                    await retention.ensure(conn, now_ms())
            self._identity = await self._ensure_identity()
        except (SQLAlchemyError, OSError) as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open the store at {self.describe()}: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    async def _ensure_identity(self) -> int:
        candidate = secrets.randbits(62) | 1
        query = sa.select(store_meta.c.value).where(store_meta.c.key == IDENTITY)
        insert = (postgresql if self.dialect == "postgresql" else sqlite).insert(store_meta)
        async with self._engine.begin() as conn:
            found = (await conn.execute(query)).scalar()
            if found is None:  # first start: name this store (another instance may race us to it)
                await conn.execute(insert.values(key=IDENTITY, value=candidate).on_conflict_do_nothing())
                found = (await conn.execute(query)).scalar()
        return int(found or candidate)

    async def identity(self) -> int:
        if not self._identity:
            raise StoreUnavailable("the store is not started")
        return self._identity

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    # -- writing -----------------------------------------------------------------------------------

    def _row(self, e: Event) -> dict[str, Any]:  # its keys: ROW_COLUMNS
        data, kid = e.data_json, None
        if e.sensitive:
            if self.cipher is None:
                raise StoreUnavailable(
                    "a sensitive event needs SCRIBE_EVENTS_ENCRYPTION_KEYS", code="encryption_not_configured"
                )
            kid, data = self.cipher.encrypt(
                data, crypto_context(e.type, e.user_id, e.session_id, e.broadcast)
            )
        return {
            "time_ms": e.time_ms,
            "type": e.type,
            "user_id": e.user_id,
            "session_id": e.session_id,
            "broadcast": e.broadcast,
            "task_id": e.task_id,
            "novel_id": e.novel_id,
            "replace_key": e.replace_key,
            "sensitive": e.sensitive,
            "key_id": kid,
            "data": data,
        }

    async def append(
        self,
        batch: Sequence[Event],
        idempotency: Sequence[IdempotencyClaim] = (),
        live: Sequence[Event] = (),
    ) -> None:
        try:
            rows = [self._row(e) for e in batch]
            async with self._writing() as conn:
                if rows:
                    ids = await self._insert(conn, rows)
                    newest: dict[str, int] = {}
                    for e, id_ in zip(batch, ids, strict=True):
                        e.id = id_
                        if e.replace_key is not None:
                            newest[e.replace_key] = id_
                    if newest:
                        await conn.execute(
                            sa.delete(events).where(
                                events.c.replace_key == sa.bindparam("k"),
                                events.c.id < sa.bindparam("newest"),
                            ),
                            [{"k": k, "newest": v} for k, v in newest.items()],
                        )
                await task_store.apply(conn, self.dialect, batch, live, now_ms())
                if idempotency:
                    created = now_ms()
                    await conn.execute(
                        sa.insert(idempotency_keys),
                        [
                            {
                                "owner": r.owner,
                                "key": r.key,
                                "request_hash": r.request_hash,
                                "ids": json.dumps([e.wire_id for e in evs]),
                                "created_ms": created,
                            }
                            for r, evs in idempotency
                        ],
                    )
        except Exception as exc:
            for e in batch:
                e.id = None
            if isinstance(exc, StoreRejected):  # the task state refused an event
                raise
            if _refused_rows(exc):
                # About this batch's rows, not the store: the publisher retries the jobs one by one.
                raise StoreRejected(f"the store refused the event(s): {type(exc).__name__}") from exc
            if isinstance(exc, StoreUnavailable):
                raise
            raise fail("take the events", exc) from exc

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A transaction: on the publish lock's connection while this task holds the lock."""
        locked = self._locked.get()
        if locked is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with locked.begin():
            yield locked

    async def _insert_rows(self, conn: AsyncConnection, rows: list[dict[str, Any]], *, with_id: bool) -> None:
        """One executemany of the driver's own INSERT, with the rows as tuples: SQLAlchemy's per-row
        parameter processing cost more than the rest of storing an event (the columns' Python
        values are what the drivers take: ints, strs, bools, None)."""
        statement = self._insert_sql.get(with_id)
        if statement is None:
            names = ("id", *ROW_COLUMNS) if with_id else ROW_COLUMNS
            compiled = (
                sa.insert(events).values({n: sa.bindparam(n) for n in names}).compile(dialect=conn.dialect)
            )
            order = tuple(compiled.positiontup or ())
            if sorted(order) != sorted(names):  # a paramstyle that is not positional: let Core do it
                await conn.execute(sa.insert(events), rows)
                return
            statement = self._insert_sql[with_id] = (str(compiled), order)
        sql, order = statement
        await conn.exec_driver_sql(sql, [tuple(row[n] for n in order) for row in rows])

    async def _insert(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
        if self.dialect == "postgresql":
            # Serialise writers across instances, then draw ids: commit order == id order.
            await conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                {"ns": LOCK_NAMESPACE, "key": self._lock_key},
            )
            drawn = await conn.execute(
                sa.text("SELECT nextval('events_id_seq') FROM generate_series(1, :n)"), {"n": len(rows)}
            )
            ids = sorted(int(r[0]) for r in drawn)
            for row, id_ in zip(rows, ids, strict=True):
                row["id"] = id_
            await self._insert_rows(conn, rows, with_id=True)
            return ids
        # SQLite: the write lock is ours from the first insert to the commit, so one executemany
        # gets consecutive AUTOINCREMENT ids ending at last_insert_rowid().
        await self._insert_rows(conn, rows, with_id=False)
        last = int((await conn.exec_driver_sql("SELECT last_insert_rowid()")).scalar_one())
        return list(range(last - len(rows) + 1, last + 1))

    @contextlib.asynccontextmanager
    async def publish_lock(self, *, wait: bool = True) -> AsyncIterator[bool]:
        """Hold the cross-instance publish lock (PostgreSQL session advisory lock) for a block.

        Publishers that share a broker hold it from their COMMIT through their PUBLISH, so every
        instance sees events in id order. Yields whether the lock is held (``wait=False`` may fail).
        A process that dies holding it loses it with its connection.

        What :meth:`append` writes while the lock is held goes through the lock's own connection:
        if that session is lost (killed, a network cut), the lock goes with it *and* so does the
        uncommitted batch, so no other instance can publish a newer id before an older one that
        was still being committed (a stream would then drop the older one as already seen).
        """
        if self.dialect != "postgresql":
            yield True
            return
        key = {"ns": LOCK_NAMESPACE + 1, "key": self._lock_key}
        try:
            async with self._engine.connect() as conn:
                if wait:
                    await conn.execute(sa.text("SELECT pg_advisory_lock(:ns, :key)"), key)
                    held = True
                else:
                    held = bool(
                        (await conn.execute(sa.text("SELECT pg_try_advisory_lock(:ns, :key)"), key)).scalar()
                    )
                await conn.commit()
                token = self._locked.set(conn if held else None)
                try:
                    yield held
                finally:
                    self._locked.reset(token)
                    if held:
                        await conn.execute(sa.text("SELECT pg_advisory_unlock(:ns, :key)"), key)
                        await conn.commit()
        except (SQLAlchemyError, OSError) as exc:
            raise fail("take the publish lock", exc) from exc

    # -- reading -----------------------------------------------------------------------------------

    def _page(self, rows: list[Any], *, after: int, limit: int) -> Page:
        """Rows to events; a row that cannot be read is skipped (logged once, counted)."""
        out = []
        for r in rows:
            try:
                out.append(self._event(r))
            except StoreUnavailable as exc:
                self.unreadable += 1
                if r.id not in self._unreadable_logged and len(self._unreadable_logged) < 10_000:
                    self._unreadable_logged.add(r.id)
                    log.error("stored event %s cannot be read and is skipped: %s", r.id, exc.message)
        return Page(out, through=int(rows[-1].id) if rows else after, full=len(rows) >= limit)

    def _event(self, r: Any) -> Event:
        data = r.data
        if r.key_id is not None:
            if self.cipher is None:
                raise StoreUnavailable(
                    "a stored sensitive event cannot be read: no encryption keys are configured",
                    code="encryption_not_configured",
                )
            try:
                data = self.cipher.decrypt(
                    r.key_id, data, crypto_context(r.type, r.user_id, r.session_id, r.broadcast)
                )
            except CryptoError as exc:
                raise StoreUnavailable(str(exc), code="decryption_failed") from exc
        return Event(
            r.type,
            data,
            id=r.id,
            time_ms=r.time_ms,
            user_id=r.user_id,
            session_id=r.session_id,
            broadcast=r.broadcast,
            task_id=r.task_id,
            novel_id=r.novel_id,
            sensitive=r.sensitive,
            for_task=r.user_id is None and not r.broadcast and r.task_id is not None,
        )

    async def _with_readers(self, found: Page) -> Page:
        """Resolve who a task's events reach (the relay and resend send them live again)."""
        if any(e.for_task for e in found):
            try:
                async with self._engine.connect() as conn:
                    await task_store.resolve_readers(conn, list(found))
            except (SQLAlchemyError, OSError) as exc:
                raise fail("be read", exc) from exc
        return found

    async def _rows(self, stmt: Any, action: str = "be read") -> list[Any]:
        try:
            async with self._engine.connect() as conn:
                return list((await conn.execute(stmt)).all())
        except (SQLAlchemyError, OSError) as exc:
            raise fail(action, exc) from exc

    async def read(
        self,
        *,
        after: int,
        user_id: str,
        session_id: str | None,
        limit: int,
        types: TypeFilter | None = None,
    ) -> Page:
        t = events.c
        where = [t.id > after, _visible(user_id, session_id)]
        if types is not None:
            where.append(sa.or_(*(t.type.like(p, escape="\\") for p in types.sql_like())))
        stmt = sa.select(*EVENT_COLUMNS).where(*where).order_by(t.id).limit(limit)
        return self._page(await self._rows(stmt), after=after, limit=limit)

    async def read_recent(
        self,
        user_id: str,
        session_id: str | None,
        *,
        type_: str,
        since_ms: int,
        through: int,
        limit: int = 500,
    ) -> list[Event]:
        t = events.c
        stmt = (
            sa.select(*EVENT_COLUMNS)
            .where(t.id <= through, t.time_ms >= since_ms, t.type == type_, _visible(user_id, session_id))
            .order_by(t.id)
            .limit(limit)
        )
        return list(self._page(await self._rows(stmt), after=0, limit=limit))

    async def read_all(self, *, after: int, limit: int, until: int | None = None) -> Page:
        where = [events.c.id > after]
        if until is not None:
            where.append(events.c.id <= until)
        stmt = sa.select(*EVENT_COLUMNS).where(*where).order_by(events.c.id).limit(limit)
        return await self._with_readers(self._page(await self._rows(stmt), after=after, limit=limit))

    async def read_ids(self, ids: Sequence[int]) -> list[Event]:
        if not ids:
            return []
        stmt = sa.select(*EVENT_COLUMNS).where(events.c.id.in_(list(ids))).order_by(events.c.id)
        return list(await self._with_readers(self._page(await self._rows(stmt), after=0, limit=len(ids) + 1)))

    async def _scalar(self, stmt: Any) -> Any:
        rows = await self._rows(stmt)
        return rows[0][0] if rows else None

    async def head(self) -> int:
        newest = await self._scalar(sa.select(sa.func.max(events.c.id)))
        return max(int(newest or 0), await self.purged_through())

    async def oldest(self) -> int | None:
        value = await self._scalar(sa.select(sa.func.min(events.c.id)))
        return None if value is None else int(value)

    async def purged_through(self) -> int:
        return await self.get_meta("purged_through")

    async def get_meta(self, key: str) -> int:
        value = await self._scalar(sa.select(store_meta.c.value).where(store_meta.c.key == key))
        return int(value or 0)

    async def set_meta(self, key: str, value: int, *, only_up: bool = True, durable: bool = True) -> None:
        """Set a watermark; with ``only_up`` it never moves backwards. Not ``durable``: on PostgreSQL
        the commit does not wait for the WAL flush (a crash may lose the newest value, never an
        event: for a hint such as the publish watermark, whose loss only makes the relay redo a
        little, this saves one fsync per batch)."""
        try:
            async with self._engine.begin() as conn:
                if not durable and self.dialect == "postgresql":
                    await conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                await retention.set_meta(conn, key, value, only_up=only_up)
        except (SQLAlchemyError, OSError) as exc:
            raise fail("be written", exc) from exc

    async def idempotency(self, owner: str, key: str) -> IdempotencyRecord | None:
        t = idempotency_keys.c
        rows = await self._rows(sa.select(t.request_hash, t.ids).where(t.owner == owner, t.key == key))
        if not rows:
            return None
        return IdempotencyRecord(owner, key, rows[0].request_hash, tuple(json.loads(rows[0].ids)))

    async def ping(self) -> bool:
        try:
            await self._scalar(sa.select(sa.literal(1)))
        except StoreUnavailable:
            return False
        return True
