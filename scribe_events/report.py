"""``scribe-events report``: from the metrics history of every instance to what happened in a window
and what to tune.

Pure functions over the JSON of ``GET /api/v1/admin/history`` (snapshots of each instance's samples,
see :func:`scribe_events.metrics.sample_key`): :func:`build_report` computes connections, event rates,
latency percentiles, failures, where the time goes and the cost model (:func:`capacity`), and hands
them as :class:`Facts` to the advice (:mod:`scribe_events.report_advice`); the ``*_rows`` functions
lay out its tables for the terminal and for :func:`scribe_events.report_html.render_html`, the page.
Counters are summed as increases between snapshots, a drop counting as a restart from zero;
percentiles come from bucket increases, interpolated inside a bucket as Prometheus'
``histogram_quantile`` does.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from scribe_events.metrics import parse_key

P = "scribe_events_"
# Counters and the label their increases are grouped by ("" when there is none).
COUNTERS: dict[str, str] = {
    "connections_opened_total": "",
    "connections_closed_total": "reason",
    "connections_cut_off_total": "reason",
    "events_published_total": "family",
    "events_stored_total": "family",
    "events_delivered_total": "family",
    "events_failed_total": "family",
    "events_dropped_total": "reason",
    "events_throttled_total": "",
    "events_coalesced_total": "",
    "task_heartbeats_total": "",
    "replays_total": "",
    "replayed_events_total": "",
    "store_batches_total": "",
    "broker_reconnects_total": "",
    "broker_foreign_messages_total": "",
    "auth_failures_total": "reason",
    "requests_rate_limited_total": "limit",
    "requests_banned_total": "",
    "http_responses_total": "code",
    "requests_unavailable_total": "reason",
    "connections_rejected_total": "reason",
    "failed_deliveries_given_up_total": "",
    "background_task_crashes_total": "task",
    "thresholds_crossed_total": "threshold",
    "process_cpu_seconds_total": "",
}
GAUGES = (
    "connections",
    "connections_queued",
    "connection_queue_bytes",
    "connection_queue_max_bytes",
    "publish_queue_events",
    "outbox_behind",
    "broker_up",
    "event_loop_lag_seconds",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "cost_memory_bytes_per_connection",
    "cost_cpu_seconds_per_delivered_event",
    "up_seconds",
)
HISTOGRAMS = (
    "publish_to_write_seconds",
    "store_commit_seconds",
    "broker_round_trip_seconds",
    "store_batch_events",
)
FLOWS = ("published", "stored", "delivered")
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

# The cost model's budget for one instance.
MEMORY_BUDGET_BYTES = 2 * 1024**3
CPU_TARGET = 0.7  # of one core: an asyncio process uses one
# Below these the costs measured are mostly start-up memory and idle CPU: not used.
MIN_STREAMS_MEASURED = 100
MIN_EVENTS_MEASURED = 1000

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    samples: dict[str, dict[Labels, float]]  # name (without the prefix) → labels → value

    def value(self, name: str) -> float:
        return sum(self.samples.get(name, {}).values())


def parse_snapshot(raw: Mapping[str, Any]) -> Snapshot:
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    for key, value in raw["metrics"].items():
        name, labels = parse_key(key)
        if name.startswith(P) and isinstance(value, int | float) and math.isfinite(value):
            samples[name[len(P) :]][tuple(sorted(labels.items()))] = float(value)
    return Snapshot(float(raw["at"]), dict(samples))


# --- counters and histograms over a window -----------------------------------------------------


def increases(snaps: list[Snapshot], name: str) -> list[tuple[float, dict[Labels, float]]]:
    """For each pair of consecutive snapshots: the later one's time and each series' increase. A
    series that went down restarted from zero (its instance restarted), so it rose by its new value."""
    out = []
    for before, after in itertools.pairwise(snaps):
        old, new = before.samples.get(name, {}), after.samples.get(name, {})
        step = {}
        for labels in old.keys() | new.keys():
            a, b = old.get(labels, 0.0), new.get(labels, 0.0)
            step[labels] = b - a if b >= a else b
        out.append((after.at, step))
    return out


def _grouped(steps: Iterable[dict[Labels, float]], label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for step in steps:
        for labels, inc in step.items():
            out[dict(labels).get(label, "") if label else ""] += inc
    return dict(out)


def _buckets(steps: Iterable[dict[Labels, float]]) -> dict[float, float]:
    return {_le(k): v for k, v in _grouped(steps, "le").items() if k}


def _le(text: str) -> float:
    return math.inf if text in ("+Inf", "Inf", "inf") else float(text)


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile from cumulative bucket counts (upper bound → count), as Prometheus'
    ``histogram_quantile``: linear inside the bucket holding the rank, the first bucket starting at
    0, the highest finite bound when the rank falls in ``+Inf``. None without observations."""
    les = sorted(buckets)
    counts: list[float] = []
    for le in les:  # resets can leave a bucket below the one before it
        counts.append(max(buckets[le], counts[-1] if counts else 0.0))
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    i = next(i for i, c in enumerate(counts) if c >= rank)
    if math.isinf(les[i]):
        return les[i - 1] if i > 0 else None
    lower = les[i - 1] if i > 0 else 0.0
    below = counts[i - 1] if i > 0 else 0.0
    inside = counts[i] - below
    if inside <= 0:
        return lower
    return lower + (les[i] - lower) * (rank - below) / inside


