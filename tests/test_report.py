"""``scribe-events report``: the computation on synthetic histories (counter resets, percentiles from
buckets, each advice rule, the cost model), the three outputs with hostile server text, the command's
errors, the page in Chromium, and (last) the end-to-end run against a real server."""

from __future__ import annotations

import html
import json
import math
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from scribe_events import report as rp
from scribe_events import report_advice as ra
from scribe_events.config import Settings
from scribe_events.metrics import sample_key
from scribe_events.report_html import render_html
from tests.harness import SECRET, ThreadServer, cli, free_port, wait_for

TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
NOW = 1_790_000_000.0
EVIL = '<script>alert("x")</script>&amp; [bold red]x[/] \x1b[2J \u202e'
# The settings the server sends with the history: the defaults, and the new alert ones.
SETTINGS = {
    "alert_connections": 20_000,
    "alert_p99_latency_s": 0.5,
    "max_connection_queue": 1024 * 1024,
    "publish_batch": 1000,
    "max_connections": 30_000,
    "max_streams_per_ip": 15_000,
    "max_streams_per_user": 32,
    "max_tickets_per_user": 100,
    "publish_queue": 10_000,
    "publish_queue_bytes": 64 * 1024 * 1024,
    "max_failed_per_user": 1000,
    "end_stream_at_token_expiry": True,
    "retention_days": 7,
    "max_store_mb": 0,
}
STORE = {
    "backend": "postgresql",
    "events": 5000,
    "oldest_id": 1,
    "newest_id": 5000,
    "failed_deliveries": 3,
    "size_bytes": 10 * 1024 * 1024,
}


