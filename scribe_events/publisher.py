"""The publishing pipeline: group commit, then fan-out in commit order, as a transactional outbox.

One task per instance (:class:`Publisher`) takes every waiting publish request (the intake queue is
bounded), stores the important events of all of them in one transaction, and hands the whole batch
to the broker in id order; only then are the publishers answered. A lone event pays one
transaction; many concurrent events share one (R7.6).

The outbox: every stored event is either published or after the ``published_through`` watermark.
The watermark advances as batches are handed to the broker and is saved at most once a second (and
on shutdown). If the broker fails, or the process dies between commit and publish, the relay —
the same task, at start-up and whenever it is behind — publishes every stored event after the
watermark, in id order, before anything newer (R7.4). A re-published event reaches clients that
already had it only as a duplicate id, which they (and the hub) drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from scribe_events.broker import Broker
from scribe_events.events import Event
from scribe_events.exceptions import (
    BrokerUnavailable,
    NotReady,
    ServiceUnavailable,
    ShuttingDown,
    StoreRejected,
    StoreUnavailable,
)
from scribe_events.metrics import BATCH_BUCKETS, Histogram, count_families
from scribe_events.store import EventStore, IdempotencyRecord
from scribe_events.tasks import cancel, supervise

log = logging.getLogger("scribe_events.publisher")

WATERMARK = "published_through"
RELAY_PAGE = 1000
# The "pause_before_commit" and "pause_after_commit" faults (tests: what the publish lock orders).
PAUSE_BEFORE_COMMIT_S = 0.5
PAUSE_AFTER_COMMIT_S = 1.0
CLOSE_TIMEOUT_S = 30.0  # finishing accepted events at shutdown; then they are answered 503


@dataclass(slots=True)
class _Job:
    events: list[Event]
    claim: IdempotencyRecord | None
    future: asyncio.Future[list[str]]
    require_live: bool = False  # fail the job if its live-only events could not be sent
    size: int = 0  # bytes of event data, counted against the queue's byte bound


class Publisher:
    def __init__(
        self,
        store: EventStore,
        broker: Broker,
        *,
        queue_max: int,
        batch_max: int,
        queue_bytes: int = 64 * 1024 * 1024,
        flush_every_s: float = 1.0,
        faults: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.broker = broker
        self.batch_max = batch_max
        self.flush_every_s = flush_every_s
        self.faults = faults
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=queue_max)
        self.queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self.published_through = 0
        self._saved_through = 0
        self._saved_at = 0.0
        self.behind = False  # stored events wait for the relay
        self.batches = 0
        self.stored = 0
        self.stored_by: dict[str, int] = {}  # by type family
        self.commit_seconds = Histogram()
        self.batch_events = Histogram(BATCH_BUCKETS)
        self.queued_events = 0
        self._storing: list[_Job] = []  # the batch being stored now

    async def start(self) -> None:
        """Load the watermark and relay whatever was committed but never published, then start."""
        self.published_through = self._saved_through = await self.store.get_meta(WATERMARK)
        async with self._ordered():
            self.behind = True
            await self._relay()
            await self._save_watermark()
        self._task = supervise(self._run, "scribe-publisher")

    async def close(self) -> None:
        """Stop taking events, finish every one already accepted, save the watermark."""
        if self._task is None:
            return
        task, self._task = self._task, None
        await self._queue.put(None)
        try:
            await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.error("publishing did not finish within %.0f s; answering what is left 503", CLOSE_TIMEOUT_S)
            await cancel(task)
            for cut in self._storing:  # cut off mid-batch: maybe stored, maybe not
                settle(
                    cut.future,
                    exc=ShuttingDown(
                        "the server stopped while storing this; it may have been stored: "
                        "retry with the same Idempotency-Key"
                    ),
                )
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if job is not None:
                    settle(job.future, exc=ShuttingDown("the server stopped before storing this; retry"))
        try:
            await self._save_watermark()
        except ServiceUnavailable as exc:
            log.warning("could not save the outbox watermark: %s (the relay will redo it)", exc)

    async def submit(
        self, events: list[Event], claim: IdempotencyRecord | None = None, *, require_live: bool = False
    ) -> list[str]:
        """Queue events; returns their ids once stored (if important) and handed to the broker.

        With ``require_live``, live-only events that could not be handed to the broker fail the call.
        """
        if self._task is None:
            raise NotReady("the service is not accepting events")
        size = sum(len(e.data_json) for e in events)
        if self._queued_bytes + size > self.queue_bytes:
            raise StoreUnavailable(
                "too many event bytes are waiting to be stored; retry shortly", reason="publish_queue_bytes"
            )
        job = _Job(events, claim, asyncio.get_running_loop().create_future(), require_live, size)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise StoreUnavailable(
                "too many events are waiting to be stored; retry shortly", reason="publish_queue"
            ) from None
        self._queued_bytes += size
        self.queued_events += len(events)
        # Shielded: a publisher that hangs up does not cancel work that was accepted.
        return await asyncio.shield(job.future)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), self.flush_every_s)
            except TimeoutError:
                await self._idle()
                continue
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
            self._queued_bytes -= sum(job.size for job in jobs)
            self.queued_events -= size
            self._storing = jobs
            try:
                await self._commit(jobs)
            except Exception as exc:  # a bug must not stop publishing for good
                log.exception("publishing a batch failed")
                for job in jobs:
                    settle(job.future, exc=StoreUnavailable(f"publishing failed: {type(exc).__name__}"))
            if stop:
                return

    async def _idle(self) -> None:
        try:
            if self.broker.shared:
                # Any instance relays what another committed but never published (it died, or
                # Redis failed): whoever gets the lock while idle checks the global watermark.
                async with self.store.publish_lock(wait=False) as held:
                    if held:
                        await self._sync_shared_watermark()
                        await self._save_watermark()
                return
            if self.behind:
                await self._relay()
            await self._save_watermark()
        except Exception:
            log.exception("outbox upkeep failed; retrying")

    def _ordered(self) -> contextlib.AbstractAsyncContextManager[bool]:
        """With a shared broker, hold the store's publish lock from COMMIT through PUBLISH."""
        return self.store.publish_lock() if self.broker.shared else contextlib.nullcontext(True)

    async def _sync_shared_watermark(self) -> None:
        watermark = await self.store.get_meta(WATERMARK)
        if watermark > self.published_through:
            self.published_through = self._saved_through = watermark
        self.behind = True  # let the relay look for committed events nobody published
        await self._relay()

    async def _commit(self, jobs: list[_Job]) -> None:
        events = [e for job in jobs for e in job.events]
        important = [e for e in events if e.persist]
        live_tasks = [e for e in events if e.for_task and not e.persist]  # their readers: resolved now
        claims = [(job.claim, job.events) for job in jobs if job.claim is not None]
        refused: ServiceUnavailable | StoreRejected | None = None
        committed = False
        live_sent = True
        try:
            async with self._ordered():
                if self.broker.shared:
                    await self._quietly(self._sync_shared_watermark())
                try:
                    if "pause_before_commit" in self.faults and important:
                        await asyncio.sleep(PAUSE_BEFORE_COMMIT_S)  # fault injection: a slow commit
                    if important or claims or live_tasks:
                        started = time.perf_counter()
                        await self.store.append(important, claims, live_tasks)
                        self.commit_seconds.observe(time.perf_counter() - started)
                        if important:
                            self.batch_events.observe(len(important))
                except (ServiceUnavailable, StoreRejected) as exc:
                    refused = exc
                else:
                    committed = True
                    self.batches += 1
                    self.stored += len(important)
                    count_families(self.stored_by, (e.type for e in important))
                    if "kill_after_commit" in self.faults and important:
                        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: between commit and publish
                    if "pause_after_commit" in self.faults and important:
                        await asyncio.sleep(PAUSE_AFTER_COMMIT_S)  # fault injection: a slow publish
                    # From here on the events are stored: whatever fails, publishers get their ids.
                    live_sent = await self._publish(events)
                    if self.broker.shared:
                        await self._quietly(self._save_watermark())
        except ServiceUnavailable as exc:  # taking or releasing the publish lock
            if committed:
                log.warning("the publish lock failed after COMMIT: %s", exc)
            else:
                refused = refused or exc
        if refused is not None:
            if len(jobs) > 1 and isinstance(refused, StoreRejected):  # one bad job must not fail the others
                for job in jobs:
                    await self._commit([job])
                return
            log.error("store refused %d event(s): %s", len(events), refused)
            for job in jobs:
                settle(job.future, exc=refused)
            return
        if not self.broker.shared and self._loop_time() - self._saved_at >= self.flush_every_s:
            await self._quietly(self._save_watermark())
        for job in jobs:
            if job.require_live and not live_sent:
                settle(job.future, exc=BrokerUnavailable("the broker is unavailable; nothing was sent"))
            else:
                settle(job.future, result=[e.wire_id for e in job.events])

    async def _quietly(self, coro: Coroutine[Any, Any, None]) -> None:
        """Outbox upkeep that may fail without failing publishers (the relay redoes it)."""
        try:
            await coro
        except Exception as exc:
            log.warning("outbox upkeep failed: %s", exc)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def _publish(self, events: list[Event]) -> bool:
        """Hand events to the broker; True if the live-only ones among them were sent."""
        live = [e for e in events if not e.persist]
        try:
            if self.behind:
                # Older stored events go first; this batch's stored events are among them.
                await self._relay()
                if live and not self.behind:
                    return await self._to_broker(live)
                return not live
            return await self._to_broker(events)
        except Exception as exc:
            log.warning("publishing failed: %s; the relay will retry stored events", exc)
            self.behind = True
            return not live

    async def _to_broker(self, events: list[Event]) -> bool:
        try:
            await self.broker.publish(events)
        except Exception as exc:
            log.error("the broker failed to publish %d event(s): %s; the relay will retry", len(events), exc)
            self.behind = True
            return False
        ids = [e.id for e in events if e.persist and e.id is not None]
        if ids:
            self.published_through = max(self.published_through, max(ids))
        return True

    async def _relay(self) -> None:
        """Publish every stored event after the watermark, in id order, until caught up."""
        while self.behind:
            if not await self.broker.ready():
                return  # stored events wait; the relay tries again once the broker is back
            page = await self.store.read_all(after=self.published_through, limit=RELAY_PAGE)
            if page:
                log.info("relaying %d stored event(s) after id %d", len(page), self.published_through)
                if not await self._to_broker(page):
                    return  # the broker is still failing
            # Past what was scanned, also rows that could not be read (skipped, counted by the store).
            self.published_through = max(self.published_through, page.through)
            if not page.full:
                self.behind = False
                return

    async def _save_watermark(self) -> None:
        self._saved_at = self._loop_time()
        if self.published_through > self._saved_through:
            # A hint for the relay: lost in a crash, it only makes the relay redo a little.
            await self.store.set_meta(WATERMARK, self.published_through, durable=False)
            self._saved_through = self.published_through


def settle(
    fut: asyncio.Future[list[str]], *, result: list[str] | None = None, exc: BaseException | None = None
) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
        fut.exception()  # retrieved here too, so an abandoned future logs nothing
    else:
        fut.set_result(result or [])