def _histogram(buckets: Mapping[float, float], total: float, count: float) -> dict[str, Any]:
    out: dict[str, Any] = {"count": count, "mean": total / count if count > 0 else None}
    for label, q in QUANTILES:
        out[label] = quantile(q, buckets)
    finite = sorted(le for le in buckets if not math.isinf(le))
    top = max(buckets.values(), default=0.0)
    out["max_le"] = next((le for le in finite if buckets[le] >= top > 0), None)
    out["over_last_bucket"] = top - buckets[finite[-1]] if finite and math.inf in buckets else 0.0
    return out


# --- one instance's raw figures, and their sum ------------------------------------------------


@dataclass(slots=True)
class Raw:
    """What sections are computed from: counter increases, bucket increases, gauge statistics."""

    first: float
    last: float
    snapshots: int
    counters: dict[str, dict[str, float]]
    hist: dict[str, tuple[dict[float, float], float, float]]  # buckets, sum, count
    gauges: dict[str, dict[str, float]]  # name → now, peak, mean, min, at_peak (of the streams)

    @property
    def seconds(self) -> float:
        return self.last - self.first


def raw_figures(snaps: list[Snapshot]) -> Raw:
    counters = {n: _grouped((s for _, s in increases(snaps, n)), lbl) for n, lbl in COUNTERS.items()}
    hist = {}
    for n in HISTOGRAMS:
        buckets = _buckets(s for _, s in increases(snaps, n + "_bucket"))
        total = sum(sum(s.values()) for _, s in increases(snaps, n + "_sum"))
        count = sum(sum(s.values()) for _, s in increases(snaps, n + "_count"))
        hist[n] = (buckets, total, count)
    gauges = {}
    busiest = max(snaps, key=lambda s: s.value("connections"))
    for n in GAUGES:
        values = [s.value(n) for s in snaps]
        gauges[n] = {
            "now": values[-1],
            "peak": max(values),
            "mean": sum(values) / len(values),
            "min": min(values),
            "at_peak": busiest.value(n),
        }
    return Raw(snaps[0].at, snaps[-1].at, len(snaps), counters, hist, gauges)


