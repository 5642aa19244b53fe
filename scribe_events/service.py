"""The service: publishing (store, then fan out, in commit order), replay planning, polling, push mode.

Publishing goes through one group-commit loop per instance (:class:`Publisher`): requests queue up
(bounded), the loop takes everything waiting, stores the important events in one transaction, hands
the whole batch to the broker in id order, and only then answers the publishers. A lone event pays
one transaction; many concurrent events share one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from scribe_events.auth import Principal
from scribe_events.broker import Broker
from scribe_events.config import Settings
from scribe_events.events import Event, TypeFilter, dumps
from scribe_events.exceptions import BadRequest, Conflict, StoreUnavailable, ValidationFailed
from scribe_events.hub import Hub
from scribe_events.store import EventStore, IdempotencyRecord

log = logging.getLogger("scribe_events.service")


@dataclass(slots=True)
class _Job:
    events: list[Event]
    claim: IdempotencyRecord | None
    future: asyncio.Future[list[str]]


class Publisher:
    """The group-commit loop: bounded intake, one transaction per batch, ordered fan-out."""

    def __init__(self, store: EventStore, broker: Broker, *, queue_max: int, batch_max: int) -> None:
        self.store = store
        self.broker = broker
        self.batch_max = batch_max
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=queue_max)
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.stored = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scribe-publisher")

    async def close(self) -> None:
        """Stop taking events, finish every one already accepted, then stop."""
        if self._task is None:
            return
        task, self._task = self._task, None
        await self._queue.put(None)
        await task

    async def submit(self, events: list[Event], claim: IdempotencyRecord | None = None) -> list[str]:
        """Queue events; returns their ids once stored (if important) and handed to the broker."""
        if self._task is None:
            raise StoreUnavailable("the service is not accepting events", code="not_ready")
        job = _Job(events, claim, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise StoreUnavailable("too many events are waiting to be stored; retry shortly") from None
        # Shielded: a publisher that hangs up does not cancel work that was accepted.
        return await asyncio.shield(job.future)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            first = await queue.get()
            if first is None:
                return
            jobs = [first]
            size = len(first.events)
            stop = False
            while size < self.batch_max and not queue.empty():
                job = queue.get_nowait()
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                size += len(job.events)
            try:
                await self._commit(jobs)
            except Exception as exc:  # a bug must not stop publishing for good
                log.exception("publishing a batch failed")
                for job in jobs:
                    _settle(job.future, exc=StoreUnavailable(f"publishing failed: {type(exc).__name__}"))
            if stop:
                return

    async def _commit(self, jobs: list[_Job]) -> None:
        events = [e for job in jobs for e in job.events]
        important = [e for e in events if e.persist]
        claims = [(job.claim, job.events) for job in jobs if job.claim is not None]
        try:
            if important or claims:
                await self.store.append(important, claims)
        except StoreUnavailable as exc:
            if len(jobs) > 1:  # one bad job must not fail its neighbours
                for job in jobs:
                    await self._commit([job])
                return
            log.error("store refused %d event(s): %s", len(events), exc)
            _settle(jobs[0].future, exc=exc)
            return
        self.batches += 1
        self.stored += len(important)
        try:
            await self.broker.publish(events)
        except Exception:
            # Stored events stay in the store: clients get them on replay and polling.
            log.exception("broker failed to publish %d event(s)", len(events))
        for job in jobs:
            _settle(job.future, result=[e.wire_id for e in job.events])


def _settle(
    fut: asyncio.Future[list[str]], *, result: list[str] | None = None, exc: BaseException | None = None
) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
        fut.exception()  # retrieved here too, so an abandoned future logs nothing
    else:
        fut.set_result(result or [])


@dataclass(slots=True)
class PushMode:
    """Run-time push mode (R6.6): all users on SSE, all on polling, or a percentage on SSE."""

    mode: Literal["sse", "polling"] = "sse"
    sse_percent: int = 100

    def for_user(self, user_id: str) -> Literal["sse", "polling"]:
        if self.mode == "polling":
            return "polling"
        if self.sse_percent >= 100:
            return "sse"
        return "sse" if zlib.crc32(user_id.encode()) % 100 < self.sse_percent else "polling"


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
    push_mode: PushMode = field(default_factory=PushMode)
    _inflight: dict[tuple[str, str], tuple[str, asyncio.Future[list[str]]]] = field(default_factory=dict)

    async def publish(
        self,
        principal: Principal,
        events: list[Event],
        *,
        idempotency_key: str | None = None,
        request_hash: str = "",
    ) -> list[str]:
        if any(e.sensitive for e in events):
            # Encryption at rest (R7.7) is not built yet: never store a sensitive payload in clear.
            raise ValidationFailed(
                "sensitive events need encryption at rest, which is not configured",
                field="sensitive",
                code="encryption_not_configured",
            )
        if idempotency_key is None:
            return await self.publisher.submit(events)
        slot = (principal.user_id, idempotency_key)
        inflight = self._inflight.get(slot)
        if inflight is not None:
            _check_same(inflight[0], request_hash)
            return list(await asyncio.shield(inflight[1]))
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = (request_hash, fut)
        try:
            record = await self.store.idempotency(*slot)
            if record is not None:
                _check_same(record.request_hash, request_hash)
                ids = list(record.ids)
            else:
                claim = IdempotencyRecord(principal.user_id, idempotency_key, request_hash, ())
                ids = await self.publisher.submit(events, claim)
            _settle(fut, result=ids)
            return ids
        except BaseException as exc:
            _settle(fut, exc=exc)
            raise
        finally:
            self._inflight.pop(slot, None)

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
        mode = self.push_mode.for_user(principal.user_id)
        body: dict[str, Any] = {"events": [], "mode": mode, "poll_interval_s": self.settings.poll_interval_s}
        head = await self.store.head()
        if after is None:
            body["last_id"] = str(head)
            return body
        after_id = parse_id(after)
        if after_id is None:
            raise BadRequest("'after' must be an event id (a non-negative integer)", code="invalid_after")
        if after_id > head or after_id < await self.store.purged_through():
            body["last_id"] = str(head)
            body["truncated"] = True
            return body
        found = await self.store.read(
            after=after_id, user_id=principal.user_id, session_id=session_id, limit=limit, types=types
        )
        body["events"] = [_Raw(e.envelope()) for e in found]
        if len(found) == limit:
            body["last_id"] = found[-1].wire_id
        else:
            body["last_id"] = str(max(head, after_id))
        return body

    async def set_push_mode(self, mode: Literal["sse", "polling"], sse_percent: int, hub: Hub) -> None:
        """Change the push mode and tell every connected user of this instance their mode."""
        self.push_mode = PushMode(mode, sse_percent)
        users = hub.users()
        if not users:
            return
        events = [
            Event(
                "system.push-mode",
                dumps({"mode": self.push_mode.for_user(u), "poll_interval_s": self.settings.poll_interval_s}),
                user_id=u,
                persist=False,
            )
            for u in users
        ]
        await self.publisher.submit(events)

    def config_for(self, principal: Principal) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": self.push_mode.for_user(principal.user_id),
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
    return int(text)


def request_fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _check_same(stored_hash: str, request_hash: str) -> None:
    if stored_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was used with a different request body", code="idempotency_key_reused"
        )
