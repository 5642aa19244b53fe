"""What an instance watches about itself: event-loop lag, the process's resources, its costs, the
thresholds (R8.2, R8.3, R8.4), and the history of metric snapshots behind ``scribe-events report``.

Two background tasks: a probe that sleeps 0.25 s and measures how late it woke (the loop's lag),
and a tick every ``history_interval_s`` that samples every metric, checks the thresholds against
the interval just past, works out the measured costs, and saves the snapshot to the history.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from scribe_events import metrics
from scribe_events.adaptive import AdaptiveLoad
from scribe_events.config import Settings
from scribe_events.exceptions import ScribeEventsError
from scribe_events.history import History
from scribe_events.hub import Hub
from scribe_events.metrics import quantile, samples
from scribe_events.tasks import cancel, spawn, supervise

log = logging.getLogger("scribe_events.monitor")

PROBE_S = 0.25
# The p99 of an interval counts only with this many events written in it; it clears (hysteresis)
# once back under CLEAR_BELOW of its limit, and a threshold notifies at most every NOTIFY_EVERY_S.
MIN_P99_EVENTS = 20
CLEAR_BELOW = 0.8
NOTIFY_EVERY_S = 600.0
NOTIFY_TIMEOUT_S = 10.0
CONNECTIONS = "connections"
P99_LATENCY = "p99_latency"
# Notify: (title, message) -> sent to the users in alert_notify_users as a system.notification.
Notify = Callable[[str, str], Awaitable[None]]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, where /proc is absent


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class Monitor:
    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        registry: CollectorRegistry,
        history: History,
        notify: Notify | None = None,
        adaptive: AdaptiveLoad | None = None,
    ) -> None:
        self.adaptive = adaptive
        self.settings = settings
        self.hub = hub
        self.registry = registry
        self.history = history
        self.notify = notify
        self.started = time.time()
        self.rss_at_start = rss_bytes()
        # Event-loop lag: the largest seen in the current and in the previous interval.
        self._lag_now = 0.0
        self._lag_before = 0.0
        self.limits = {
            CONNECTIONS: float(settings.alert_connections),
            P99_LATENCY: settings.alert_p99_latency_s,
        }
        self.exceeded = dict.fromkeys(self.limits, False)
        self.crossed: Counter[str] = Counter()
        self._notified_at: dict[str, float] = {}
        self._peak: tuple[int, int] = (0, 0)  # (streams, memory gained) at the most streams seen
        self.p99 = 0.0  # publish-to-write p99 of the last interval (0: nothing written)
        self.cpu_per_event = 0.0
        self.history_failures = 0
        self.history_ok = True  # the last snapshot was kept
        self._last: tuple[float, float, int, list[int]] | None = None  # at, cpu, delivered, latency counts
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def loop_lag(self) -> float:
        return max(self._lag_now, self._lag_before)

    def start(self) -> None:
        self._last = self._reading()
        self._tasks = [
            supervise(self._probe, "scribe-loop-probe"),
            supervise(self._tick_forever, "scribe-monitor"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            await cancel(task)
        self._tasks = []

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(PROBE_S)
            lag = loop.time() - start - PROBE_S
            if lag > self._lag_now:
                self._lag_now = lag
            if self.adaptive is not None:
                self.adaptive.observe(lag)

    async def _tick_forever(self) -> None:
        interval = self.settings.history_interval_s
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval
        await self.tick()  # one at start-up: the history shows the instance from its start
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            # A loop that was stuck does not catch up with a burst of ticks (each would rotate
            # the lag it just saw away): the next one is an interval from now.
            next_at = max(next_at + interval, loop.time() + interval / 2)
            await self.tick()

    def _reading(self) -> tuple[float, float, int, list[int]]:
        return time.time(), time.process_time(), self.hub.delivered, list(self.hub.latency.counts)

    async def tick(self) -> dict[str, Any]:
        """One interval ends: costs and thresholds from what it saw, then a snapshot to the history."""
        now = self._reading()
        if self._last is not None:
            _, cpu, delivered, counts = self._last
            written = [a - b for a, b in zip(now[3], counts, strict=True)]
            if sum(written) >= MIN_P99_EVENTS:
                self.p99 = quantile(self.hub.latency.bounds, written, 0.99)
            elif not sum(written):
                self.p99 = 0.0  # nothing written, nothing late; a few writes say nothing either way
            if (events := now[2] - delivered) > 0:  # an idle interval keeps the last measured cost
                self.cpu_per_event = (now[1] - cpu) / events
        self._last = now
        self._check(CONNECTIONS, float(len(self.hub)), f"{len(self.hub)} open streams")
        self._check(P99_LATENCY, self.p99, f"p99 publish-to-write latency about {self.p99 * 1000:.0f} ms")
        self._note_peak()
        snapshot = {"instance": self.settings.instance_id, "at": now[0], "metrics": samples(self.registry)}
        self._lag_before, self._lag_now = self._lag_now, 0.0
        try:
            await self.history.save(snapshot)
            self.history_ok = True
        except ScribeEventsError as exc:
            self.history_ok = False
            self.history_failures += 1
            log.warning("could not keep a metric snapshot: %s", exc.message)
        return snapshot

    def _check(self, name: str, value: float, shown: str) -> None:
        limit = self.limits[name]
        was = self.exceeded[name]
        over = value > limit if not was else value >= limit * CLEAR_BELOW
        if over == was:
            return
        self.exceeded[name] = over
        if not over:
            log.info("threshold %s: back below its limit (%s)", name, shown)
            return
        self.crossed[name] += 1
        setting = "SCRIBE_EVENTS_ALERT_" + ("CONNECTIONS" if name == CONNECTIONS else "P99_LATENCY_S")
        message = f"{shown} on instance {self.settings.instance_id}: above {setting}={limit:g}"
        log.warning("threshold %s crossed: %s", name, message)
        now = time.monotonic()
        if self.notify is None or not self.settings.alert_notify_users:
            return
        if now - self._notified_at.get(name, -NOTIFY_EVERY_S) < NOTIFY_EVERY_S:
            return  # told lately: the log and the metric say the rest
        self._notified_at[name] = now
        spawn(self._send(name, message), "scribe-threshold-notify")  # the tick never waits on the store

    async def _send(self, name: str, message: str) -> None:
        assert self.notify is not None
        try:
            await asyncio.wait_for(
                self.notify(f"scribe-events: {name} threshold crossed", message), NOTIFY_TIMEOUT_S
            )
        except Exception as exc:  # an alert that cannot be sent must not stop anything
            log.warning("could not notify about the %s threshold: %s", name, exc)

    def _note_peak(self) -> tuple[int, int]:
        """(streams, memory gained since start-up) at the most streams seen so far."""
        if (streams := len(self.hub)) >= self._peak[0]:
            self._peak = (streams, max(0, rss_bytes() - self.rss_at_start))
        return self._peak

    def collect(self, instance: list[str]) -> Iterator[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return metrics.gauge(name, doc, instance, value)

        yield metrics.counter(
            "scribe_events_process_cpu_seconds",
            "CPU time of the process (user and system).",
            instance,
            time.process_time(),
        )
        rss = rss_bytes()
        yield gauge("scribe_events_process_resident_memory_bytes", "Resident memory of the process.", rss)
        yield gauge("scribe_events_process_open_fds", "Open file descriptors.", open_fds())
        yield gauge(
            "scribe_events_process_max_fds",
            "The limit of open file descriptors.",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        yield gauge(
            "scribe_events_up_seconds", "Seconds since the instance started.", time.time() - self.started
        )
        yield gauge(
            "scribe_events_event_loop_lag_seconds",
            f"The largest event-loop lag seen in the last interval (a {PROBE_S:g} s probe).",
            self.loop_lag,
        )
        peak, gained = self._note_peak()
        yield gauge(
            "scribe_events_cost_memory_bytes_per_connection",
            "Measured: resident memory gained since start-up, per stream, when the most streams were "
            "open (0 before any).",
            gained / peak if peak else 0.0,
        )
        yield gauge(
            "scribe_events_cost_cpu_seconds_per_delivered_event",
            "Measured over the last history interval: CPU seconds per event written to a stream.",
            self.cpu_per_event,
        )
        exceeded = GaugeMetricFamily(
            "scribe_events_threshold_exceeded", "1 while over a threshold.", labels=["instance", "threshold"]
        )
        limits = GaugeMetricFamily(
            "scribe_events_threshold_limit",
            "A threshold's limit (connections: streams; p99_latency: seconds).",
            labels=["instance", "threshold"],
        )
        crossed = CounterMetricFamily(
            "scribe_events_thresholds_crossed",
            "Times a threshold went from below to above.",
            labels=["instance", "threshold"],
        )
        for name, limit in self.limits.items():
            exceeded.add_metric([*instance, name], float(self.exceeded[name]))
            limits.add_metric([*instance, name], limit)
            crossed.add_metric([*instance, name], self.crossed[name])
        yield exceeded
        yield limits
        yield crossed
        if self.adaptive is not None:
            a = self.adaptive
            yield gauge("scribe_events_load_level", "Adaptive load: 0 normal, 1 busy, 2 overloaded.", a.level)
            yield metrics.counter(
                "scribe_events_load_level_changes", "Adaptive load level changes.", instance, a.changes
            )
            yield gauge(
                "scribe_events_progress_throttle_seconds",
                "The progress throttle in force.",
                a.live.throttle_s,
            )
            yield gauge(
                "scribe_events_coalesce_window_seconds", "The coalescing window in force.", a.live.coalesce_s
            )
            yield gauge(
                "scribe_events_store_batch_max_events",
                "The largest store batch in force.",
                a.publisher.batch_max,
            )