def combine(raws: list[Raw]) -> Raw:
    """The deployment: counts and buckets add up; gauges add up too (streams, RSS, fds), except
    the lag, whose worst instance is the deployment's."""
    counters: dict[str, dict[str, float]] = {n: defaultdict(float) for n in COUNTERS}
    hist: dict[str, tuple[dict[float, float], float, float]] = {}
    for r in raws:
        for n, groups in r.counters.items():
            for k, v in groups.items():
                counters[n][k] += v
    for n in HISTOGRAMS:
        buckets: dict[float, float] = defaultdict(float)
        for r in raws:
            for le, v in r.hist[n][0].items():
                buckets[le] += v
        hist[n] = (dict(buckets), sum(r.hist[n][1] for r in raws), sum(r.hist[n][2] for r in raws))
    gauges = {}
    for n in GAUGES:
        pick = max if n in ("event_loop_lag_seconds",) or n.startswith("cost_") else sum
        gauges[n] = {
            s: float(pick(r.gauges[n][s] for r in raws)) for s in ("now", "peak", "mean", "min", "at_peak")
        }
    return Raw(
        min(r.first for r in raws),
        max(r.last for r in raws),
        sum(r.snapshots for r in raws),
        {n: dict(v) for n, v in counters.items()},
        hist,
        gauges,
    )


def section(raw: Raw, *, peak_streams: float | None = None, instances: int = 1) -> dict[str, Any]:
    """The report of one instance (or of the deployment, from :func:`combine`)."""
    c, g, secs = raw.counters, raw.gauges, raw.seconds

    def rate(n: float) -> float | None:
        return n / secs if secs > 0 else None

    def total(name: str) -> float:
        return sum(c[name].values())

    families = sorted({f for flow in (*FLOWS, "failed") for f in c[f"events_{flow}_total"]})
    events: dict[str, dict[str, Any]] = {
        f: {flow: c[f"events_{flow}_total"].get(f, 0.0) for flow in (*FLOWS, "failed")} for f in families
    }
    for f in families:
        for flow in FLOWS:
            events[f][f"{flow}_per_s"] = rate(events[f][flow])
    cpu = total("process_cpu_seconds_total")
    delivered = total("events_delivered_total")
    opened = total("connections_opened_total")
    lat = {n.removesuffix("_seconds"): _histogram(*raw.hist[n]) for n in HISTOGRAMS}
    lat["store_batch_events"] = lat.pop("store_batch_events")
    http = c["http_responses_total"]
    return {
        "first": raw.first,
        "last": raw.last,
        "seconds": secs,
        "snapshots": raw.snapshots,
        "instances": instances,
        "connections": {
            "now": g["connections"]["now"],
            "peak": g["connections"]["peak"] if peak_streams is None else peak_streams,
            "mean": g["connections"]["mean"],
            "opened": opened,
            "closed": dict(sorted(c["connections_closed_total"].items())),
            "closed_total": total("connections_closed_total"),
            "cut_off": dict(sorted(c["connections_cut_off_total"].items())),
            "queued_peak": g["connections_queued"]["peak"],
            "queue_bytes_peak": g["connection_queue_bytes"]["peak"],
            "queue_max_bytes_peak": g["connection_queue_max_bytes"]["peak"],
            "replays": total("replays_total"),
            "replayed_events": total("replayed_events_total"),
        },
        "events": events,
        "rates": {f"{flow}_per_s": rate(total(f"events_{flow}_total")) for flow in FLOWS},
        "totals": {flow: total(f"events_{flow}_total") for flow in (*FLOWS, "failed")},
        "latency": lat,
        "loop_lag": {"max": g["event_loop_lag_seconds"]["peak"], "mean": g["event_loop_lag_seconds"]["mean"]},
        "problems": {
            "failed": total("events_failed_total"),
            "cut_off": dict(sorted(c["connections_cut_off_total"].items())),
            "dropped": dict(sorted(c["events_dropped_total"].items())),
            "throttled": total("events_throttled_total"),
            "coalesced": total("events_coalesced_total"),
            "auth_failures": dict(sorted(c["auth_failures_total"].items())),
            "rate_limited": dict(sorted(c["requests_rate_limited_total"].items())),
            "banned": total("requests_banned_total"),
            "http_5xx": {k: v for k, v in sorted(http.items()) if k.startswith("5")},
            "unavailable": dict(sorted(c["requests_unavailable_total"].items())),
            "rejected": dict(sorted(c["connections_rejected_total"].items())),
            "failed_given_up": total("failed_deliveries_given_up_total"),
            "task_crashes": dict(sorted(c["background_task_crashes_total"].items())),
            "broker_reconnects": total("broker_reconnects_total"),
            "broker_foreign": total("broker_foreign_messages_total"),
            "thresholds_crossed": dict(sorted(c["thresholds_crossed_total"].items())),
            "publish_queue_peak": g["publish_queue_events"]["peak"],
        },
        "resources": {
            "cpu_seconds": cpu,
            "cpu_cores": rate(cpu),
            "rss_bytes": g["process_resident_memory_bytes"]["now"],
            "rss_peak_bytes": g["process_resident_memory_bytes"]["peak"],
            "open_fds": g["process_open_fds"]["now"],
            "open_fds_peak": g["process_open_fds"]["peak"],
            "max_fds": g["process_max_fds"]["now"],
            "memory_per_connection_bytes": g["cost_memory_bytes_per_connection"]["at_peak"] or None,
            "cpu_per_delivered_event_s": cpu / delivered if delivered > 0 and cpu > 0 else None,
            "cpu_per_connection_s": cpu / opened if opened > 0 and cpu > 0 else None,
        },
    }


