"""The retention job (R7.5): every ``retention_interval_s``, keep partitions ahead and purge events
older than ``retention_days`` — earlier, oldest first, while the store is over ``max_store_mb``."""

from __future__ import annotations

import asyncio
import logging

from scribe_events.config import Settings
from scribe_events.events import now_ms
from scribe_events.exceptions import StoreUnavailable
from scribe_events.store import EventStore
from scribe_events.store.retention import DAY_MS, cutoff_for, day_start
from scribe_events.tasks import cancel, supervise

log = logging.getLogger("scribe_events.retention")


class RetentionJob:
    def __init__(self, store: EventStore, settings: Settings) -> None:
        self.store = store
        self.days = settings.retention_days
        self.max_bytes = settings.max_store_mb * 1024 * 1024
        self.interval_s = settings.retention_interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = supervise(self._run, "scribe-retention")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except StoreUnavailable as exc:
                log.error("retention run failed: %s (%s)", exc, exc.__cause__)
            await asyncio.sleep(self.interval_s)

    async def run_once(self) -> int:
        """One pass; returns how many events it deleted."""
        await self.store.maintain()
        now = now_ms()
        deleted = await self.store.purge(cutoff_for(self.days, now))
        if self.max_bytes:
            # Over the size limit: drop the oldest remaining day, one day at a time (never today).
            while await self.store.size_bytes() > self.max_bytes:
                oldest = await self.store.oldest()
                if oldest is None:
                    break
                first = await self.store.read_all(after=oldest - 1, limit=1)
                cutoff = day_start(first[0].time_ms) + DAY_MS if first else now
                if cutoff > day_start(now):
                    break
                n = await self.store.purge(cutoff)
                deleted += n
                log.warning("store over %d MiB: purged %d events before %d", self.max_bytes >> 20, n, cutoff)
                if not n:
                    break
        if deleted:
            log.info("retention purged %d events", deleted)
        return deleted
