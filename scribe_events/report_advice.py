"""The advice of ``scribe-events report``: which setting to look at, from what the window measured.

Each :class:`Rule` of :data:`RULES` reads the :class:`~scribe_events.report.Facts` that
:func:`scribe_events.report.build_report` gathered (the deployment's section, each instance's, the
store, the settings, the cost model, where the time goes) and names only the settings it declares;
:func:`advise` runs them, :func:`verdict` sums the window up in one line. The rules read the reasons
the server counts (5xx by reason, sockets rejected by reason), not guesses from gauges.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scribe_events.report import CPU_TARGET, Facts, fmt_bytes, fmt_count, fmt_seconds, fmt_share

NEAR = 0.8  # a figure at 80 % of its limit is near it
SLOW_CLIENTS_MIN, SLOW_CLIENTS_SHARE = 3, 0.01
LOOP_LAG_MAX_S, LOOP_LAG_MEAN_S = 0.25, 0.05
LAG_HEADROOM = 0.7  # with a lagging loop and no CPU figure: cap an instance at 70 % of its peak
RATE_LIMITED_MIN = 10
REFUSED_MIN = 10  # publishes refused 503 by one of the publish queue's limits
REJECTED_MIN = 10  # sockets refused 503 past max_connections
TOKEN_EXPIRED_MIN, TOKEN_EXPIRED_SHARE = 10, 0.2
MIB = 1024 * 1024
LIMITS = {  # the `limit` label of requests_rate_limited_total → the setting behind it
    "streams_per_ip": "max_streams_per_ip",
    "streams_per_user": "max_streams_per_user",
    "tickets_per_user": "max_tickets_per_user",
}


@dataclass(frozen=True, slots=True)
class Advice:
    setting: str
    current: Any
    suggested: Any
    why: str


def env_name(setting: str) -> str:
    return f"SCRIBE_EVENTS_{setting.upper()}"


def _nice(value: float) -> int:
    """``value`` rounded up to two significant digits (18,432 → 19,000)."""
    if value <= 0:
        return 0
    scale = 10 ** max(0, math.floor(math.log10(value)) - 1)
    return int(math.ceil(value / scale) * scale)


def _slow_clients(f: Facts) -> list[Advice]:
    conns = f.total["connections"]
    n = max(conns["cut_off"].get("slow_client", 0.0), conns["closed"].get("slow_client", 0.0))
    opened = conns["opened"]
    if n < max(SLOW_CLIENTS_MIN, SLOW_CLIENTS_SHARE * opened):
        return []
    cur = int(f.current("max_connection_queue"))
    return [
        Advice(
            "max_connection_queue",
            cur,
            cur * 2,
            f"{fmt_count(n)} streams were cut off as slow clients ({fmt_share(n, opened)} of the "
            f"{fmt_count(opened)} opened): their own queue passed {fmt_bytes(cur)} (the largest one seen "
            f"held {fmt_bytes(conns['queue_max_bytes_peak'])}). A larger queue rides out bursts; if the "
            "same clients keep falling behind, check their network instead.",
        )
    ]


def _store_commit(f: Facts) -> list[Advice]:
    lat = f.total["latency"]
    p99, limit = lat["publish_to_write"]["p99"], float(f.current("alert_p99_latency_s"))
    if p99 is None or p99 <= limit or f.time["dominant"] != "store_commit":
        return []
    head = (
        f"p99 publish-to-write was {fmt_seconds(p99)}, above alert_p99_latency_s ({fmt_seconds(limit)}), "
        f"and the store commit dominates (mean {fmt_seconds(f.time['parts']['store_commit'])} of "
        f"{fmt_seconds(f.time['publish_to_write'])})"
    )
    out = []
    batch, mean_batch = int(f.current("publish_batch")), lat["store_batch_events"]["mean"]
    if mean_batch is not None and mean_batch >= NEAR * batch:
        out.append(
            Advice(
                "publish_batch",
                batch,
                batch * 2,
                f"{head}; group commits are full (mean {mean_batch:.0f} events of {batch}): larger ones "
                "spread each commit over more events.",
            )
        )
    if f.store.get("backend") == "sqlite":
        out.append(
            Advice(
                "database_url",
                "sqlite (store backend)",
                "postgresql+asyncpg://…",
                f"{head}; SQLite takes one writer at a time and syncs every commit: PostgreSQL commits "
                "faster under load (and lets several instances share the store).",
            )
        )
    return out


def _loop_lag(f: Facts) -> list[Advice]:
    lag = f.total["loop_lag"]
    name, busiest = f.busiest
    cur, peak = int(f.current("max_connections")), busiest["connections"]["peak"]
    cpu = busiest["resources"]["cpu_cores"]
    busy = cpu is not None and cpu >= CPU_TARGET
    # A lag that lasts, or spikes on a busy instance, is load; a spike on an idle one is not (a
    # blocking call, a long GC pause), and more instances would not help.
    if lag["mean"] < LOOP_LAG_MEAN_S and not (busy and lag["max"] >= LOOP_LAG_MAX_S):
        return []
    scale = CPU_TARGET / cpu if cpu and busy else LAG_HEADROOM
    suggested = max(1, min(cur, math.floor(peak * scale)))
    needed = max(f.cost["instances_needed"], math.ceil(f.total["connections"]["peak"] / suggested))
    cpu_text = f" using {cpu:.2f} cores" if cpu else ""
    return [
        Advice(
            "max_connections",
            cur,
            suggested,
            f"the event loop lagged up to {fmt_seconds(lag['max'])} (mean {fmt_seconds(lag['mean'])}); "
            f"the busiest instance, {name}, held {fmt_count(peak)} streams{cpu_text}. Every event waits "
            f"for the loop: cap an instance at {fmt_count(suggested)} streams (sockets past it get 503 "
            f"and retry elsewhere) and run {needed} instances. {f.cost['summary']}",
        )
    ]


def _most(f: Facts, kind: str, label: str) -> str:
    """With several instances: which one counted most of ``problems[kind][label]``."""
    if len(f.instances) < 2:
        return ""
    name, s = max(f.instances.items(), key=lambda kv: kv[1]["problems"][kind].get(label, 0.0))
    return f", {fmt_count(s['problems'][kind].get(label, 0.0))} of them by {name}"


def _connections(f: Facts) -> list[Advice]:
    name, busiest = f.busiest
    peak = busiest["connections"]["peak"]
    out = []
    cap_now = int(f.current("max_connections"))
    uncapped = f.cost["streams_uncapped"]
    target = _nice(peak * 1.5)
    # The streams gauge is sampled once an interval; refused sockets say the cap was reached.
    refused = f.total["problems"]["rejected"].get("too_many_connections", 0.0)
    near, refusing = peak >= NEAR * cap_now, refused >= REJECTED_MIN
    if near or refusing:
        seen = []
        if near:
            seen.append(
                f"{name} peaked at {fmt_count(peak)} streams, {fmt_share(peak, cap_now)} of max_connections"
            )
        if refusing:
            seen.append(
                f"{fmt_count(refused)} sockets were refused 503 past max_connections ({fmt_count(cap_now)})"
                + _most(f, "rejected", "too_many_connections")
            )
        head = ", and ".join(seen)
        wanted = _nice(max(peak, cap_now if refusing else 0.0) * 1.5)
        if uncapped is None or uncapped >= wanted:
            why = f"{head}; the measured costs allow {fmt_count(uncapped) if uncapped else 'more'} on one instance."
            out.append(Advice("max_connections", cap_now, max(wanted, cap_now), why))
        else:
            why = (
                f"{head}, and one instance holds only {fmt_count(uncapped)} at the measured costs: keep the cap "
                f"and add instances. {f.cost['summary']}"
            )
            out.append(Advice("max_connections", cap_now, min(cap_now, uncapped), why))
    alert = int(f.current("alert_connections"))
    room = min(f.cost["streams_per_instance"], target)
    if peak >= NEAR * alert and room > alert:
        out.append(
            Advice(
                "alert_connections",
                alert,
                room,
                f"{name} peaked at {fmt_count(peak)} streams, {fmt_share(peak, alert)} of alert_connections; "
                f"one instance holds {fmt_count(f.cost['streams_per_instance'])} at the measured costs, so "
                "the alert fires long before trouble.",
            )
        )
    return out


def _rate_limits(f: Facts) -> list[Advice]:
    out = []
    for limit, n in f.total["problems"]["rate_limited"].items():
        setting = LIMITS.get(limit)
        if setting is None or n < RATE_LIMITED_MIN:
            continue
        cur = int(f.current(setting))
        hint = {
            "max_streams_per_ip": "many users behind one address (NAT, a proxy) share it",
            "max_streams_per_user": "check first for a client that reconnects without closing",
            "max_tickets_per_user": "check first for a client that asks for tickets it never redeems",
        }[setting]
        out.append(
            Advice(
                setting,
                cur,
                cur * 2,
                f"{fmt_count(n)} requests were refused 429 by the {limit} limit ({cur}); {hint}.",
            )
        )
    return out


RATE_SETTINGS = (
    *(
        f"rate_limit_{kind}_per_{who}"
        for kind in ("streams", "tickets", "polling", "publish")
        for who in ("user", "ip")
    ),
    "rate_limit_admin",
)


def _rate_limit_rates(f: Facts) -> list[Advice]:
    """429s from a rate limit (the `limit` label is the setting's name): twice the rate."""
    out = []
    for limit, n in f.total["problems"]["rate_limited"].items():
        if limit not in RATE_SETTINGS or n < RATE_LIMITED_MIN:
            continue
        cur = str(f.current(limit))
        amount, sep, per = cur.partition("/")
        if not (sep and amount.strip().isdigit()):
            continue  # "none", or a form this rule does not rewrite
        out.append(
            Advice(
                limit,
                cur,
                f"{int(amount) * 2}/{per.strip()}",
                f"{fmt_count(n)} requests were refused 429 by {limit} ({cur}); if they were honest "
                "clients (many behind one address, a busy publisher), allow twice as many.",
            )
        )
    return out


def _publish_queue(f: Facts) -> list[Advice]:
    """From the reasons of the 503s: a full queue (events) or a queue of too many bytes."""
    refused = f.total["problems"]["unavailable"]
    peak = max(s["problems"]["publish_queue_peak"] for s in f.instances.values())
    out = []
    n = refused.get("publish_queue", 0.0)
    if n >= REFUSED_MIN:
        cap = int(f.current("publish_queue"))
        commit = fmt_seconds(f.time["parts"]["store_commit"])
        why = (
            f"{fmt_count(n)} publishes were refused 503 because the publish queue held {fmt_count(cap)} "
            f"events{_most(f, 'unavailable', 'publish_queue')} (the most seen in a snapshot: "
            f"{fmt_count(peak)}; mean store commit {commit}): a longer queue absorbs the bursts; if it "
            "stays full, the store is the bottleneck."
        )
        out.append(Advice("publish_queue", cap, cap * 2, why))
    n = refused.get("publish_queue_bytes", 0.0)
    if n >= REFUSED_MIN:
        cur = int(f.current("publish_queue_bytes"))
        why = (
            f"{fmt_count(n)} publishes were refused 503 because the events waiting to be stored passed "
            f"{fmt_bytes(cur)}{_most(f, 'unavailable', 'publish_queue_bytes')} (at most "
            f"{fmt_count(peak)} events queued in a snapshot): large events fill the bytes before the count."
        )
        out.append(Advice("publish_queue_bytes", cur, cur * 2, why))
    return out


def _failed_per_user(f: Facts) -> list[Advice]:
    cap = int(f.current("max_failed_per_user"))
    exact = f.store.get("failed_deliveries_max_user") is not None
    worst = float(f.store.get("failed_deliveries_max_user" if exact else "failed_deliveries") or 0)
    failed = f.total["problems"]["failed"]
    if worst < NEAR * cap or (not exact and failed <= 0):
        return []
    whose = "one user holds" if exact else "the store holds (in all users)"
    return [
        Advice(
            "max_failed_per_user",
            cap,
            cap * 2,
            f"{whose} {fmt_count(worst)} failed-delivery records, {fmt_share(worst, cap)} of "
            f"max_failed_per_user, and {fmt_count(failed)} deliveries failed in the window: past the cap "
            "new failures are not recorded (and cannot be resent).",
        )
    ]


def _token_expiry(f: Facts) -> list[Advice]:
    conns = f.total["connections"]
    n, closed = conns["closed"].get("token_expired", 0.0), conns["closed_total"]
    if n < max(TOKEN_EXPIRED_MIN, TOKEN_EXPIRED_SHARE * closed) or f.current(
        "end_stream_at_token_expiry"
    ) in (
        False,
        "false",
    ):
        return []
    return [
        Advice(
            "end_stream_at_token_expiry",
            True,
            False,
            f"{fmt_count(n)} of {fmt_count(closed)} streams ({fmt_share(n, closed)}) ended because their "
            "token expired, each one a reconnect, a ticket and a replay: issue longer-lived tokens, or let "
            "streams outlive them (a ban still ends them).",
        )
    ]


def _store_size(f: Facts) -> list[Advice]:
    limit_mb, size = int(f.current("max_store_mb")), f.store.get("size_bytes")
    if not limit_mb or size is None or size < NEAR * limit_mb * MIB:
        return []
    days = int(f.current("retention_days"))
    why = (
        f"the store takes {fmt_bytes(size)}, {fmt_share(size, limit_mb * MIB)} of max_store_mb "
        f"({limit_mb} MiB), keeping {days} days"
    )
    if days <= 1:
        return [Advice("max_store_mb", limit_mb, limit_mb * 2, why + ": one day does not fit; give it room.")]
    fits = max(1, min(days - 1, math.floor(days * LAG_HEADROOM * limit_mb * MIB / size)))
    why += f": the size limit purges before the retention does; {fits} days fit with room to spare."
    return [Advice("retention_days", days, fits, why)]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    settings: tuple[str, ...]  # every setting the rule may name
    check: Any  # Callable[[Facts], list[Advice]]


RULES: tuple[Rule, ...] = (
    Rule("slow_clients", ("max_connection_queue",), _slow_clients),
    Rule("store_commit_latency", ("publish_batch", "database_url", "alert_p99_latency_s"), _store_commit),
    Rule("loop_lag", ("max_connections",), _loop_lag),
    Rule("connections", ("max_connections", "alert_connections"), _connections),
    Rule("rate_limits", tuple(LIMITS.values()), _rate_limits),
    Rule("rate_limit_rates", RATE_SETTINGS, _rate_limit_rates),
    Rule("publish_queue", ("publish_queue", "publish_queue_bytes"), _publish_queue),
    Rule("failed_per_user", ("max_failed_per_user",), _failed_per_user),
    Rule("token_expiry", ("end_stream_at_token_expiry",), _token_expiry),
    Rule("store_size", ("retention_days", "max_store_mb"), _store_size),
)


def advise(facts: Facts, rules: Iterable[Rule] = RULES) -> list[dict[str, Any]]:
    out = []
    for rule in rules:
        for a in rule.check(facts):
            if a.setting not in rule.settings:
                raise RuntimeError(f"rule {rule.name} named {a.setting}, which it does not declare")
            out.append(
                {
                    "rule": rule.name,
                    "setting": a.setting,
                    "env": env_name(a.setting),
                    "current": a.current,
                    "suggested": a.suggested,
                    "why": a.why,
                }
            )
    return out


def verdict(total: dict[str, Any], advice: list[dict[str, Any]]) -> str:
    if advice:
        return f"{len(advice)} setting{'s' if len(advice) > 1 else ''} to look at."
    p = total["problems"]
    seen = [
        (p["failed"], "failed deliveries"),
        (sum(p["http_5xx"].values()), "5xx answers"),
        (sum(p["task_crashes"].values()), "background task crashes"),
        (p["failed_given_up"], "failed deliveries not recorded"),
        (p["rejected"].get("too_many_connections", 0.0), "sockets refused past max_connections"),
        (p["broker_foreign"], "broker messages of another deployment"),
    ]
    found = [f"{fmt_count(n)} {what}" for n, what in seen if n > 0]
    if found:
        return "No setting to change, but see the problems: " + ", ".join(found) + "."
    return "All well: no limit was near and nothing failed in the window."