# --- series for the charts --------------------------------------------------------------------


def _bin(at: float, start: float, step: float) -> float:
    """The end of the ``step`` long bin that holds ``at`` (a bin holds its end, not its start)."""
    return start + math.ceil((at - start) / step - 1e-9) * step


def series(per_instance: Mapping[str, list[Snapshot]], start: float, step: float) -> dict[str, Any]:
    """Connections, event rates and publish-to-write percentiles over time, in ``step`` bins (the
    deployment's figure of a bin adds each instance's last one in it or, for a bin or two it
    missed, before it)."""
    conns: dict[str, list[list[float]]] = {}
    total_conns: dict[float, dict[str, float]] = defaultdict(dict)
    flow_bins: dict[str, dict[float, float]] = {flow: defaultdict(float) for flow in FLOWS}
    bin_seconds: dict[float, dict[str, float]] = defaultdict(dict)
    lat_bins: dict[str, dict[float, dict[Labels, float]]] = {
        n: defaultdict(lambda: defaultdict(float))
        for n in ("publish_to_write_seconds", "store_commit_seconds")
    }
    for inst, snaps in per_instance.items():
        conns[inst] = [[s.at, s.value("connections")] for s in snaps]
        for s in snaps:
            total_conns[_bin(s.at, start, step)][inst] = s.value("connections")
        for i, (at, _) in enumerate(increases(snaps, "connections")):  # the spans of this instance
            b = _bin(at, start, step)
            bin_seconds[b][inst] = bin_seconds[b].get(inst, 0.0) + at - snaps[i].at
        for flow in FLOWS:
            for at, step_inc in increases(snaps, f"events_{flow}_total"):
                flow_bins[flow][_bin(at, start, step)] += sum(step_inc.values())
        for n, bins in lat_bins.items():
            for at, step_inc in increases(snaps, n + "_bucket"):
                for labels, v in step_inc.items():
                    bins[_bin(at, start, step)][labels] += v
    rates: dict[str, list[list[float]]] = {}
    for flow, counts in flow_bins.items():
        points = []
        for b in sorted(counts):
            secs = max(bin_seconds[b].values(), default=0.0)
            if secs > 0:
                points.append([b, counts[b] / secs])
        rates[flow] = points
    latency: dict[str, list[list[float]]] = {}
    for n, bins in lat_bins.items():
        short = n.removesuffix("_seconds")
        for label, q in QUANTILES:
            if short == "store_commit" and label != "p99":
                continue
            pts = []
            for b in sorted(bins):
                at_q = quantile(q, _buckets([bins[b]]))
                if at_q is not None:
                    pts.append([b, at_q])
            latency[f"{short} {label}"] = pts
    out_conns = dict(conns)
    if len(per_instance) > 1:
        last: dict[str, tuple[float, float]] = {}  # an instance silent for a bin keeps its figure
        total = []
        for b in sorted(total_conns):
            last.update({inst: (b, v) for inst, v in total_conns[b].items()})
            total.append([b, sum(v for at, v in last.values() if at >= b - 2 * step)])
        out_conns["total"] = total
    return {"connections": out_conns, "rates": rates, "latency": latency}


