"""Adaptive load (R8.6): when the event loop lags or streams' queues fill, send less and store more
at once; when the load drops, go back.

Three levels. At *busy* (loop lag past ``adaptive_busy_lag_s``, or a twentieth of the streams with
a queue) the progress throttle and the coalescing window double and store batches may be twice as
large; at *overloaded* (lag past ``adaptive_overload_lag_s``, or a fifth of the streams queued) they
are five and four times their settings. What widens is only what may be coalesced: every
progress update still ends in its latest value, every chapter in a coalesced event, and nothing
stored is dropped. A level goes up at once and down one step after ``CALM_PROBES`` calm readings
in a row (5 s), so it does not flap. Each change is logged and shown in the metrics.
"""

from __future__ import annotations

import logging

from scribe_events.config import Settings
from scribe_events.hub import Hub
from scribe_events.live_tasks import LiveTasks
from scribe_events.publisher import Publisher

log = logging.getLogger("scribe_events.adaptive")

NORMAL, BUSY, OVERLOADED = 0, 1, 2
NAMES = ("normal", "busy", "overloaded")
WINDOW_FACTOR = (1, 2, 5)  # the throttle and coalescing windows
BATCH_FACTOR = (1, 2, 4)  # the largest store batch
QUEUED_SHARE = (0.05, 0.2)  # of the streams with a queue: busy, overloaded
CALM_PROBES = 20  # probes (0.25 s each) below a level before stepping down


class AdaptiveLoad:
    def __init__(self, settings: Settings, hub: Hub, live: LiveTasks, publisher: Publisher) -> None:
        self.enabled = settings.adaptive_load
        self.busy_lag_s = settings.adaptive_busy_lag_s
        self.overload_lag_s = settings.adaptive_overload_lag_s
        self.hub = hub
        self.live = live
        self.publisher = publisher
        self.base = (live.throttle_s, live.coalesce_s, publisher.batch_max)
        self.level = NORMAL
        self.changes = 0
        self._calm = 0

    def queued_share(self) -> float:
        streams = len(self.hub)
        if not streams:
            return 0.0
        return sum(1 for c in self.hub.connections.values() if c.backlog is not None) / streams

    def observe(self, lag_s: float) -> None:
        """One reading of the loop's lag (the monitor's probe); the streams' queues are read here."""
        if not self.enabled:
            return
        queued = self.queued_share()
        if lag_s >= self.overload_lag_s or queued >= QUEUED_SHARE[1]:
            wanted = OVERLOADED
        elif lag_s >= self.busy_lag_s or queued >= QUEUED_SHARE[0]:
            wanted = BUSY
        else:
            wanted = NORMAL
        if wanted > self.level:
            self._calm = 0
            self._set(wanted, lag_s, queued)
        elif wanted < self.level:
            self._calm += 1
            if self._calm >= CALM_PROBES:
                self._calm = 0
                self._set(self.level - 1, lag_s, queued)
        else:
            self._calm = 0

    def _set(self, level: int, lag_s: float, queued: float) -> None:
        throttle, coalesce, batch = self.base
        self.live.throttle_s = throttle * WINDOW_FACTOR[level]  # 0 (off) stays off
        self.live.coalesce_s = coalesce * WINDOW_FACTOR[level]
        self.live.widest_coalesce_s = max(self.live.widest_coalesce_s, self.live.coalesce_s)
        self.publisher.batch_max = batch * BATCH_FACTOR[level]
        was, self.level = self.level, level
        self.changes += 1
        log.warning(
            "load %s -> %s (event-loop lag %.0f ms, %.0f%% of streams queued): progress throttle %g s, "
            "coalescing %g s, store batches up to %d",
            NAMES[was],
            NAMES[level],
            lag_s * 1000,
            queued * 100,
            self.live.throttle_s,
            self.live.coalesce_s,
            self.publisher.batch_max,
        )
