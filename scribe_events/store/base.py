"""What the service needs from a store. Ids are integers that rise in commit order."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from scribe_events.events import Event, TypeFilter


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    owner: str
    key: str
    request_hash: str
    ids: tuple[str, ...]


# A claim to save: the record (without ids yet) and the events of that request.
IdempotencyClaim = tuple[IdempotencyRecord, Sequence[Event]]


class EventStore(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and make sure the schema exists."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def append(self, events: Sequence[Event], idempotency: Sequence[IdempotencyClaim] = ()) -> None:
        """Store events (and idempotency records) in one transaction; set each event's ``id``.

        Each idempotency claim is saved with the ids of its request's events (taken once the
        events have theirs), so a retried request answers the same ids.

        Ids must become visible in the order they are given out: a reader that has seen id N
        will never later find a new event with an id below N.
        """

    @abc.abstractmethod
    async def read(
        self,
        *,
        after: int,
        user_id: str,
        session_id: str | None,
        limit: int,
        types: TypeFilter | None = None,
    ) -> list[Event]:
        """Events after ``after`` that this user (and session) may see, oldest first."""

    @abc.abstractmethod
    async def head(self) -> int:
        """The highest id ever given out (0 when none)."""

    @abc.abstractmethod
    async def oldest(self) -> int | None:
        """The lowest id still stored."""

    @abc.abstractmethod
    async def purged_through(self) -> int:
        """Every id at or below this may have been deleted by retention."""

    @abc.abstractmethod
    async def idempotency(self, owner: str, key: str) -> IdempotencyRecord | None: ...

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    def describe(self) -> str:
        """Where the store is, for logs (no password)."""
        return type(self).__name__