# --- the cost model ---------------------------------------------------------------------------


def capacity(
    *,
    peak_streams: float,
    peak_events_per_s: float,
    memory_per_stream: float | None,
    base_memory: float,
    cpu_per_event: float | None,
    max_connections: int,
    fd_limit: float | None = None,
    base_fds: float = 0.0,
    memory_budget: float = MEMORY_BUDGET_BYTES,
    cpu_target: float = CPU_TARGET,
) -> dict[str, Any]:
    """How many streams and events one instance takes at the measured costs, and how many
    instances a peak needs. Streams are bounded by memory (``memory_budget`` less the memory without
    streams), by file descriptors and by ``max_connections``; events by ``cpu_target`` of a core."""
    bounds: dict[str, float] = {}
    if memory_per_stream and memory_per_stream > 0:
        bounds["memory"] = max(0.0, memory_budget - base_memory) / memory_per_stream
    if fd_limit:
        bounds["file descriptors"] = max(0.0, fd_limit - base_fds)
    uncapped = min(bounds.values()) if bounds else None
    bounds["max_connections"] = float(max_connections)
    limited_by = min(bounds, key=lambda k: bounds[k])
    streams = math.floor(bounds[limited_by])
    events = cpu_target / cpu_per_event if cpu_per_event and cpu_per_event > 0 else None
    by_streams = math.ceil(peak_streams / streams) if streams > 0 else 1
    by_events = math.ceil(peak_events_per_s / events) if events else 1
    needed = max(1, by_streams, by_events)
    costs = []
    if memory_per_stream:
        costs.append(f"{fmt_bytes(memory_per_stream)} a stream")
    if cpu_per_event:
        costs.append(f"{fmt_seconds(cpu_per_event)} of CPU a delivered event")
    head = f"At the measured costs ({', '.join(costs)})" if costs else "At the limits configured"
    delivers = f" and delivers {fmt_count(events)} events/s at {cpu_target:.0%} of a core" if events else ""
    within = f" within {fmt_bytes(memory_budget)}" if memory_per_stream else ""
    summary = (
        f"{head}, one instance holds {fmt_count(streams)} streams{within} "
        f"(bound: {limited_by}){delivers}; your peak ({fmt_count(peak_streams)} streams, "
        f"{fmt_count(peak_events_per_s)} events/s) needs {needed} instance{'s' if needed > 1 else ''}."
    )
    return {
        "streams_per_instance": streams,
        "streams_limited_by": limited_by,
        "streams_uncapped": math.floor(uncapped) if uncapped is not None else None,
        "events_per_s_per_instance": events,
        "instances_needed": needed,
        "needed_for": "events" if by_events > by_streams else "streams",
        "peak_streams": peak_streams,
        "peak_events_per_s": peak_events_per_s,
        "memory_per_stream_bytes": memory_per_stream,
        "cpu_per_event_s": cpu_per_event,
        "memory_budget_bytes": memory_budget,
        "cpu_target": cpu_target,
        "summary": summary,
    }


