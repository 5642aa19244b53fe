"""The service: publishing with idempotency, resume planning, polling, push mode, failed deliveries
and their resending, retention. Publishing itself is :mod:`scribe_events.publisher`."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scribe_events.auth import Principal
from scribe_events.broker import Broker
from scribe_events.config import Settings
from scribe_events.control import Control
from scribe_events.events import Event, TypeFilter, dumps, now_ms, rfc3339
from scribe_events.exceptions import BadRequest, Conflict, ServiceUnavailable, ValidationFailed
from scribe_events.failures import UNSENDABLE
from scribe_events.metrics import count_families
from scribe_events.publisher import Publisher, settle
from scribe_events.registry import Registry
from scribe_events.state import IDEMPOTENCY_CLAIM_S, SharedState
from scribe_events.store import EventStore, FailedDelivery, IdempotencyRecord
from scribe_events.store.retention import cutoff_for
from scribe_events.tasks import cancel, spawn

log = logging.getLogger("scribe_events.service")

MAX_ID = 2**63 - 1  # the store's ids are signed 64-bit integers
IDEMPOTENCY_WAIT_STEPS = 200  # x 50 ms: how long a retry waits for another instance storing it


@dataclass(slots=True)
class ResumePlan:
    """Where a stream starts: ``after`` is the id to replay from (None: live only)."""

    after: int | None
    truncated: dict[str, Any] | None = None


@dataclass
class EventService:
    settings: Settings
    store: EventStore
    broker: Broker
    publisher: Publisher
    state: SharedState
    control: Control
    registry: Registry
    _inflight: dict[tuple[str, str], tuple[str, asyncio.Future[list[str]]]] = field(default_factory=dict)
    # Events accepted (answered with their ids), by type family (see metrics.py).
    published: dict[str, int] = field(default_factory=dict)

    async def publish(
        self,
        principal: Principal,
        events: list[Event],
        *,
        idempotency_key: str | None = None,
        request_hash: str = "",
    ) -> list[str]:
        if not self.settings.encryption_keys and any(e.sensitive for e in events):
            # Never store a sensitive payload in clear (R7.7).
            raise ValidationFailed(
                "sensitive events are encrypted at rest; set SCRIBE_EVENTS_ENCRYPTION_KEYS on the server",
                field="sensitive",
                code="encryption_not_configured",
            )
        return await self._publish(principal, events, idempotency_key, request_hash)

    async def _submit(self, events: list[Event], claim: IdempotencyRecord | None = None) -> list[str]:
        """Hand new events to the publisher; counted once accepted (an idempotent retry is not)."""
        ids = await self.publisher.submit(events, claim)
        count_families(self.published, (e.type for e in events))
        return ids

    async def _publish(
        self, principal: Principal, events: list[Event], idempotency_key: str | None, request_hash: str
    ) -> list[str]:
        if idempotency_key is None:
            return await self._submit(events)
        slot = (principal.user_id, idempotency_key)
        inflight = self._inflight.get(slot)
        if inflight is not None:
            _check_same(inflight[0], request_hash)
            return list(await asyncio.shield(inflight[1]))
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = (request_hash, fut)
        try:
            ids = await self._publish_once(slot, events, request_hash)
            settle(fut, result=ids)
            return ids
        except BaseException as exc:
            settle(fut, exc=exc)
            raise
        finally:
            self._inflight.pop(slot, None)

    async def _publish_once(self, slot: tuple[str, str], events: list[Event], request_hash: str) -> list[str]:
        """Store a keyed request once, also when its retry arrives at another instance meanwhile."""
        for _ in range(IDEMPOTENCY_WAIT_STEPS):
            record = await self.store.idempotency(*slot)
            if record is not None:
                _check_same(record.request_hash, request_hash)
                return list(record.ids)
            if await self.state.claim(*slot):
                renewing = spawn(self._keep_claim(slot), "scribe-idempotency-claim")
                try:
                    if (record := await self.store.idempotency(*slot)) is not None:
                        _check_same(record.request_hash, request_hash)
                        return list(record.ids)
                    claim = IdempotencyRecord(slot[0], slot[1], request_hash, ())
                    return await self._submit(events, claim)
                finally:
                    await cancel(renewing)
                    await self.state.release(*slot)
            await asyncio.sleep(0.05)  # another instance is storing this very request
        raise Conflict(
            "a request with this Idempotency-Key is still being stored; retry", code="idempotency_busy"
        )

    async def _keep_claim(self, slot: tuple[str, str]) -> None:
        while True:
            await asyncio.sleep(IDEMPOTENCY_CLAIM_S / 3)
            try:
                await self.state.renew(*slot)
            except ServiceUnavailable as exc:  # Redis away: the claim may lapse; the store still answers
                log.warning("could not renew an Idempotency-Key claim: %s", exc)

    async def plan_resume(self, last_event_id: str | None) -> ResumePlan:
        if last_event_id is None:
            return ResumePlan(None)
        after = parse_id(last_event_id)
        head = await self.store.head()
        if after is None or after > head or after < await self.store.purged_through():
            oldest = await self.store.oldest()
            return ResumePlan(
                None,
                {"last_event_id": last_event_id, "oldest_available": None if oldest is None else str(oldest)},
            )
        return ResumePlan(after)

    async def poll(
        self,
        principal: Principal,
        session_id: str | None,
        after: str | None,
        limit: int,
        types: TypeFilter | None,
    ) -> dict[str, Any]:
        mode = self.control.mode_for(principal.user_id)
        body: dict[str, Any] = {"events": [], "mode": mode, "poll_interval_s": self.settings.poll_interval_s}
        head = await self.store.head()
        if after is None:
            body["last_id"] = str(head)
            return body
        after_id = parse_id(after)
        if after_id is None:
            raise BadRequest("'after' must be an event id (a non-negative integer)", code="invalid_after")
        # after=0 pages through everything retained; a later id from before a purge may have gaps.
        if after_id > head or 0 < after_id < await self.store.purged_through():
            body["last_id"] = str(head)
            body["truncated"] = True
            return body
        found = await self.store.read(
            after=after_id, user_id=principal.user_id, session_id=session_id, limit=limit, types=types
        )
        body["events"] = [_Raw(e.envelope()) for e in found]
        if found.full:
            body["last_id"] = str(found.through)
        else:
            # Everything up to the head read before the query is visible now: skip past what this
            # user cannot see, but never past an event the query returned.
            body["last_id"] = str(max(head, after_id, found.through))
        return body

    async def failed(
        self,
        *,
        event_ids: Sequence[int] = (),
        user_id: str | None = None,
        since_ms: int | None = None,
        include_resent: bool = False,
        limit: int = 1000,
    ) -> list[FailedDelivery]:
        return await self.store.failures(
            ids=event_ids, user_id=user_id, since_ms=since_ms, include_resent=include_resent, limit=limit
        )

    async def resend(
        self,
        *,
        event_ids: Sequence[int] = (),
        user_id: str | None = None,
        since_ms: int | None = None,
        dry_run: bool = False,
        limit: int = 1000,
    ) -> tuple[list[FailedDelivery], list[tuple[FailedDelivery, str]]]:
        """Send failed deliveries again to the connections of their user (and session).

        A resent event keeps its envelope id but has no ``id:`` line (clients de-duplicate by
        envelope id). Only a failure whose user (and session) has a live connection somewhere is
        sent and marked resent; the others stay as they are. Returns what was (or, with
        ``dry_run``, would be) resent, and what was not, each with why.
        """
        failures = await self.failed(event_ids=event_ids, user_id=user_id, since_ms=since_ms, limit=limit)
        if not failures:
            return [], []
        skipped: list[tuple[FailedDelivery, str]] = []
        live: dict[tuple[str, str | None], bool] = {}
        candidates = []
        for f in failures:
            if f.reason == UNSENDABLE:
                skipped.append((f, "the event cannot be sent (it cannot be framed)"))
                continue
            key = (f.user_id, f.session_id)
            if key not in live:
                live[key] = bool(await self.registry.list(user_id=f.user_id, session_id=f.session_id))
            if not live[key]:
                skipped.append((f, "no live connection of this user and session"))
                continue
            candidates.append(f)
        if dry_run or not candidates:
            return candidates, skipped
        stored = {e.id: e for e in await self.store.read_ids(sorted({f.event_id for f in candidates}))}
        again, done = [], []
        for f in candidates:
            original = stored.get(f.event_id)
            if original is None:
                skipped.append((f, "the event is no longer stored (purged, or unreadable)"))
                continue
            copy = Event(
                original.type,
                original.data_json,
                user_id=f.user_id,
                session_id=f.session_id,
                task_id=original.task_id,
                novel_id=original.novel_id,
                persist=False,
                time_ms=original.time_ms,
                id=original.id,
            )
            copy.resend = True
            again.append(copy)
            done.append(f)
        if again:
            await self.publisher.submit(again, require_live=True)
            await self.store.mark_resent([f.id for f in done if f.id is not None], now_ms())
        return done, skipped

    async def purge(self, older_than_days: float, *, dry_run: bool = False) -> dict[str, Any]:
        cutoff = cutoff_for(older_than_days, now_ms())
        if dry_run:
            return {
                "dry_run": True,
                "cutoff": rfc3339(cutoff),
                "events": await self.store.count_older(cutoff),
            }
        return {"dry_run": False, "cutoff": rfc3339(cutoff), "events": await self.store.purge(cutoff)}

    def config_for(self, principal: Principal) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": self.control.mode_for(principal.user_id),
            "poll_interval_s": s.poll_interval_s,
            "heartbeat_interval_s": s.heartbeat_s,
            "reconnect": {
                "max_retries": s.reconnect_max_retries,
                "initial_delay_ms": s.reconnect_initial_delay_ms,
                "max_delay_ms": s.reconnect_max_delay_ms,
            },
        }


class _Raw(str):
    """A JSON text to be embedded as is (the envelope is encoded once, never re-parsed)."""


def dump_with_raw(value: Any) -> str:
    """``dumps`` that embeds :class:`_Raw` strings verbatim."""
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{dumps(k)}:{dump_with_raw(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump_with_raw(v) for v in value) + "]"
    return dumps(value)


def parse_id(text: str) -> int | None:
    """A stored event id, or None if ``text`` is not one (``"12"`` yes; ``"012"``, ``"x"`` no)."""
    if not text.isascii() or not text.isdigit() or len(text) > 19 or (len(text) > 1 and text[0] == "0"):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def request_fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _check_same(stored_hash: str, request_hash: str) -> None:
    if stored_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was used with a different request body", code="idempotency_key_reused"
        )
