"""What the service needs from a store. Ids are integers that become visible in the order given out."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scribe_events.events import Event, TypeFilter

if TYPE_CHECKING:
    from scribe_events.store.tasks import TaskState


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    owner: str
    key: str
    request_hash: str
    ids: tuple[str, ...]


class Page(list[Event]):
    """Events read in id order. Rows that cannot be read (e.g. sealed with a key no longer
    configured) are skipped, so pagination goes by what was *scanned*: ``through`` is the last id
    the read covered, ``full`` whether it hit its limit (there may be more after ``through``)."""

    __slots__ = ("full", "through")

    def __init__(self, events: list[Event], *, through: int, full: bool) -> None:
        super().__init__(events)
        self.through = through
        self.full = full


# A claim to save: the record (without ids yet) and the events of that request.
IdempotencyClaim = tuple[IdempotencyRecord, Sequence[Event]]


@dataclass(frozen=True, slots=True)
class FailedDelivery:
    """An important event that could not be written to a connection that should have had it."""

    event_id: int
    user_id: str
    session_id: str | None
    connection_id: str
    reason: str  # slow_client | write_error
    failed_ms: int
    id: int | None = None
    resent_ms: int | None = None
    resend_count: int = 0
    type: str | None = None


class EventStore(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, and migrate (embedded) or check the schema."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    def describe(self) -> str:
        """Where the store is, for logs (no password)."""
        return type(self).__name__

    @abc.abstractmethod
    async def append(
        self,
        batch: Sequence[Event],
        idempotency: Sequence[IdempotencyClaim] = (),
        live: Sequence[Event] = (),
    ) -> None:
        """Store events (and idempotency records) in one transaction; set each event's ``id``.
        Task state moves with them, and the events addressed to a task (``live`` ones too, which
        are not stored) get their ``readers`` resolved in the same transaction.

        Ids must become visible in the order they are given out: a reader that has seen id N
        never later finds a new event with an id below N. Each idempotency claim is saved with
        the ids of its request's events.
        """

    def publish_lock(self, *, wait: bool = True) -> contextlib.AbstractAsyncContextManager[bool]:
        """A lock across instances, held from COMMIT to PUBLISH when the broker is shared."""
        return _no_lock()

    @abc.abstractmethod
    async def read(
        self, *, after: int, user_id: str, session_id: str | None, limit: int, types: TypeFilter | None = None
    ) -> Page:
        """Events after ``after`` that this user (and session) may see, oldest first."""

    @abc.abstractmethod
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
        """Events of one type stored since ``since_ms``, at or below ``through``, that this user
        (and session) may see, oldest first."""

    @abc.abstractmethod
    async def read_all(self, *, after: int, limit: int, until: int | None = None) -> Page:
        """Every event after ``after`` (up to ``until``), whoever it is for: the outbox relay's view."""

    @abc.abstractmethod
    async def identity(self) -> int:
        """A random number that names this store (made once, kept in the store): instances that
        share a broker compare it to tell their own deployment's messages from another's."""

    @abc.abstractmethod
    async def read_ids(self, ids: Sequence[int]) -> list[Event]: ...

    @abc.abstractmethod
    async def head(self) -> int:
        """The highest id given out and committed (0 when none)."""

    @abc.abstractmethod
    async def oldest(self) -> int | None:
        """The lowest id still stored."""

    @abc.abstractmethod
    async def purged_through(self) -> int:
        """Every id at or below this may have been deleted by retention."""

    @abc.abstractmethod
    async def get_meta(self, key: str) -> int: ...

    @abc.abstractmethod
    async def set_meta(self, key: str, value: int, *, only_up: bool = True, durable: bool = True) -> None: ...

    @abc.abstractmethod
    async def idempotency(self, owner: str, key: str) -> IdempotencyRecord | None: ...

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    @abc.abstractmethod
    async def record_failures(self, failures: Sequence[FailedDelivery]) -> None: ...

    @abc.abstractmethod
    async def failures(
        self,
        *,
        ids: Sequence[int] = (),
        user_id: str | None = None,
        since_ms: int | None = None,
        include_resent: bool = False,
        limit: int = 1000,
    ) -> list[FailedDelivery]:
        """Failed deliveries (by event ids, by user, since a time), oldest first."""

    @abc.abstractmethod
    async def count_failures(self, user_id: str | None) -> int:
        """Failed deliveries recorded for this user (None: everyone's) and not yet resent."""

    @abc.abstractmethod
    async def mark_resent(self, failure_ids: Sequence[int], when_ms: int) -> None: ...

    @abc.abstractmethod
    async def count_older(self, cutoff_ms: int) -> int: ...

    @abc.abstractmethod
    async def purge(self, cutoff_ms: int, *, progress: Callable[[int, int], None] | None = None) -> int:
        """Delete events older than ``cutoff_ms``; returns how many."""

    @abc.abstractmethod
    async def size_bytes(self) -> int: ...

    # -- tasks (R3) --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def grant(self, task_id: str, user_id: str) -> TaskState | None:
        """Let ``user_id`` see the task's events committed from now on; None if no such task."""

    @abc.abstractmethod
    async def task(self, task_id: str) -> TaskState | None: ...

    @abc.abstractmethod
    async def silent_tasks(self, *, silent_since_ms: int, limit: int = 1000) -> list[TaskState]:
        """Running tasks with no update since ``silent_since_ms``, with their readers."""

    @abc.abstractmethod
    async def task_snapshot(self, user_id: str, *, through: int | None, limit: int = 100) -> list[Event]:
        """The newest event of each running task ``user_id`` may see, at or below ``through``."""

    # -- metric snapshots (the report's history when there is no Redis) ---------------------------

    @abc.abstractmethod
    async def save_snapshot(self, instance: str, at_ms: int, data: bytes, *, keep_ms: int) -> None:
        """Keep one instance's snapshot; forget every snapshot older than ``keep_ms``."""

    @abc.abstractmethod
    async def snapshots(
        self, *, since_ms: int, instance: str | None = None, limit: int = 100_000
    ) -> list[tuple[str, int, bytes]]:
        """``(instance, at_ms, data)`` from ``since_ms`` on, oldest first."""

    @abc.abstractmethod
    async def maintain(self) -> None:
        """Periodic upkeep (PostgreSQL: day partitions ahead of time)."""


@contextlib.asynccontextmanager
async def _no_lock() -> AsyncIterator[bool]:
    yield True