def where_time_goes(total: dict[str, Any]) -> dict[str, Any]:
    """The mean publish-to-write split into the store commit, the broker round trip, waiting for
    the event loop and the rest (queues, fan-out); the largest part dominates. The loop's part is at
    most what the commit and the broker leave: its figure (each interval's worst lag) is an upper bound."""
    lat = total["latency"]
    p2w = lat["publish_to_write"]["mean"]
    commit, broker = lat["store_commit"]["mean"], lat["broker_round_trip"]["mean"]
    lag = total["loop_lag"]["mean"] or None
    parts: dict[str, float | None] = {
        "store_commit": commit,
        "broker_round_trip": broker,
        "loop_lag": lag,
        "other": None,
    }
    if p2w is not None:
        rest = max(0.0, p2w - (commit or 0.0) - (broker or 0.0))
        parts["loop_lag"] = min(lag, rest) if lag is not None else None
        parts["other"] = rest - (parts["loop_lag"] or 0.0)
    known = {k: v for k, v in parts.items() if v is not None and v > 0}
    return {
        "publish_to_write": p2w,
        "parts": parts,
        "loop_lag_mean": lag,
        "dominant": max(known, key=lambda k: known[k]) if known else None,
    }


# --- formatting shared by the terminal and the page -------------------------------------------


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value * 1e9:.3g} ns"


def fmt_span(seconds: float) -> str:
    """A window's length as people say it: ``1h``, ``1h30m``, ``45m``, ``2d``."""
    whole = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            head, rest = divmod(whole, size)
            tail = fmt_span(rest) if rest >= 60 else ""
            return f"{head}{unit}{tail}"
    return f"{whole}s"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_count(value: float | None) -> str:
    if value is None:
        return "-"
    if value != int(value) and abs(value) < 100:
        return f"{value:.3g}"
    return f"{round(value):,}"


def fmt_share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole > 0 else "n/a"


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def clean(value: Any) -> Any:
    """JSON-safe: no NaN or infinity (they become None)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


# --- what the advice reads --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rules read: the deployment's section, each instance's, the store, the settings."""

    total: dict[str, Any]
    instances: dict[str, dict[str, Any]]
    store: Mapping[str, Any]
    settings: Mapping[str, Any]
    cost: dict[str, Any]
    time: dict[str, Any]

    def current(self, name: str) -> Any:
        """The server's value of a setting, or the default when the answer leaves it out."""
        if name in self.settings:
            return self.settings[name]
        from scribe_events.config import Settings

        return Settings.model_fields[name].get_default(call_default_factory=True)

    @property
    def busiest(self) -> tuple[str, dict[str, Any]]:
        return max(self.instances.items(), key=lambda kv: kv[1]["connections"]["peak"])


# --- the report -------------------------------------------------------------------------------


def _snapshots(raw: Iterable[Mapping[str, Any]], start: float, end: float) -> list[Snapshot]:
    snaps = sorted((parse_snapshot(s) for s in raw), key=lambda s: s.at)
    out: list[Snapshot] = []
    for s in snaps:
        if start <= s.at <= end + 1.0 and (not out or s.at > out[-1].at):
            out.append(s)
    return out


def build_report(history: Mapping[str, Any], since_s: float, instance: str | None = None) -> dict[str, Any]:
    """The report of the last ``since_s`` seconds of ``history`` (the admin history answer), of
    one instance or of all. Raises ValueError when the answer is malformed or holds nothing."""
    try:
        return _build(history, float(since_s), instance)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"the history answer is not in the expected form ({type(exc).__name__}: {exc})"
        ) from None


