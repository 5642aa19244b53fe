"""Prometheus metrics. Every name is declared here and starts with ``scribe_events_``.

The service's parts count in plain integers, dicts and :class:`Histogram` (a list of bucket counts),
and this module reads them when Prometheus scrapes (a custom collector): the hot path never takes a
lock or touches a metrics object. The same samples, taken every ``history_interval_s``, are the
history that ``scribe-events report`` reads (see :mod:`scribe_events.monitor`).
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from scribe_events.constants import pool_size
from scribe_events.tasks import CRASHES

if TYPE_CHECKING:
    from scribe_events.exceptions import ScribeEventsError
    from scribe_events.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds, for every latency histogram: 1 ms to 10 s.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

# The ``family`` label: the built-in namespaces, and "custom" for every other type (so a
# publisher's type names can never multiply the series).
FAMILIES = frozenset({"task", "content", "workflow", "system"})
ALL_FAMILIES = (*sorted(FAMILIES), "custom")
_family_cache: dict[str, str] = {}
# Sockets the protocol answered and closed before any route saw them, by reason (process-wide,
# like the crash counts: the protocol knows no runtime).
REJECTED: Counter[str] = Counter()
REJECTED_REASONS = ("too_many_connections", "headers_too_large", "request_timeout")
# The reasons of 5xx answers that exist from the start (so that their rates do).
UNAVAILABLE_REASONS = (
    "store_unavailable",
    "publish_queue",
    "publish_queue_bytes",
    "broker_unavailable",
    "shutting_down",
    "not_ready",
)


def family_of(type_: str) -> str:
    family = _family_cache.get(type_)
    if family is None:
        head = type_.partition(".")[0]
        family = head if head in FAMILIES else "custom"
        if len(_family_cache) < 4096:
            _family_cache[type_] = family
    return family


def count_family(counts: dict[str, int], type_: str, n: int = 1) -> None:
    family = family_of(type_)
    counts[family] = counts.get(family, 0) + n


def count_families(counts: dict[str, int], types: Iterable[str]) -> None:
    for type_ in types:
        count_family(counts, type_)


def gauge(name: str, doc: str, instance: list[str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["instance"])
    g.add_metric(instance, value)
    return g


def counter(name: str, doc: str, instance: list[str], value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["instance"])
    c.add_metric(instance, value)
    return c


class Histogram:
    """Bucket counts and a sum, for the hot path: ``observe`` is a bisect and two additions.
    ``counts[i]`` holds the observations in bucket i alone (the last one: above every bound)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = TIME_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, doc: str, instance: list[str]) -> HistogramMetricFamily:
        buckets, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else _number(bound), total))
        h = HistogramMetricFamily(name, doc, labels=["instance"])
        h.add_metric(instance, buckets, self.sum)
        return h


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float:
    """The ``q`` quantile of bucket counts (``counts[i]``: observations in bucket i alone, the last
    one above every bound), interpolated inside its bucket as Prometheus' histogram_quantile does;
    past the last bound, that bound."""
    total = sum(counts)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if seen + n >= rank and n:
            if i == len(bounds):
                return bounds[-1]
            low = bounds[i - 1] if i else 0.0
            return low + (bounds[i] - low) * (rank - seen) / n
        seen += n
    return bounds[-1]


class RequestStats:
    """What the HTTP side counts: responses by status, and refusals by kind."""

    __slots__ = ("auth_failures", "banned", "rate_limited", "responses", "unavailable")

    def __init__(self) -> None:
        self.responses: Counter[int] = Counter()
        self.auth_failures: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.unavailable: Counter[str] = Counter()
        self.banned = 0

    def refused(self, exc: ScribeEventsError) -> None:
        """Count an error answer by what it says about the caller."""
        if exc.code == "banned":
            self.banned += 1
        elif exc.status == 429:
            self.rate_limited[exc.reason] += 1
        elif exc.status in (401, 403):
            self.auth_failures[exc.reason] += 1
        elif exc.status >= 500:
            self.unavailable[exc.reason] += 1


