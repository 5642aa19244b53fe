"""The SQL store's upkeep and task queries: failed deliveries, retention, tasks.

A mixin of :class:`~scribe_events.store.sql.SQLEventStore` (it uses the store's engine and
helpers), kept apart so that the store's ordering and visibility, in ``sql.py``, read on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scribe_events.events import Event, now_ms
from scribe_events.store import retention
from scribe_events.store import tasks as task_store
from scribe_events.store.base import FailedDelivery, Page
from scribe_events.store.schema import events, failed_deliveries, metric_snapshots
from scribe_events.store.sql_common import EVENT_COLUMNS, LOCK_NAMESPACE, fail
from scribe_events.store.tasks import TaskState
from scribe_events.vocabulary import TASK_STARTED, TASK_UPDATED


class SQLUpkeep:
    dialect: str
    _lock_key: int

    if TYPE_CHECKING:  # provided by SQLEventStore

        @property
        def _engine(self) -> AsyncEngine: ...

        def _writing(self) -> AbstractAsyncContextManager[AsyncConnection]: ...

        async def _rows(self, stmt: Any, action: str = "be read") -> list[Any]: ...

        async def _scalar(self, stmt: Any) -> Any: ...

        def _page(self, rows: list[Any], *, after: int, limit: int) -> Page: ...

    # -- tasks (see store/tasks.py) ----------------------------------------------------------------

    async def grant(self, task_id: str, user_id: str) -> TaskState | None:
        """Let ``user_id`` see the task's events committed from now on; None if no such task."""
        try:
            async with self._writing() as conn:
                if self.dialect == "postgresql":  # ordered with the writers: "from now on" is exact
                    await conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                        {"ns": LOCK_NAMESPACE, "key": self._lock_key},
                    )
                if not await task_store.grant(conn, self.dialect, task_id, user_id, now_ms()):
                    return None
                return await task_store.describe(conn, task_id)
        except (SQLAlchemyError, OSError) as exc:
            raise fail("grant the task", exc) from exc

    async def task(self, task_id: str) -> TaskState | None:
        try:
            async with self._engine.connect() as conn:
                return await task_store.describe(conn, task_id)
        except (SQLAlchemyError, OSError) as exc:
            raise fail("read the task", exc) from exc

    async def silent_tasks(self, *, silent_since_ms: int, limit: int = 1000) -> list[TaskState]:
        """Running tasks with no update since then, with their readers (for heartbeats)."""
        try:
            async with self._engine.connect() as conn:
                return await task_store.running(conn, silent_since_ms=silent_since_ms, limit=limit)
        except (SQLAlchemyError, OSError) as exc:
            raise fail("read the tasks", exc) from exc

    async def task_snapshot(self, user_id: str, *, through: int | None, limit: int = 100) -> list[Event]:
        """For a stream that opens: the newest event of each running task ``user_id`` may see
        (its latest progress update, else its start), at or below ``through`` (None: any)."""
        try:
            async with self._engine.connect() as conn:
                task_ids = await task_store.running_for(conn, user_id, limit)
                if not task_ids:
                    return []
                t = events.c
                where = [
                    t.task_id.in_(task_ids),
                    t.type.in_([TASK_STARTED, TASK_UPDATED]),
                    task_store.visible_to(user_id),
                ]
                if through is not None:
                    where.append(t.id <= through)
                newest = sa.select(sa.func.max(t.id)).where(*where).group_by(t.task_id).scalar_subquery()
                rows = list(
                    (
                        await conn.execute(sa.select(*EVENT_COLUMNS).where(t.id.in_(newest)).order_by(t.id))
                    ).all()
                )
        except (SQLAlchemyError, OSError) as exc:
            raise fail("read the tasks", exc) from exc
        return list(self._page(rows, after=0, limit=len(rows) + 1))

    # -- failed deliveries -------------------------------------------------------------------------

    async def record_failures(self, failures: Sequence[FailedDelivery]) -> None:
        if not failures:
            return
        rows = [
            {
                "event_id": f.event_id,
                "user_id": f.user_id,
                "session_id": f.session_id,
                "connection_id": f.connection_id,
                "reason": f.reason,
                "failed_ms": f.failed_ms,
                "resend_count": 0,
            }
            for f in failures
        ]
        try:
            async with self._engine.begin() as conn:
                await conn.execute(sa.insert(failed_deliveries), rows)
        except (SQLAlchemyError, OSError) as exc:
            raise fail("record failed deliveries", exc) from exc

    async def failures(
        self,
        *,
        ids: Sequence[int] = (),
        user_id: str | None = None,
        since_ms: int | None = None,
        include_resent: bool = False,
        limit: int = 1000,
    ) -> list[FailedDelivery]:
        f = failed_deliveries.c
        where: list[sa.ColumnElement[bool]] = []
        if ids:
            where.append(f.event_id.in_(list(ids)))
        if user_id is not None:
            where.append(f.user_id == user_id)
        if since_ms is not None:
            where.append(f.failed_ms >= since_ms)
        if not include_resent:
            where.append(f.resent_ms.is_(None))
        stmt = (
            sa.select(
                f.id,
                f.event_id,
                f.user_id,
                f.session_id,
                f.connection_id,
                f.reason,
                f.failed_ms,
                f.resent_ms,
                f.resend_count,
                events.c.type,
            )
            .select_from(failed_deliveries.outerjoin(events, events.c.id == f.event_id))
            .where(*where)
            .order_by(f.id)
            .limit(limit)
        )
        return [
            FailedDelivery(
                r.event_id,
                r.user_id,
                r.session_id,
                r.connection_id,
                r.reason,
                r.failed_ms,
                id=r.id,
                resent_ms=r.resent_ms,
                resend_count=r.resend_count,
                type=r.type,
            )
            for r in await self._rows(stmt)
        ]

    async def count_failures(self, user_id: str | None) -> int:
        """Failed deliveries not yet resent, of one user (None: of everyone)."""
        f = failed_deliveries.c
        stmt = sa.select(sa.func.count()).where(f.resent_ms.is_(None))
        if user_id is not None:
            stmt = stmt.where(f.user_id == user_id)
        return int(await self._scalar(stmt) or 0)

    async def mark_resent(self, failure_ids: Sequence[int], when_ms: int) -> None:
        if not failure_ids:
            return
        f = failed_deliveries.c
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    sa.update(failed_deliveries)
                    .where(f.id.in_(list(failure_ids)))
                    .values(resent_ms=when_ms, resend_count=f.resend_count + 1)
                )
        except (SQLAlchemyError, OSError) as exc:
            raise fail("mark failed deliveries resent", exc) from exc

    # -- retention ---------------------------------------------------------------------------------

    async def count_older(self, cutoff_ms: int) -> int:
        return int(await self._scalar(sa.select(sa.func.count()).where(events.c.time_ms < cutoff_ms)) or 0)

    async def purge(self, cutoff_ms: int, *, progress: retention.Progress | None = None) -> int:
        """Delete every event older than ``cutoff_ms`` (and old idempotency keys and failure records).

        PostgreSQL drops whole day partitions, then deletes the rest in batches; SQLite deletes in
        batches. Returns the number of events deleted.
        """
        try:
            return await retention.purge(self._engine, self.dialect, cutoff_ms, progress)
        except (SQLAlchemyError, OSError) as exc:
            raise fail("purge", exc) from exc

    async def size_bytes(self) -> int:
        try:
            async with self._engine.connect() as conn:
                return await retention.size_bytes(conn, self.dialect)
        except (SQLAlchemyError, OSError) as exc:
            raise fail("be measured", exc) from exc

    # -- metric snapshots (the history behind `scribe-events report`, without Redis) ------------

    async def save_snapshot(self, instance: str, at_ms: int, data: bytes, *, keep_ms: int) -> None:
        """Keep one instance's snapshot; forget every snapshot older than ``keep_ms``."""
        m = metric_snapshots.c
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    sa.insert(metric_snapshots).values(instance=instance, at_ms=at_ms, data=data)
                )
                await conn.execute(sa.delete(metric_snapshots).where(m.at_ms < at_ms - keep_ms))
        except (SQLAlchemyError, OSError) as exc:
            raise fail("keep a metric snapshot", exc) from exc

    async def snapshots(
        self, *, since_ms: int, instance: str | None = None, limit: int = 100_000
    ) -> list[tuple[str, int, bytes]]:
        """``(instance, at_ms, data)`` from ``since_ms`` on, oldest first."""
        m = metric_snapshots.c
        stmt = sa.select(m.instance, m.at_ms, m.data).where(m.at_ms >= since_ms)
        if instance is not None:
            stmt = stmt.where(m.instance == instance)
        # The newest ``limit`` (a window too long for the limit keeps its latest hours), oldest first.
        rows = await self._rows(stmt.order_by(m.at_ms.desc()).limit(limit), "read the metric snapshots")
        return [(r.instance, int(r.at_ms), bytes(r.data)) for r in reversed(rows)]

    async def maintain(self) -> None:
        if self.dialect == "postgresql":
            try:
                async with self._engine.begin() as conn:
                    await retention.ensure(conn, now_ms())
            except (SQLAlchemyError, OSError) as exc:
                raise fail("create partitions", exc) from exc
