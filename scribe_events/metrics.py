"""Prometheus metrics. Every name is declared here and starts with ``scribe_events_``.

Values are read from the service's own counters when Prometheus scrapes (a custom collector), so
the hot path never touches a metrics object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from scribe_events.tasks import CRASHES

if TYPE_CHECKING:
    from scribe_events.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

CONNECTIONS = "scribe_events_connections"
DELIVERED = "scribe_events_events_delivered"
STORED = "scribe_events_events_stored"
BATCHES = "scribe_events_store_batches"
CUT_OFF = "scribe_events_connections_cut_off"
FAILED_RECORDED = "scribe_events_failed_deliveries_recorded"
BROKER_UP = "scribe_events_broker_up"
BROKER_RECONNECTS = "scribe_events_broker_reconnects"
OUTBOX_BEHIND = "scribe_events_outbox_behind"
UNSENDABLE = "scribe_events_events_unsendable"
UNREADABLE = "scribe_events_events_unreadable"
FAILURES_GIVEN_UP = "scribe_events_failed_deliveries_given_up"
BROKER_FOREIGN = "scribe_events_broker_foreign_messages"
TASK_CRASHES = "scribe_events_background_task_crashes"


class RuntimeCollector:
    def __init__(self, runtime: Callable[[], Runtime | None]) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self._runtime()
        if rt is None:
            return
        instance = [rt.settings.instance_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["instance"])
            g.add_metric(instance, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["instance"])
            c.add_metric(instance, value)
            return c

        yield gauge(CONNECTIONS, "Open streams on this instance.", len(rt.hub))
        yield counter(DELIVERED, "Events written to streams.", rt.hub.delivered)
        yield counter(CUT_OFF, "Streams cut off (slow client, write error, ban).", rt.hub.cut_off)
        yield counter(STORED, "Important events committed to the store.", rt.publisher.stored)
        yield counter(BATCHES, "Group-commit transactions.", rt.publisher.batches)
        yield counter(FAILED_RECORDED, "Failed deliveries recorded.", rt.recorder.recorded)
        yield gauge(
            BROKER_UP, "1 when the broker (Redis) subscription is up.", float(getattr(rt.broker, "up", True))
        )
        yield counter(
            BROKER_RECONNECTS, "Times the Redis subscription came back.", getattr(rt.broker, "reconnects", 0)
        )
        yield gauge(OUTBOX_BEHIND, "1 while stored events wait for the broker.", float(rt.publisher.behind))
        yield counter(UNSENDABLE, "Events skipped because they cannot be framed.", rt.recorder.unsendable)
        yield counter(
            UNREADABLE,
            "Stored events skipped because they cannot be read (e.g. a removed encryption key).",
            getattr(rt.store, "unreadable", 0),
        )
        yield counter(
            FAILURES_GIVEN_UP,
            "Cut connections whose failed deliveries could not be recorded.",
            rt.recorder.given_up,
        )
        crashes = CounterMetricFamily(
            TASK_CRASHES,
            "Background tasks that ended with an error (supervised ones restart).",
            labels=["instance", "task"],
        )
        for task, n in sorted(CRASHES.items()):
            crashes.add_metric([*instance, task], n)
        yield crashes
        yield counter(
            BROKER_FOREIGN,
            "Broker messages from another deployment sharing Redis, ignored.",
            rt.broker.foreign,
        )


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def make_registry(runtime: Callable[[], Any]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(runtime))  # type: ignore[arg-type]
    return registry