class RuntimeCollector:
    def __init__(self, runtime: Callable[[], Runtime | None]) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self._runtime()
        if rt is None:
            return
        instance = [rt.settings.instance_id]
        hub, publisher, live, broker, recorder, monitor = (
            rt.hub,
            rt.publisher,
            rt.live,
            rt.broker,
            rt.recorder,
            rt.monitor,
        )
        requests = rt.requests

        def gauge_(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return gauge(name, doc, instance, value)

        def counter_(name: str, doc: str, value: float) -> CounterMetricFamily:
            return counter(name, doc, instance, value)

        def by(name: str, doc: str, label: str, values: dict[Any, int]) -> Metric:
            m = CounterMetricFamily(name, doc, labels=["instance", label])
            if label == "family":  # every family has a series from the start, so rates exist at once
                values = {**dict.fromkeys(ALL_FAMILIES, 0), **values}
            for key, n in sorted(values.items(), key=lambda kv: str(kv[0])):
                m.add_metric([*instance, str(key)], n)
            return m

        # -- connections
        queued = [c.backlog.bytes for c in hub.connections.values() if c.backlog is not None]
        yield gauge_("scribe_events_connections", "Open streams on this instance.", len(hub))
        yield counter_("scribe_events_connections_opened", "Streams opened.", hub.opened)
        yield by("scribe_events_connections_closed", "Streams ended, by reason.", "reason", hub.closed)
        yield by(
            "scribe_events_connections_cut_off",
            "Streams cut off by the server (slow client, write error, ban), by reason.",
            "reason",
            hub.cut_by,
        )
        yield gauge_(
            "scribe_events_connections_queued", "Streams whose own queue holds deliveries.", len(queued)
        )
        yield gauge_(
            "scribe_events_connection_queue_bytes", "Bytes waiting in all streams' own queues.", sum(queued)
        )
        yield gauge_(
            "scribe_events_connection_queue_max_bytes",
            "Bytes waiting in the fullest stream's own queue.",
            max(queued, default=0),
        )
        yield counter_("scribe_events_replays", "Streams that replayed missed events.", hub.replays)
        yield counter_("scribe_events_replayed_events", "Events written by replays.", hub.replayed)

        # -- events
        yield by(
            "scribe_events_events_published",
            "Events accepted by this instance's publish API, by type family.",
            "family",
            rt.service.published,
        )
        yield by(
            "scribe_events_events_stored",
            "Important events committed to the store by this instance, by type family.",
            "family",
            publisher.stored_by,
        )
        yield by(
            "scribe_events_events_delivered",
            "Events written to live streams (one per event and stream), by type family.",
            "family",
            hub.delivered_by,
        )
        yield by(
            "scribe_events_events_failed",
            "Failed deliveries recorded (events owed to a stream that was cut), by type family.",
            "family",
            recorder.failed_by,
        )
        yield by(
            "scribe_events_events_dropped",
            "Events not sent: unsendable (cannot be framed), unreadable (cannot be decrypted), "
            "replaced (an older progress update in a slow stream's queue).",
            "reason",
            {
                "unsendable": recorder.unsendable,
                "unreadable": getattr(rt.store, "unreadable", 0),
                "replaced": hub.replaced,
            },
        )
        yield counter_(
            "scribe_events_events_throttled",
            "Progress updates held back and replaced by a newer one.",
            live.throttled,
        )
        yield counter_(
            "scribe_events_events_coalesced", "Chapter updates folded into another event.", live.coalesced
        )
        yield counter_(
            "scribe_events_task_heartbeats", "task.progress-heartbeat events sent.", live.heartbeats
        )
        yield hub.latency.family(
            "scribe_events_publish_to_write_seconds",
            "From an event's publish to its write to this instance's streams (once per event).",
            instance,
        )

        # -- store and publishing
        yield counter_(
            "scribe_events_store_batches",
            "Group-commit batches (a store transaction when they hold stored events or claims).",
            publisher.batches,
        )
        yield publisher.commit_seconds.family(
            "scribe_events_store_commit_seconds", "One group commit (the store's transaction).", instance
        )
        yield publisher.batch_events.family(
            "scribe_events_store_batch_events", "Events per group commit.", instance
        )
        yield gauge_(
            "scribe_events_publish_queue_events", "Events waiting to be stored.", publisher.queued_events
        )
        yield gauge_(
            "scribe_events_outbox_behind",
            "1 while stored events wait for the broker.",
            float(publisher.behind),
        )
        yield counter_(
            "scribe_events_failed_deliveries_given_up",
            "Cut connections whose failed deliveries could not be recorded.",
            recorder.given_up,
        )

        # -- broker
        yield gauge_("scribe_events_broker_up", "1 when the broker subscription is up.", float(broker.up))
        yield gauge_(
            "scribe_events_redis_connections",
            "Open connections in the instance's Redis command pool, idle and in use (0 without Redis).",
            pool_size(getattr(rt.state, "client", None)),
        )
        yield counter_(
            "scribe_events_broker_reconnects", "Times the broker subscription came back.", broker.reconnects
        )
        yield counter_(
            "scribe_events_broker_foreign_messages",
            "Broker messages from another deployment sharing Redis, ignored.",
            broker.foreign,
        )
        yield broker.round_trip.family(
            "scribe_events_broker_round_trip_seconds",
            "From handing a batch to the broker to receiving it back on this instance.",
            instance,
        )

        # -- requests
        yield by("scribe_events_http_responses", "HTTP responses by status code.", "code", requests.responses)
        yield by(
            "scribe_events_auth_failures",
            "Refused credentials, by reason.",
            "reason",
            requests.auth_failures,
        )
        yield by(
            "scribe_events_requests_rate_limited",
            "Requests refused 429 by a limit, by limit.",
            "limit",
            requests.rate_limited,
        )
        yield counter_(
            "scribe_events_requests_banned", "Requests refused for a banned user or address.", requests.banned
        )
        yield counter_(
            "scribe_events_auto_bans",
            "Addresses banned automatically for repeated failed authentications.",
            rt.admission.auto_bans,
        )
        yield counter_(
            "scribe_events_rate_limit_errors",
            "Rate-limit checks let through because their storage (Redis) failed.",
            sum(rt.admission.limits.unavailable.values()),
        )
        yield by(
            "scribe_events_requests_unavailable",
            "Requests answered 5xx, by reason (store_unavailable, publish_queue, publish_queue_bytes, "
            "broker_unavailable, shutting_down, ...).",
            "reason",
            {**dict.fromkeys(UNAVAILABLE_REASONS, 0), **requests.unavailable},
        )
        yield by(
            "scribe_events_connections_rejected",
            "Sockets answered and closed before any route (too_many_connections, headers_too_large, "
            "request_timeout).",
            "reason",
            {**dict.fromkeys(REJECTED_REASONS, 0), **REJECTED},
        )

        # -- the process, thresholds and costs (see monitor.py)
        yield from monitor.collect(instance)
        yield by(
            "scribe_events_background_task_crashes",
            "Background tasks that ended with an error (supervised ones restart).",
            "task",
            CRASHES,
        )


def sample_key(name: str, labels: dict[str, str]) -> str:
    """A history key: the sample's name and its labels but ``instance``, sorted, escaped as in the
    exposition format (``scribe_events_events_delivered_total{family="task"}``)."""
    shown = [(k, v) for k, v in sorted(labels.items()) if k != "instance"]
    if not shown:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in shown)
    return f"{name}{{{inner}}}"


_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    """The inverse of :func:`sample_key`."""
    name, brace, rest = key.partition("{")
    if not brace:
        return name, {}
    return name, {k: _unescape(v) for k, v in _LABEL.findall(rest)}


def samples(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of ``registry`` under its :func:`sample_key`, zeros left out (absent means 0)."""
    out: dict[str, float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.value and not s.name.endswith("_created"):
                out[sample_key(s.name, s.labels)] = float(s.value)
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _number(value: float) -> str:
    return repr(float(value))


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def make_registry(runtime: Callable[[], Any]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(runtime))  # type: ignore[arg-type]
    return registry
