"""Tasks in the store (R3): who may see a task's events, and the state its heartbeats come from.

``task.progress-started`` registers a task with its owner and first readers; later task events
update its state (progress, last update, running / completed / failed) and a grant adds a reader.
Everything here runs inside the transaction that stores the events, after their ids are drawn
(and, on PostgreSQL, under the writers' lock), so readers are resolved in commit order: a reader
granted before an event was committed is among its readers, one granted after is not.

A reader sees a task's events with an id above the reader's ``from_id``: for the owner and the
readers named at the start, everything from the start on; for a reader granted later, what comes
after the grant. The same rule is the SQL of replay and polling (:func:`visible_to`) and the
resolved ``readers`` of a live delivery (:func:`apply`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from scribe_events.events import Event
from scribe_events.exceptions import StoreRejected
from scribe_events.store.schema import events, task_readers, tasks
from scribe_events.vocabulary import TASK_ENDED, TASK_STARTED, TASK_UPDATED

RUNNING = "running"
_STATUS = {"task.progress-completed": "completed", "task.progress-failed": "failed"}


@dataclass(slots=True)
class TaskState:
    task_id: str
    owner: str
    status: str
    progress: float | None
    started_ms: int
    updated_ms: int
    ended_ms: int | None = None
    readers: tuple[str, ...] = ()  # every user who may see it, the owner first


def visible_to(user_id: str) -> Any:
    """SQL: a row addressed to a task (no user, not broadcast) that ``user_id`` may read."""
    t, r = events.c, task_readers.c
    return sa.and_(
        t.user_id.is_(None),
        t.broadcast.is_(False),
        t.task_id.is_not(None),
        sa.exists().where(r.task_id == t.task_id, r.user_id == user_id, r.from_id < t.id),
    )


def _insert(dialect: str, table: sa.Table) -> Any:
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


async def load(conn: AsyncConnection, task_ids: Sequence[str]) -> dict[str, TaskState]:
    if not task_ids:
        return {}
    rows = (await conn.execute(sa.select(tasks).where(tasks.c.task_id.in_(list(task_ids))))).all()
    return {
        r.task_id: TaskState(r.task_id, r.owner, r.status, r.progress, r.started_ms, r.updated_ms, r.ended_ms)
        for r in rows
    }


async def readers_of(conn: AsyncConnection, task_ids: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
    """Each task's readers with their ``from_id``, in the order they were granted."""
    out: dict[str, list[tuple[str, int]]] = {t: [] for t in task_ids}
    if not task_ids:
        return out
    r = task_readers.c
    rows = await conn.execute(
        sa.select(r.task_id, r.user_id, r.from_id)
        .where(r.task_id.in_(list(task_ids)))
        .order_by(r.granted_ms, r.from_id, r.user_id)
    )
    for task_id, user_id, from_id in rows:
        out[task_id].append((user_id, int(from_id)))
    return out


def _reject(message: str, code: str, field: str) -> StoreRejected:
    return StoreRejected(message, field=field, code=code)


async def apply(
    conn: AsyncConnection, dialect: str, stored: Sequence[Event], live: Sequence[Event], now: int
) -> None:
    """Register started tasks, check and update task state, and resolve the readers of every
    event addressed to a task. ``stored`` have their ids; ``live`` (never stored) reach every
    current reader. Raises :class:`StoreRejected` for an event the task state refuses (the whole
    transaction is then rolled back and the publisher retries its jobs one by one)."""
    concerned = [
        e for e in (*stored, *live) if e.task_id is not None and (e.for_task or e.type.startswith("task."))
    ]
    if not concerned:
        return
    task_ids = list(dict.fromkeys(e.task_id for e in concerned if e.task_id is not None))
    state = await load(conn, task_ids)
    started: dict[str, TaskState] = {}
    new_readers: list[dict[str, Any]] = []
    for e in concerned:
        task_id = e.task_id
        assert task_id is not None
        task = state.get(task_id)
        if e.type == TASK_STARTED and e.owner is not None:
            if task is not None and task.owner != e.owner:
                raise _reject(
                    f"task {task_id!r} belongs to another owner", "task_owner_mismatch", "data.owner"
                )
            task = TaskState(task_id, e.owner, RUNNING, None, now, now)  # a start again: a new run
            state[task_id] = started[task_id] = task
            from_id = (e.id or 0) - 1
            for user in (e.owner, *e.grants):
                new_readers.append(
                    {"task_id": task_id, "user_id": user, "from_id": from_id, "granted_ms": now}
                )
            continue
        if task is None:
            if e.for_task:
                raise _reject(
                    f"no task {task_id!r} was started (publish task.progress-started first)",
                    "unknown_task",
                    "task_id",
                )
            continue  # a task event for one user, of a task this service does not track
        if (e.type == TASK_UPDATED or e.type in TASK_ENDED) and task.status != RUNNING:
            raise _reject(f"task {task_id!r} has already {task.status}", "task_ended", "type")
        if e.type == TASK_UPDATED:
            progress = _progress(e)
            if task.progress is not None and progress is not None and progress < task.progress:
                raise _reject(
                    f"{progress:g} is below the task's last progress ({task.progress:g})",
                    "progress_backwards",
                    "data.progress",
                )
            task.progress, task.updated_ms = progress, now
            started.setdefault(task_id, task)
        elif e.type in TASK_ENDED:
            task.status, task.ended_ms = _STATUS[e.type], now
            started.setdefault(task_id, task)
    await _save(conn, dialect, list(started.values()), new_readers)
    await resolve_readers(conn, concerned)


