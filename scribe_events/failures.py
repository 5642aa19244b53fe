"""Failed deliveries (R2.5, R7.3): connections the hub cut off become records of the important events
they did not get, written in the background so the hub's loop never waits on the store.

A cut connection knows the last stored event that fully left its write buffer (``flushed_seq``);
the hub knows the newest event it dispatched. The stored events between the two that this
connection should have received (its user, session and type filter) are the failed ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from scribe_events.events import TypeFilter, now_ms
from scribe_events.exceptions import StoreUnavailable
from scribe_events.hub import Connection, Hub
from scribe_events.store import EventStore, FailedDelivery
from scribe_events.tasks import cancel, spawn

log = logging.getLogger("scribe_events.failures")

MAX_WAITING = 10_000
MAX_EVENTS_PER_CUT = 1000


@dataclass(frozen=True, slots=True)
class _Cut:
    connection_id: str
    user_id: str
    session_id: str | None
    types: TypeFilter | None
    after: int
    upto: int
    reason: str
    at_ms: int


class FailureRecorder:
    def __init__(self, store: EventStore, hub: Hub) -> None:
        self.store = store
        self.hub = hub
        self._waiting: deque[_Cut] = deque(maxlen=MAX_WAITING)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.recorded = 0
        hub.on_cut.append(self.on_cut)

    def on_cut(self, conn: Connection, reason: str) -> None:
        if self.hub.last_seq <= conn.flushed_seq:
            return  # nothing stored was pending for it
        self._waiting.append(
            _Cut(
                conn.id,
                conn.user_id,
                conn.session_id,
                conn.types,
                conn.flushed_seq,
                self.hub.last_seq,
                reason,
                now_ms(),
            )
        )
        self._wake.set()

    def start(self) -> None:
        self._task = spawn(self._run(), "scribe-failures")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except StoreUnavailable as exc:
                log.error("could not record failed deliveries: %s; retrying", exc)
                await asyncio.sleep(1)
                self._wake.set()

    async def flush(self) -> None:
        while self._waiting:
            cut = self._waiting[0]
            missed = await self.store.read(
                after=cut.after,
                user_id=cut.user_id,
                session_id=cut.session_id,
                limit=MAX_EVENTS_PER_CUT,
                types=cut.types,
            )
            rows = [
                FailedDelivery(e.id, cut.user_id, cut.session_id, cut.connection_id, cut.reason, cut.at_ms)
                for e in missed
                if e.id is not None and e.id <= cut.upto
            ]
            await self.store.record_failures(rows)
            self._waiting.popleft()
            self.recorded += len(rows)
            if rows:
                log.warning(
                    "recorded %d failed deliveries for connection %s user=%s reason=%s",
                    len(rows),
                    cut.connection_id,
                    cut.user_id,
                    cut.reason,
                )
