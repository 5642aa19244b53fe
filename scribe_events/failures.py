"""Failed deliveries (R2.5, R7.3): connections the hub cut off become records of the important events
they did not get, written in the background so the hub's loop never waits on the store.

A cut connection knows the last stored event that fully left its write buffer (``flushed_seq``)
and the newest one dispatched when it was registered (``live_from``); the hub knows the newest
event it dispatched. The stored events after both, up to the hub's newest, that this connection
should have received (its user, session and type filter) are the failed ones: deliveries it was
owed live. A backlog the client asked to replay is not a failed delivery of ours (it resumes with
Last-Event-ID). Each cut is recorded once, at most ``max_per_user`` unresent records are kept
per user, and a cut the store cannot take is retried a few times and then given up (logged,
counted), so one user can neither fill the table nor stop the recording of everyone else's.

Events that cannot be sent at all (framed; e.g. stored by an older version) are recorded too,
once each, with the reason ``unsendable``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from dataclasses import dataclass

from scribe_events.events import Event, TypeFilter, now_ms
from scribe_events.exceptions import ScribeEventsError
from scribe_events.hub import Connection, Hub
from scribe_events.metrics import count_families
from scribe_events.store import EventStore, FailedDelivery
from scribe_events.tasks import cancel, supervise

log = logging.getLogger("scribe_events.failures")

MAX_WAITING = 10_000
MAX_EVENTS_PER_CUT = 1000
MAX_ATTEMPTS = 5  # per cut, a second apart; then it is given up
UNSENDABLE = "unsendable"


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
    attempts: int = 0


class FailureRecorder:
    def __init__(
        self, store: EventStore, hub: Hub, *, max_per_user: int = 1000, retry_s: float = 1.0
    ) -> None:
        self.store = store
        self.retry_s = retry_s
        self.hub = hub
        self.max_per_user = max_per_user
        self._waiting: deque[_Cut | FailedDelivery] = deque(maxlen=MAX_WAITING)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsendable_seen: set[int] = set()
        self.recorded = 0
        self.failed_by: dict[str, int] = {}  # failed deliveries recorded, by type family
        self.unsendable = 0  # events skipped because they cannot be framed
        self.given_up = 0  # cuts dropped after MAX_ATTEMPTS
        hub.on_cut.append(self.on_cut)

    def on_cut(self, conn: Connection, reason: str) -> None:
        after = max(conn.flushed_seq, conn.live_from)  # before live_from: the replay it asked for
        if self.hub.last_seq <= after:
            return  # nothing stored was owed to it
        self._waiting.append(
            _Cut(
                conn.id,
                conn.user_id,
                conn.session_id,
                conn.types,
                after,
                self.hub.last_seq,
                reason,
                now_ms(),
            )
        )
        self._wake.set()

    def on_unsendable(self, event: Event, exc: Exception) -> None:
        """An event that cannot be framed was skipped: count it, and record it once."""
        self.unsendable += 1
        if event.id is None or event.id in self._unsendable_seen or len(self._unsendable_seen) >= MAX_WAITING:
            return
        self._unsendable_seen.add(event.id)
        self._waiting.append(
            FailedDelivery(
                event.id, event.user_id or "*", event.session_id, "-", UNSENDABLE, now_ms(), type=event.type
            )
        )
        self._wake.set()

    def start(self) -> None:
        self._task = supervise(self._run, "scribe-failures")

    async def close(self) -> None:
        """Stop, recording what still waits if the store takes it (a shutdown never fails on it)."""
        await cancel(self._task)
        self._task = None
        try:
            await self.flush()
        except Exception as exc:
            log.error(
                "could not record %d failed-delivery item(s) at shutdown: %s",
                len(self._waiting),
                _describe(exc),
            )

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # the head item is retried (bounded), then given up
                head = self._waiting[0] if self._waiting else None
                if isinstance(head, _Cut) and head.attempts + 1 < MAX_ATTEMPTS:
                    self._waiting[0] = dataclasses.replace(head, attempts=head.attempts + 1)
                    log.error("could not record failed deliveries: %s; retrying", _describe(exc))
                else:
                    if self._waiting:
                        self._waiting.popleft()
                    self.given_up += 1
                    log.error("could not record failed deliveries: %s; gave up on one cut", _describe(exc))
                await asyncio.sleep(self.retry_s)
                self._wake.set()

    async def flush(self) -> None:
        while self._waiting:
            item = self._waiting[0]
            rows = [item] if isinstance(item, FailedDelivery) else await self._missed(item)
            if rows:
                await self.store.record_failures(rows)
            self._waiting.popleft()
            self.recorded += len(rows)
            # (an unsendable event is counted among the drops, not here: no stream was cut)
            count_families(self.failed_by, (r.type or "" for r in rows if r.reason != UNSENDABLE))
            if rows and isinstance(item, _Cut):
                log.warning(
                    "recorded %d failed deliveries for connection %s user=%s reason=%s",
                    len(rows),
                    item.connection_id,
                    item.user_id,
                    item.reason,
                )

    async def _missed(self, cut: _Cut) -> list[FailedDelivery]:
        room = self.max_per_user - await self.store.count_failures(cut.user_id)
        if room <= 0:
            return []
        missed = await self.store.read(
            after=cut.after,
            user_id=cut.user_id,
            session_id=cut.session_id,
            limit=min(room, MAX_EVENTS_PER_CUT),
            types=cut.types,
        )
        return [
            FailedDelivery(
                e.id, cut.user_id, cut.session_id, cut.connection_id, cut.reason, cut.at_ms, type=e.type
            )
            for e in missed
            if e.id is not None and e.id <= cut.upto
        ]


def _describe(exc: Exception) -> str:
    return exc.message if isinstance(exc, ScribeEventsError) else f"{type(exc).__name__}: {exc}"