class Fake:
    """One instance's metrics as the server keeps them: counters that grow (and restart),
    gauges, histograms fed with observations; ``snapshot`` writes the history format."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.gauges: dict[str, float] = {"process_max_fds": 65536}
        self.restart()

    def restart(self) -> None:
        self.counters: dict[str, float] = defaultdict(float)
        self.hist: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def count(self, name: str, n: float = 1, **labels: str) -> None:
        self.counters[sample_key(f"scribe_events_{name}_total", labels)] += n

    def gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def observe(self, name: str, value: float, n: int = 1) -> None:
        h = self.hist[name]
        bounds = SIZE_BUCKETS if name == "store_batch_events" else TIME_BUCKETS
        for le in bounds:
            if value <= le:
                h[str(float(le))] += n
        h["+Inf"] += n
        h["sum"] += value * n
        h["count"] += n

    def snapshot(self, at: float) -> dict[str, Any]:
        metrics = {k: v for k, v in self.counters.items() if v}  # zeros may be left out
        metrics.update({sample_key(f"scribe_events_{k}", {}): v for k, v in self.gauges.items()})
        for name, h in self.hist.items():
            base = f"scribe_events_{name}"
            for key, v in h.items():
                if key in ("sum", "count"):
                    metrics[f"{base}_{key}"] = v
                else:
                    metrics[sample_key(base + "_bucket", {"le": key})] = v
        return {"instance": self.name, "at": at, "metrics": metrics}


Step = Callable[[Fake, int], None]


def healthy(f: Fake, step: int) -> None:
    """Ten seconds of a calm instance: 100-odd streams, 50 events/s delivered, millisecond latency."""
    conns = 100 + step
    f.gauge("connections", conns)
    f.count("connections_opened", 5)
    f.count("connections_closed", 4, reason="client_closed")
    f.count("events_published", 10, family="task")
    f.count("events_stored", 10, family="task")
    f.count("events_delivered", 500, family="task")
    f.count("events_delivered", 20, family="content")
    f.count("http_responses", 10, code="202")
    f.count("store_batches", 2)
    f.count("process_cpu_seconds", 0.5)
    f.observe("publish_to_write_seconds", 0.004, 10)
    f.observe("store_commit_seconds", 0.002, 2)
    f.observe("store_batch_events", 5, 2)
    f.observe("broker_round_trip_seconds", 0.0005, 10)
    f.gauge("event_loop_lag_seconds", 0.002)
    f.gauge("process_resident_memory_bytes", 100 * 1024 * 1024 + 5120 * conns)
    f.gauge("process_open_fds", 20 + conns)
    f.gauge("cost_memory_bytes_per_connection", 5120)


def history(
    *steps: Step,
    names: tuple[str, ...] = ("api-1",),
    count: int = 37,
    interval: float = 10.0,
    settings: dict[str, Any] | None = None,
    store: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fakes = [Fake(n) for n in names]
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(count):
        at = NOW - (count - 1 - i) * interval
        for f in fakes:
            for step in steps or (healthy,):
                step(f, i)
            out[f.name].append(f.snapshot(at))
    return {
        "now": NOW,
        "interval_s": interval,
        "answered_by": names[0],
        "instances": out,
        "live": None,
        "store": {**STORE, **(store or {})},
        "settings": {**SETTINGS, **(settings or {})},
    }


def build(*steps: Step, since_s: float = 3600, **kw: Any) -> dict[str, Any]:
    return rp.build_report(history(*steps, **kw), since_s, None)


def named(report: dict[str, Any]) -> set[str]:
    return {a["setting"] for a in report["advice"]}


# --- counters, percentiles, series ---------------------------------------------------------------


def test_report_counter_reset_counts_the_increases_on_both_sides() -> None:
    values = [0, 10, 25, 5, 12]  # the instance restarted between 25 and 5
    snaps = [
        rp.parse_snapshot({"at": i, "metrics": {'scribe_events_events_delivered_total{family="task"}': v}})
        for i, v in enumerate(values)
    ]
    steps = rp.increases(snaps, "events_delivered_total")
    assert [sum(s.values()) for _, s in steps] == [10, 15, 5, 7]

    def restarting(f: Fake, step: int) -> None:
        if step == 20:
            f.restart()

    report = build(restarting, healthy, since_s=360)  # 36 increases of 520, one across the restart
    assert report["total"]["totals"]["delivered"] == 36 * 520
    assert report["total"]["rates"]["delivered_per_s"] == pytest.approx(52.0)
    assert report["total"]["latency"]["publish_to_write"]["count"] == 36 * 10


def test_report_absent_sample_is_zero_and_a_new_series_counts_from_zero() -> None:
    snaps = [
        rp.parse_snapshot({"at": 0, "metrics": {}}),
        rp.parse_snapshot({"at": 10, "metrics": {'scribe_events_events_dropped_total{reason="foreign"}': 4}}),
    ]
    assert rp.increases(snaps, "events_dropped_total")[0][1] == {(("reason", "foreign"),): 4}


def _cumulative(samples: list[float]) -> dict[float, float]:
    return {le: float(sum(1 for s in samples if s <= le)) for le in (*TIME_BUCKETS, math.inf)}


def test_report_quantile_of_a_uniform_distribution_is_exact() -> None:
    samples = [(i + 0.5) / 10_000 for i in range(10_000)]  # uniform on [0, 1)
    buckets = _cumulative(samples)
    for q in (0.5, 0.9, 0.99, 0.2):
        assert rp.quantile(q, buckets) == pytest.approx(q, abs=1e-3)


def test_report_quantile_of_an_exponential_distribution_within_its_bucket() -> None:
    rng = random.Random(7)
    samples = sorted(rng.expovariate(1 / 0.05) for _ in range(50_000))  # mean 50 ms
    buckets = _cumulative(samples)
    for q in (0.5, 0.9, 0.99):
        true = -0.05 * math.log(1 - q)
        got = rp.quantile(q, buckets)
        assert got is not None
        upper = next(le for le in TIME_BUCKETS if le >= true)
        lower = max([0, *(le for le in TIME_BUCKETS if le < true)])
        assert lower <= got <= upper  # in the bucket that holds the true quantile
        assert abs(got - true) <= (upper - lower) / 2


def test_report_quantile_edges_follow_histogram_quantile() -> None:
    assert rp.quantile(0.5, {}) is None
    assert rp.quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    # rank in the first bucket: interpolated from 0
    assert rp.quantile(0.5, {0.1: 10.0, math.inf: 10.0}) == pytest.approx(0.05)
    # rank in +Inf: the highest finite bound
    assert rp.quantile(0.99, {0.1: 5.0, 1.0: 5.0, math.inf: 10.0}) == 1.0
    # 100 observations: 50 ≤ 10 ms, 40 in (10, 25] ms, 10 in (25, 50] ms
    buckets = {0.01: 50.0, 0.025: 90.0, 0.05: 100.0, math.inf: 100.0}
    assert rp.quantile(0.9, buckets) == pytest.approx(0.025)
    assert rp.quantile(0.7, buckets) == pytest.approx(0.01 + 0.015 * 20 / 40)
    assert rp.quantile(0.95, buckets) == pytest.approx(0.025 + 0.025 * 5 / 10)


def test_report_percentiles_come_from_the_window_not_from_before_it() -> None:
    def slow_then_fast(f: Fake, step: int) -> None:
        f.observe("publish_to_write_seconds", 2.0 if step < 10 else 0.004, 100)

    report = build(healthy, slow_then_fast, since_s=200)  # the last 21 snapshots: steps 16 to 36
    lat = report["total"]["latency"]["publish_to_write"]
    assert lat["p99"] is not None and lat["p99"] <= 0.005
    assert lat["max_le"] == 0.005 and lat["over_last_bucket"] == 0
    whole = build(healthy, slow_then_fast)["total"]["latency"]["publish_to_write"]
    assert 1.0 < whole["p99"] <= 2.5 and whole["max_le"] == 2.5


def test_report_connections_peak_now_and_the_total_of_instances() -> None:
    def shaped(f: Fake, step: int) -> None:
        f.gauge("connections", (300 if f.name == "api-2" else 100) + (50 if step == 20 else 0))

    report = build(healthy, shaped, names=("api-1", "api-2"))
    assert report["instances"]["api-1"]["connections"]["peak"] == 150
    assert report["instances"]["api-2"]["connections"]["now"] == 300
    assert report["total"]["connections"]["peak"] == 500  # both peaked in the same interval
    assert report["total"]["connections"]["now"] == 400
    assert report["total"]["connections"]["opened"] == 2 * 36 * 5
    assert report["total"]["connections"]["closed"] == {"client_closed": 2 * 36 * 4}
    assert report["total"]["rates"]["delivered_per_s"] == pytest.approx(2 * 52.0)
    assert report["total"]["events"]["content"]["delivered"] == 2 * 36 * 20
    assert len(report["series"]["connections"]["total"]) == 37
    assert max(v for _, v in report["series"]["rates"]["delivered"]) == pytest.approx(104.0)


def test_report_total_streams_carry_an_instance_over_a_missed_interval() -> None:
    h = history(names=("api-1", "api-2"))
    del h["instances"]["api-2"][20]  # its snapshot came late: none in that interval
    total = dict((t, v) for t, v in rp.build_report(h, 3600, None)["series"]["connections"]["total"])
    assert total[NOW - 16 * 10] == (100 + 20) + (100 + 19)  # api-2 keeps the figure before


def test_report_thinned_history_is_charted_at_its_own_spacing() -> None:
    h = history(names=("api-1", "api-2"), count=121)
    for name in h["instances"]:
        h["instances"][name] = h["instances"][name][::4]  # one snapshot in four, as a long window
    report = rp.build_report(h, 3600, None)
    assert len(report["series"]["connections"]["total"]) == 31
    assert all(v == pytest.approx(104.0) for _, v in report["series"]["rates"]["delivered"])


def test_report_keeps_one_instance_and_appends_the_live_snapshot() -> None:
    h = history(names=("api-1", "api-2"))
    live = Fake("api-1")
    for i in range(38):
        healthy(live, i)
    h["live"] = live.snapshot(NOW + 4)
    report = rp.build_report(h, 3600, "api-1")
    assert list(report["instances"]) == ["api-1"]
    assert report["total"]["snapshots"] == 38
    with pytest.raises(ValueError, match="no history of instance nope"):
        rp.build_report(h, 3600, "nope")
    with pytest.raises(ValueError, match="not in the expected form"):
        rp.build_report({"now": NOW, "instances": {"a": [{"at": 1}]}}, 3600, None)


# --- where the time goes and the cost model -------------------------------------------------------


def test_report_time_names_what_dominates_publish_to_write() -> None:
    def commit_heavy(f: Fake, step: int) -> None:
        f.observe("publish_to_write_seconds", 0.08, 10)
        f.observe("store_commit_seconds", 0.06, 2)

    time_ = build(commit_heavy, healthy)["time"]
    assert time_["dominant"] == "store_commit"
    assert time_["parts"]["store_commit"] == pytest.approx((0.06 + 0.002) / 2)
    fan_out = build(healthy, lambda f, i: f.observe("publish_to_write_seconds", 0.05, 10))["time"]
    assert fan_out["dominant"] == "other"


def test_report_capacity_arithmetic() -> None:
    cost = rp.capacity(
        peak_streams=50_000,
        peak_events_per_s=10_000,
        memory_per_stream=10 * 1024,
        base_memory=48 * 1024 * 1024,
        cpu_per_event=50e-6,
        max_connections=30_000,
        fd_limit=1_000_000,
        base_fds=30,
        memory_budget=1024**3,
    )
    assert cost["streams_uncapped"] == (1024**3 - 48 * 1024**2) // (10 * 1024)  # 100,044 by memory
    assert cost["streams_per_instance"] == 30_000 and cost["streams_limited_by"] == "max_connections"
    assert cost["events_per_s_per_instance"] == pytest.approx(14_000)  # 0.7 core / 50 µs
    assert cost["instances_needed"] == 2 and cost["needed_for"] == "streams"
    assert "one instance holds 30,000 streams" in cost["summary"]
    assert "delivers 14,000 events/s at 70 % of a core".replace(" %", "%") in cost["summary"]
    assert "needs 2 instances" in cost["summary"]
    by_cpu = rp.capacity(
        peak_streams=100,
        peak_events_per_s=40_000,
        memory_per_stream=None,
        base_memory=0,
        cpu_per_event=50e-6,
        max_connections=30_000,
    )
    assert by_cpu["instances_needed"] == 3 and by_cpu["needed_for"] == "events"


def test_report_cost_from_measured_cpu_and_memory() -> None:
    report = build()
    res = report["total"]["resources"]
    assert res["cpu_cores"] == pytest.approx(0.05)
    assert res["cpu_per_delivered_event_s"] == pytest.approx(0.5 / 520)
    cost = report["cost"]
    assert cost["memory_per_stream_bytes"] == 5120
    assert cost["instances_needed"] == 1
    assert cost["events_per_s_per_instance"] == pytest.approx(0.7 / (0.5 / 520))


def test_report_cost_of_a_light_load_is_not_extrapolated() -> None:
    report = build(healthy, _gauge("connections", 5), count=3)  # 5 streams, 1,040 events
    cost = report["cost"]
    assert cost["memory_per_stream_bytes"] is None and cost["cpu_per_event_s"] is not None
    assert cost["summary"].startswith("Too light a load to measure costs (5 streams).")
    assert "within" not in cost["summary"]


# --- advice ---------------------------------------------------------------------------------------


def test_report_every_setting_a_rule_can_name_is_a_real_setting() -> None:
    named_by_rules = {s for rule in ra.RULES for s in rule.settings} | set(ra.LIMITS.values())
    missing = named_by_rules - set(Settings.model_fields)
    assert not missing, f"advice names settings that do not exist: {sorted(missing)}"


def test_report_a_rule_naming_an_undeclared_setting_is_refused() -> None:
    facts = rp.Facts(build()["total"], {}, {}, {}, {}, {})
    rogue = ra.Rule("rogue", ("publish_batch",), lambda f: [ra.Advice("max_connections", 1, 2, "x")])
    with pytest.raises(RuntimeError, match="does not declare"):
        ra.advise(facts, [rogue])


def test_report_healthy_history_has_no_advice_and_says_so() -> None:
    report = build()
    assert report["advice"] == []
    assert report["verdict"] == "All well: no limit was near and nothing failed in the window."


def _slow(n: int) -> Step:
    def step(f: Fake, i: int) -> None:
        f.count("connections_cut_off", n, reason="slow_client")
        f.count("connections_closed", n, reason="slow_client")
        f.gauge("connection_queue_max_bytes", 900_000)

    return step


def _latency(p2w: float, commit: float, batch: float) -> Step:
    def step(f: Fake, i: int) -> None:
        f.observe("publish_to_write_seconds", p2w, 1000)
        f.observe("store_commit_seconds", commit, 20)
        f.observe("store_batch_events", batch, 20)

    return step


def _gauge(name: str, value: float) -> Step:
    return lambda f, i: f.gauge(name, value)


def _spike() -> Step:
    return lambda f, i: f.gauge("event_loop_lag_seconds", 0.4 if i == 20 else 0.002)


def _count(name: str, n: float, **labels: str) -> Step:
    return lambda f, i: f.count(name, n, **labels)


def _unavailable(reason: str, n: float = 2, queued: float = 10) -> Step:
    """``n`` answers 503 for ``reason`` every step (counted by code and by reason, as the server
    does), with ``queued`` events in the publish queue."""

    def step(f: Fake, i: int) -> None:
        f.count("http_responses", n, code="503")
        f.count("requests_unavailable", n, reason=reason)
        f.gauge("publish_queue_events", queued)

    return step


def _rejected(reason: str, n: float = 1) -> Step:
    """Sockets refused by the protocol before any route (not HTTP responses of a route)."""
    return lambda f, i: f.count("connections_rejected", n, reason=reason)


# (id, steps, settings, store, the settings advised); each "calls for it" case has a "not" neighbour.
CASES: list[tuple[str, list[Step], dict[str, Any], dict[str, Any], set[str]]] = [
    ("slow clients", [_slow(1)], {}, {}, {"max_connection_queue"}),
    (
        "few slow clients",
        [lambda f, i: f.count("connections_cut_off", i == 5, reason="slow_client")],
        {},
        {},
        set(),
    ),
    ("commit dominates, full batches", [_latency(0.9, 0.8, 1000)], {}, {}, {"publish_batch"}),
    ("commit dominates on sqlite", [_latency(0.9, 0.8, 10)], {}, {"backend": "sqlite"}, {"database_url"}),
    ("commit dominates, p99 under the alert", [_latency(0.3, 0.25, 1000)], {}, {"backend": "sqlite"}, set()),
    ("p99 high, commit does not dominate", [_latency(0.9, 0.002, 1000)], {}, {"backend": "sqlite"}, set()),
    ("loop lag", [_gauge("event_loop_lag_seconds", 0.4)], {}, {}, {"max_connections"}),
    ("some loop lag", [_gauge("event_loop_lag_seconds", 0.02)], {}, {}, set()),
    (
        "lag spikes on a busy instance",
        [_spike(), _count("process_cpu_seconds", 8)],
        {},
        {},
        {"max_connections"},
    ),
    ("lag spikes on an idle instance", [_spike()], {}, {}, set()),
    ("near alert_connections", [_gauge("connections", 18_000)], {}, {}, {"alert_connections"}),
    ("under alert_connections", [_gauge("connections", 15_000)], {}, {}, set()),
    (
        "near max_connections",
        [_gauge("connections", 27_000), _gauge("process_max_fds", 1_000_000)],
        {"alert_connections": 40_000},
        {},
        {"max_connections"},
    ),
    (
        "rate limited per address",
        [_count("requests_rate_limited", 1, limit="streams_per_ip")],
        {},
        {},
        {"max_streams_per_ip"},
    ),
    (
        "rate limited per user",
        [_count("requests_rate_limited", 1, limit="streams_per_user")],
        {},
        {},
        {"max_streams_per_user"},
    ),
    (
        "rarely rate limited",
        [lambda f, i: f.count("requests_rate_limited", i == 3, limit="streams_per_ip")],
        {},
        {},
        set(),
    ),
    (
        "past a rate limit",
        [_count("requests_rate_limited", 1, limit="rate_limit_polling_per_ip")],
        {},
        {},
        {"rate_limit_polling_per_ip"},
    ),
    (
        "rarely past a rate limit",
        [lambda f, i: f.count("requests_rate_limited", i == 3, limit="rate_limit_polling_per_ip")],
        {},
        {},
        set(),
    ),
    ("503 for a full publish queue", [_unavailable("publish_queue", queued=9000)], {}, {}, {"publish_queue"}),
    ("503 for too many queued bytes", [_unavailable("publish_queue_bytes")], {}, {}, {"publish_queue_bytes"}),
    (
        "503 for both of the queue's limits",
        [_unavailable("publish_queue"), _unavailable("publish_queue_bytes")],
        {},
        {},
        {"publish_queue", "publish_queue_bytes"},
    ),
    # the gauge says the queue was full, but the 503s were the store's: nothing to tune here
    ("503 of the store, queue full", [_unavailable("store_unavailable", queued=9000)], {}, {}, set()),
    ("503 while shutting down", [_unavailable("shutting_down")], {}, {}, set()),
    (
        "rarely refused by the queue",
        [lambda f, i: _unavailable("publish_queue", n=i == 3)(f, i)],
        {},
        {},
        set(),
    ),
    (
        "sockets refused past max_connections",
        [_rejected("too_many_connections")],
        {},
        {},
        {"max_connections"},
    ),
    (
        "rarely refused past max_connections",
        [lambda f, i: _rejected("too_many_connections", i == 3)(f, i)],
        {},
        {},
        set(),
    ),
    (
        "sockets refused for their headers",
        [_rejected("headers_too_large", 5), _rejected("request_timeout", 5)],
        {},
        {},
        set(),
    ),
    (
        "failed deliveries near the cap",
        [_count("events_failed", 1, family="task")],
        {},
        {"failed_deliveries_max_user": 900},
        {"max_failed_per_user"},
    ),
    (
        "failed deliveries far from the cap",
        [_count("events_failed", 1, family="task")],
        {},
        {"failed_deliveries_max_user": 40},
        set(),
    ),
    # what the server sends: "failed_deliveries", all users' (at most that many for one user)
    (
        "failed deliveries of all users near the cap",
        [_count("events_failed", 1, family="task")],
        {},
        {"failed_deliveries": 900},
        {"max_failed_per_user"},
    ),
    ("old failed deliveries of all users, none new", [], {}, {"failed_deliveries": 900}, set()),
    (
        "failed deliveries of all users far from the cap",
        [_count("events_failed", 1, family="task")],
        {},
        {"failed_deliveries": 40},
        set(),
    ),
    (
        "token expiries",
        [_count("connections_closed", 3, reason="token_expired")],
        {},
        {},
        {"end_stream_at_token_expiry"},
    ),
    (
        "token expiries, already off",
        [_count("connections_closed", 3, reason="token_expired")],
        {"end_stream_at_token_expiry": False},
        {},
        set(),
    ),
    ("few token expiries", [_count("connections_closed", 0.1, reason="token_expired")], {}, {}, set()),
    (
        "store near max_store_mb",
        [],
        {"max_store_mb": 100},
        {"size_bytes": 90 * 1024 * 1024},
        {"retention_days"},
    ),
    ("store well under max_store_mb", [], {"max_store_mb": 100}, {"size_bytes": 30 * 1024 * 1024}, set()),
]


@pytest.mark.parametrize(
    ("steps", "settings", "store", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_report_advice_rule_triggers_on_its_numbers_only(
    steps: list[Step], settings: dict[str, Any], store: dict[str, Any], expected: set[str]
) -> None:
    report = build(healthy, *steps, settings=settings, store=store)
    assert named(report) == expected, [a["why"] for a in report["advice"]]
    for a in report["advice"]:
        assert a["env"] == "SCRIBE_EVENTS_" + a["setting"].upper()
        assert a["current"] != a["suggested"] or "add instances" in a["why"]
        assert a["current"] == {**SETTINGS, **settings}.get(a["setting"], a["current"])
        assert re.search(r"\d", a["why"]), "the why gives the numbers that triggered it"
    if not expected:
        assert report["verdict"].startswith(("All well", "No setting to change"))


def test_report_advice_doubles_a_rate_limit() -> None:
    report = build(healthy, _count("requests_rate_limited", 1, limit="rate_limit_streams_per_user"))
    [advice] = report["advice"]
    assert (advice["current"], advice["suggested"]) == ("120/minute", "240/minute")
    assert advice["env"] == "SCRIBE_EVENTS_RATE_LIMIT_STREAMS_PER_USER"


def test_report_advice_numbers() -> None:
    slow = build(healthy, _slow(1))["advice"][0]
    assert (slow["current"], slow["suggested"]) == (1024 * 1024, 2 * 1024 * 1024)
    assert "36 streams were cut off as slow clients" in slow["why"]
    alert = build(healthy, _gauge("connections", 18_000))["advice"][0]
    assert alert["suggested"] == 27_000  # 1.5 x the peak, within the 30,000 one instance holds
    lag = build(healthy, _gauge("event_loop_lag_seconds", 0.4), _gauge("connections", 1000))["advice"][0]
    assert lag["suggested"] == 700 and "run 2 instances" in lag["why"]  # 70 % of the lagging peak
    days = build(settings={"max_store_mb": 100}, store={"size_bytes": 90 * 1024 * 1024})["advice"][0]
    assert days["suggested"] == 5  # 7 days x 0.7 x 100 / 90
    expiry = build(healthy, _count("connections_closed", 3, reason="token_expired"))["advice"][0]
    assert "108 of 252 streams (43%) ended because their token expired" in expiry["why"]
    [queue] = build(healthy, _unavailable("publish_queue", queued=9000))["advice"]
    assert (queue["current"], queue["suggested"]) == (10_000, 20_000)
    assert "72 publishes were refused 503 because the publish queue held 10,000 events" in queue["why"]
    assert "the most seen in a snapshot: 9,000" in queue["why"]
    [size] = build(healthy, _unavailable("publish_queue_bytes"))["advice"]
    assert (size["current"], size["suggested"]) == (64 * 1024 * 1024, 128 * 1024 * 1024)
    assert (
        "72 publishes were refused 503 because the events waiting to be stored passed 64.0 MiB" in size["why"]
    )
    # the cap was reached though no snapshot saw it: 1.5 x the cap, which memory and fds allow
    [cap] = build(healthy, _rejected("too_many_connections"))["advice"]
    assert (cap["current"], cap["suggested"]) == (30_000, 45_000)
    assert cap["why"].startswith("36 sockets were refused 503 past max_connections (30,000);")
    two = build(healthy, _rejected("too_many_connections"), names=("api-1", "api-2"))["advice"]
    assert "72 sockets were refused 503 past max_connections (30,000), 36 of them by api-1" in two[0]["why"]


def test_report_problems_without_a_setting_are_named_in_the_verdict() -> None:
    report = build(healthy, _count("http_responses", 1, code="500"))
    assert report["advice"] == []
    assert report["verdict"] == "No setting to change, but see the problems: 36 5xx answers."
    foreign = build(
        healthy,
        _count("broker_foreign_messages", 2),
        lambda f, i: _rejected("too_many_connections", i == 3)(f, i),
    )
    assert foreign["advice"] == []
    assert foreign["verdict"] == (
        "No setting to change, but see the problems: 1 sockets refused past max_connections, "
        "72 broker messages of another deployment."
    )


def test_report_tables_show_5xx_and_rejected_sockets_by_reason() -> None:
    report = build(
        healthy,
        _unavailable("store_unavailable", n=1),
        _rejected("too_many_connections", 2),
        _rejected("headers_too_large", 1),
        _count("broker_foreign_messages", 1),
    )
    p = report["total"]["problems"]
    assert p["unavailable"] == {"store_unavailable": 36}
    assert p["rejected"] == {"headers_too_large": 36, "too_many_connections": 72}
    assert p["broker_foreign"] == 36
    rows = rp.problem_rows(report["total"])
    assert ["HTTP 5xx", "503", "36"] in rows
    assert ["5xx by reason", "store_unavailable", "36"] in rows
    assert ["sockets rejected", "too_many_connections", "72"] in rows
    assert ["sockets rejected", "headers_too_large", "36"] in rows
    assert ["foreign broker messages", "", "36"] in rows
    page = render_html(report)
    assert "<td class='text'>5xx by reason</td><td class='text'>store_unavailable</td><td>36</td>" in page
    assert "<td class='text'>sockets rejected</td><td class='text'>too_many_connections</td>" in page
    # zeros (the server exports every known reason from the start) make no row
    zeros = build(healthy, _unavailable("publish_queue", n=0), _rejected("request_timeout", 0))
    assert rp.problem_rows(zeros["total"]) == rp.problem_rows(build()["total"])


# --- outputs --------------------------------------------------------------------------------------


def hostile() -> dict[str, Any]:
    def evil(f: Fake, i: int) -> None:
        f.count("connections_closed", 1, reason=EVIL)
        f.count("events_delivered", 3, family=EVIL)
        f.count("events_dropped", 1, reason=EVIL)
        f.count("requests_unavailable", 1, reason=EVIL)
        f.count("connections_cut_off", 1, reason="slow_client")

    h = history(healthy, evil, names=(EVIL, "api-2"))
    h["answered_by"] = EVIL
    h["store"]["backend"] = EVIL
    return rp.build_report(h, 3600, None)


def test_report_json_is_one_valid_document() -> None:
    from scribe_events_cli.common import dumps

    report = hostile()
    line = dumps(report)
    assert "\n" not in line and "\x1b" not in line
    assert json.loads(line) == report
    json.dumps(report, allow_nan=False)  # no NaN or infinity anywhere


def test_report_html_escapes_server_text_and_loads_nothing() -> None:
    page = render_html(hostile())
    assert "<script" not in page.lower()
    assert html.escape(EVIL, quote=True) in page
    assert not re.search(r"\b(src|href)\s*=|@import|url\(|<link|<img|<iframe", page, re.IGNORECASE)
    assert page.count("<svg") == 3
    assert "default-src 'none'" in page


def test_report_terminal_shows_server_text_literally() -> None:
    from scribe_events_cli.report_cmd import show

    out = Console(record=True, width=250, highlight=False, emoji=False, force_terminal=False)
    show(hostile(), out)
    text = out.export_text()
    assert "\x1b" not in text and "\u202e" not in text
    assert "[bold red]x[/]" in text and r"\x1b[2J" in text
    assert "MAX_CONNECTION_QUEUE" in text


def test_report_since_is_parsed_like_other_commands() -> None:
    from datetime import UTC, datetime

    from scribe_events_cli.report_cmd import since_seconds

    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert since_seconds("2026-11-29T10:00:00Z", now) == 7200
    assert since_seconds("90m") == pytest.approx(5400, abs=5)
    with pytest.raises(ValueError):
        since_seconds("soon")
    with pytest.raises(ValueError, match="not in the past"):
        since_seconds("2026-11-29T13:00:00Z", now)


# --- the command's errors -------------------------------------------------------------------------


def _one_red_line(proc: Any) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return str(lines[0])


def test_report_cli_unreachable_server_is_one_red_line(tmp_path: Path) -> None:
    env = {"SCRIBE_EVENTS_JWT_SECRET": SECRET}
    line = _one_red_line(cli("report", "--url", f"http://127.0.0.1:{free_port()}", cwd=tmp_path, env=env))
    assert "cannot reach" in line


def test_report_cli_bad_since_is_one_red_line(tmp_path: Path) -> None:
    env = {"SCRIBE_EVENTS_JWT_SECRET": SECRET, "SCRIBE_EVENTS_URL": "http://127.0.0.1:9"}
    assert "'yesterday'" in _one_red_line(cli("report", "--since", "yesterday", cwd=tmp_path, env=env))


# --- the page in Chromium -------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def showcase() -> dict[str, Any]:
    """Two instances through a morning: a ramp, a burst with slow clients, a restart of one (503s
    while it shuts down), now and then a request head too large."""

    def day(f: Fake, i: int) -> None:
        wave = 1 + math.sin(i / 12)
        conns = int((1800 if f.name.endswith("1") else 1200) * wave + 40 * (i % 7))
        f.gauge("connections", conns)
        f.gauge("process_resident_memory_bytes", 90 * 1024 * 1024 + 6000 * conns)
        f.gauge("process_open_fds", 30 + conns)
        f.gauge("cost_memory_bytes_per_connection", 6000)
        f.gauge("event_loop_lag_seconds", 0.003 + (0.3 if i in (80, 81) else 0))
        f.count("connections_opened", 40 + i % 9)
        f.count("connections_closed", 35, reason="client_closed")
        f.count("connections_closed", 6 if i % 10 == 0 else 0.5, reason="token_expired")
        rate = int(600 * wave)
        f.count("events_published", rate // 20, family="task")
        f.count("events_stored", rate // 20, family="task")
        f.count("events_delivered", rate * 10, family="task")
        f.count("events_delivered", rate, family="content")
        f.count("process_cpu_seconds", 0.8 * wave)
        f.observe("publish_to_write_seconds", 0.003, rate)
        f.observe("publish_to_write_seconds", 0.02 + (0.3 if 78 < i < 84 else 0), rate // 10)
        f.observe("store_commit_seconds", 0.004, 20)
        f.observe("broker_round_trip_seconds", 0.0008, rate)
        if 78 < i < 84:
            f.count("connections_cut_off", 60, reason="slow_client")
            f.count("connections_closed", 60, reason="slow_client")
            f.gauge("connection_queue_max_bytes", 1_000_000)
        if i % 30 == 0:
            f.count("connections_rejected", 1, reason="headers_too_large")
        if f.name.endswith("2") and i == 59:
            f.count("http_responses", 4, code="503")
            f.count("requests_unavailable", 4, reason="shutting_down")
        if f.name.endswith("2") and i == 60:
            f.restart()

    return rp.build_report(history(day, names=("api-1", "api-2"), count=121, interval=30.0), 3600, None)


def test_report_page_charts_are_visible_in_chromium(tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("SCRIBE_EVENTS_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{CHROMIUM} is required here (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright import sync_api

    page_file = tmp_path / "report.html"
    page_file.write_text(render_html(showcase()), encoding="utf-8")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri())
            charts = page.locator("svg.chart")
            assert charts.count() == 3
            for i in range(3):
                chart = charts.nth(i)
                assert chart.is_visible()
                box = chart.bounding_box()
                assert box is not None and box["width"] > 500 and box["height"] > 150
                assert chart.locator(".series").count() >= 2
                line = chart.locator("polyline").first
                assert line.is_visible() and (line.bounding_box() or {"width": 0})["width"] > 300
            assert requests == [page_file.as_uri()]  # nothing else loaded
            DOCS.mkdir(exist_ok=True)
            page.screenshot(path=str(DOCS / "report.png"), full_page=True)
        finally:
            browser.close()


# --- end to end: a real server's history (GET /api/v1/admin/history) ------------------------------


def _history_of(server: ThreadServer) -> dict[str, Any]:
    r = httpx.get(
        server.url + "/api/v1/admin/history",
        params={"since_s": 600},
        headers={"Authorization": f"Bearer {server.token('ops', roles=['admin'])}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_report_e2e_against_a_real_server(make_server: Any, tmp_path: Path) -> None:
    """End to end: streams and events on a real server, then `scribe-events report` reads its history."""
    server = make_server(history_interval_s=0.3)
    wait_for(lambda: len(_history_of(server)["instances"].get("test-instance", [])) >= 1, timeout=10)
    streams = [server.stream(f"reader-{i}") for i in range(3)]
    try:
        for s in streams:
            s.read_count(1, event="connection.established")
        for i in range(20):
            data = {"level": "info", "title": f"n{i}", "message": "report"}
            server.publish_ok({"type": "system.notification", "broadcast": True, "data": data})
        for s in streams:
            s.read_count(20, event="system.notification")
        first = time.time()
        wait_for(
            lambda: any(snap["at"] > first for snap in _history_of(server)["instances"]["test-instance"]),
            timeout=10,
        )
        env = {"SCRIBE_EVENTS_JWT_SECRET": SECRET, "SCRIBE_EVENTS_URL": server.url, "TTY_COMPATIBLE": "0"}
        page = tmp_path / "report.html"
        out = cli("report", "--since", "10m", "--json", "--html", str(page), cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        total = data["total"]
        assert list(data["instances"]) == ["test-instance"]
        assert total["connections"]["opened"] >= 3
        assert total["totals"]["published"] >= 20 and total["totals"]["delivered"] >= 60
        assert total["latency"]["publish_to_write"]["count"] >= 1
        assert total["latency"]["publish_to_write"]["p99"] is not None
        assert total["resources"]["cpu_seconds"] > 0
        assert page.read_text().count("<svg") == 3

        shown = cli("report", "--since", "10m", "--instance", "test-instance", cwd=tmp_path, env=env)
        assert shown.returncode == 0, shown.stderr
        assert "summary" in shown.stdout and "test-instance" in shown.stdout

        user = cli("report", "--token", server.token("someone"), cwd=tmp_path, env=env)
        assert "forbidden" in _one_red_line(user) or "admin" in _one_red_line(user)
    finally:
        for s in streams:
            s.close()


def test_report_e2e_history_sends_every_setting_the_advice_names(make_server: Any) -> None:
    """End to end: the answer's "settings" hold the current value of every setting a rule may name
    (the URL excepted: the report names the store's backend, never the URL and its password)."""
    server = make_server()
    named_by_rules = {s for rule in ra.RULES for s in rule.settings} - {"database_url"}
    missing = named_by_rules - set(_history_of(server)["settings"])
    assert not missing, f"GET /api/v1/admin/history leaves out settings the advice names: {sorted(missing)}"