def _build(history: Mapping[str, Any], since_s: float, instance: str | None) -> dict[str, Any]:
    # report_advice imports Facts and the fmt_* helpers from here: imported late, or it is a cycle.
    from scribe_events.report_advice import advise, verdict

    now = float(history["now"])
    interval = float(history.get("interval_s") or 10.0)
    start = now - since_s
    per_instance: dict[str, list[Snapshot]] = {}
    for inst, raw in history["instances"].items():
        if instance is None or inst == instance:
            per_instance[str(inst)] = _snapshots(raw, start, now)
    live = history.get("live")
    if live and (instance is None or live["instance"] == instance):
        snap = parse_snapshot(live)
        own = per_instance.setdefault(str(live["instance"]), [])
        if start <= snap.at and (not own or snap.at > own[-1].at):
            own.append(snap)
    per_instance = {k: v for k, v in sorted(per_instance.items()) if v}
    if not per_instance:
        which = f"instance {instance}" if instance else "any instance"
        raise ValueError(f"no history of {which} in the last {fmt_span(since_s)}")
    raws = {k: raw_figures(v) for k, v in per_instance.items()}
    sections = {k: section(r) for k, r in raws.items()}
    gaps = sorted(b.at - a.at for snaps in per_instance.values() for a, b in itertools.pairwise(snaps))
    step = max(interval, gaps[len(gaps) // 2] if gaps else 0.0)  # a long window comes thinned
    charts = series(per_instance, start, step)
    if len(per_instance) > 1:
        peak_streams = max((v for _, v in charts["connections"]["total"]), default=0.0)
    else:
        peak_streams = next(iter(sections.values()))["connections"]["peak"]
    total = section(combine(list(raws.values())), peak_streams=peak_streams, instances=len(raws))
    settings = history.get("settings") or {}
    store = history.get("store") or {}
    facts = Facts(total, sections, store, settings, {}, where_time_goes(total))
    delivered = [v for _, v in charts["rates"]["delivered"]]
    busiest = raws[facts.busiest[0]]
    conns, rss = busiest.gauges["connections"], busiest.gauges["process_resident_memory_bytes"]
    per_stream = facts.busiest[1]["resources"]["memory_per_connection_bytes"]
    if per_stream is None and conns["peak"] > conns["min"] and rss["at_peak"] > rss["min"]:
        per_stream = (rss["at_peak"] - rss["min"]) / (conns["peak"] - conns["min"])
    per_event = total["resources"]["cpu_per_delivered_event_s"]
    # Start-up memory and idle CPU (heartbeats, snapshots) swamp the costs of a light load.
    unmeasured = []
    if conns["peak"] < MIN_STREAMS_MEASURED:
        per_stream, unmeasured = None, [f"{fmt_count(conns['peak'])} streams"]
    if total["totals"]["delivered"] < MIN_EVENTS_MEASURED:
        per_event = None
        unmeasured.append(f"{fmt_count(total['totals']['delivered'])} events delivered")
    fds = busiest.gauges["process_open_fds"]
    cost = capacity(
        peak_streams=peak_streams,
        peak_events_per_s=max(delivered, default=total["rates"]["delivered_per_s"] or 0.0),
        memory_per_stream=per_stream,
        base_memory=max(0.0, rss["at_peak"] - (per_stream or 0.0) * conns["peak"]),
        cpu_per_event=per_event,
        max_connections=int(facts.current("max_connections")),
        fd_limit=busiest.gauges["process_max_fds"]["now"] or None,
        base_fds=max(0.0, fds["peak"] - conns["peak"]),
    )
    if unmeasured:
        cost["summary"] = f"Too light a load to measure costs ({', '.join(unmeasured)}). " + cost["summary"]
    facts = Facts(total, sections, store, settings, cost, facts.time)
    advice = advise(facts)
    report = {
        "report": "scribe-events",
        "now": now,
        "since_s": since_s,
        "start": start,
        "interval_s": interval,
        "answered_by": history.get("answered_by"),
        "instance": instance,
        "instances": sections,
        "total": total,
        "series": charts,
        "time": facts.time,
        "cost": cost,
        "store": dict(store),
        "settings": dict(settings),
        "advice": advice,
        "verdict": verdict(total, advice),
    }
    return dict(clean(report))


# --- the tables, shared by the terminal and the page ------------------------------------------


def overview_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary table, instances as columns (and the total with several): shared by both outputs."""
    cols = dict(report["instances"])
    if len(cols) > 1:
        cols["total"] = report["total"]
    head = ["", *cols]

    def row(label: str, get: Any) -> list[str]:
        return [label, *(get(s) for s in cols.values())]

    def lat(name: str, q: str) -> Any:
        return lambda s: fmt_seconds(s["latency"][name][q])

    def worst(name: str) -> Any:
        def shown(s: Mapping[str, Any]) -> str:
            h = s["latency"][name]
            if h["over_last_bucket"]:
                return f"> {fmt_seconds(10.0)}"
            return "-" if h["max_le"] is None else f"≤ {fmt_seconds(h['max_le'])}"

        return shown

    rows = [
        row("streams now", lambda s: fmt_count(s["connections"]["now"])),
        row("streams peak", lambda s: fmt_count(s["connections"]["peak"])),
        row(
            "opened / closed",
            lambda s: (
                f"{fmt_count(s['connections']['opened'])} / {fmt_count(s['connections']['closed_total'])}"
            ),
        ),
        *(row(f"{flow} /s", lambda s, f=flow: fmt_count(s["rates"][f"{f}_per_s"])) for flow in FLOWS),
        *(row(f"publish→write {q}", lat("publish_to_write", q)) for q, _ in QUANTILES),
        row("publish→write max", worst("publish_to_write")),
        *(row(f"store commit {q}", lat("store_commit", q)) for q, _ in QUANTILES),
        row("broker round trip p99", lat("broker_round_trip", "p99")),
        row("loop lag max", lambda s: fmt_seconds(s["loop_lag"]["max"])),
        row("CPU (cores)", lambda s: fmt_count(s["resources"]["cpu_cores"])),
        row(
            "RSS now / peak",
            lambda s: (
                f"{fmt_bytes(s['resources']['rss_bytes'])} / {fmt_bytes(s['resources']['rss_peak_bytes'])}"
            ),
        ),
        row("open fds", lambda s: fmt_count(s["resources"]["open_fds"])),
        row("memory / stream", lambda s: fmt_bytes(s["resources"]["memory_per_connection_bytes"])),
        row("CPU / delivered event", lambda s: fmt_seconds(s["resources"]["cpu_per_delivered_event_s"])),
    ]
    return head, rows


def problem_rows(total: Mapping[str, Any]) -> list[list[str]]:
    """What went wrong or was held back, one row a kind and label (only what happened)."""
    p, c = total["problems"], total["connections"]
    rows: list[list[str]] = []
    grouped = {
        "closed": c["closed"],
        "cut off": p["cut_off"],
        "dropped": p["dropped"],
        "auth failures": p["auth_failures"],
        "rate limited": p["rate_limited"],
        "HTTP 5xx": p["http_5xx"],
        "5xx by reason": p["unavailable"],
        "sockets rejected": p["rejected"],
        "task crashes": p["task_crashes"],
        "thresholds crossed": p["thresholds_crossed"],
    }
    for kind, groups in grouped.items():
        rows.extend([kind, label, fmt_count(n)] for label, n in groups.items() if n)
    single = {
        "failed deliveries": p["failed"],
        "failed deliveries not recorded": p["failed_given_up"],
        "throttled progress updates": p["throttled"],
        "coalesced chapter updates": p["coalesced"],
        "banned requests": p["banned"],
        "broker reconnects": p["broker_reconnects"],
        "foreign broker messages": p["broker_foreign"],
    }
    rows.extend([kind, "", fmt_count(n)] for kind, n in single.items() if n)
    return rows


def family_rows(section_: Mapping[str, Any]) -> list[list[str]]:
    """Event rates by family over the window (and the failed deliveries, counted)."""
    return [
        [
            family,
            *(fmt_count(ev[f"{flow}_per_s"]) for flow in FLOWS),
            fmt_count(ev["failed"]),
        ]
        for family, ev in section_["events"].items()
    ]


def time_rows(time_: Mapping[str, Any]) -> list[list[str]]:
    total = time_["publish_to_write"]
    names = {
        "store_commit": "store commit",
        "broker_round_trip": "broker round trip",
        "loop_lag": "waiting for the event loop",
        "other": "the rest (queues, fan-out)",
    }
    rows = []
    for key, value in time_["parts"].items():
        mark = " (dominates)" if key == time_["dominant"] else ""
        share = fmt_share(value, total) if value is not None and total else ""
        rows.append([names.get(key, key) + mark, fmt_seconds(value), share])
    rows.append(["publish → write (mean)", fmt_seconds(total), ""])
    return rows