async def resolve_readers(conn: AsyncConnection, found: Sequence[Event]) -> None:
    """Set ``readers`` of the events addressed to a task: the users with a ``from_id`` below the
    event's id (every current reader for a live-only event, which has none) — the rule of
    :func:`visible_to`, for live deliveries."""
    addressed = [e for e in found if e.for_task]
    if not addressed:
        return
    readers = await readers_of(conn, list(dict.fromkeys(e.task_id for e in addressed if e.task_id)))
    for e in addressed:
        e.readers = tuple(u for u, f in readers.get(e.task_id or "", ()) if e.id is None or f < e.id)


def _progress(e: Event) -> float | None:
    value = json.loads(e.data_json).get("progress")
    return float(value) if isinstance(value, int | float) else None


async def _save(
    conn: AsyncConnection, dialect: str, changed: list[TaskState], readers: list[dict[str, Any]]
) -> None:
    if changed:
        rows = [
            {
                "task_id": t.task_id,
                "owner": t.owner,
                "status": t.status,
                "progress": t.progress,
                "started_ms": t.started_ms,
                "updated_ms": t.updated_ms,
                "ended_ms": t.ended_ms,
            }
            for t in changed
        ]
        stmt = _insert(dialect, tasks)
        stmt = stmt.on_conflict_do_update(
            index_elements=["task_id"],
            set_={
                k: stmt.excluded[k]
                for k in ("owner", "status", "progress", "started_ms", "updated_ms", "ended_ms")
            },
        )
        await conn.execute(stmt, rows)
    if readers:
        await conn.execute(_insert(dialect, task_readers).on_conflict_do_nothing(), readers)


async def grant(conn: AsyncConnection, dialect: str, task_id: str, user_id: str, now: int) -> bool:
    """Add a reader who sees the task's events committed from now on. False if no such task."""
    if (await conn.execute(sa.select(tasks.c.task_id).where(tasks.c.task_id == task_id))).first() is None:
        return False
    head = sa.select(sa.func.coalesce(sa.func.max(events.c.id), 0)).scalar_subquery()
    stmt = _insert(dialect, task_readers).from_select(
        ["task_id", "user_id", "from_id", "granted_ms"],
        sa.select(sa.literal(task_id), sa.literal(user_id), head, sa.literal(now)),
    )
    await conn.execute(stmt.on_conflict_do_nothing())
    return True


async def describe(conn: AsyncConnection, task_id: str) -> TaskState | None:
    found = (await load(conn, [task_id])).get(task_id)
    if found is not None:
        found.readers = tuple(u for u, _ in (await readers_of(conn, [task_id]))[task_id])
    return found


async def running(conn: AsyncConnection, *, silent_since_ms: int, limit: int) -> list[TaskState]:
    """Running tasks not updated since ``silent_since_ms``, with their readers."""
    rows = (
        await conn.execute(
            sa.select(tasks)
            .where(tasks.c.status == RUNNING, tasks.c.updated_ms <= silent_since_ms)
            .order_by(tasks.c.updated_ms.desc())  # newest first: abandoned tasks never starve live ones
            .limit(limit)
        )
    ).all()
    found = [TaskState(r.task_id, r.owner, r.status, r.progress, r.started_ms, r.updated_ms) for r in rows]
    readers = await readers_of(conn, [t.task_id for t in found])
    for t in found:
        t.readers = tuple(u for u, _ in readers[t.task_id])
    return found


async def running_for(conn: AsyncConnection, user_id: str, limit: int) -> list[str]:
    """The running tasks ``user_id`` may see."""
    r = task_readers.c
    rows = await conn.execute(
        sa.select(tasks.c.task_id)
        .join(task_readers, r.task_id == tasks.c.task_id)
        .where(r.user_id == user_id, tasks.c.status == RUNNING)
        .order_by(tasks.c.started_ms.desc())  # the newest tasks, if a user has more than the limit
        .limit(limit)
    )
    return [row[0] for row in rows]
