"""A result as a person reads it: a title and (name, text) rows, for a table or a log line."""

from __future__ import annotations

from typing import Any

Rows = list[tuple[str, str]]


def describe(result: dict[str, Any]) -> tuple[str, Rows]:
    """The title and rows for a result of any scenario (the verdict is the caller's to show)."""
    title, rows = _BY_SCENARIO[result["scenario"]](result)
    if result.get("label"):
        title += f" ({result['label']})"
    return title, rows + _machine(result)


def _ms(p: dict[str, Any] | None) -> str:
    if not p or not p.get("count"):
        return "-"
    return f"p50 {p['p50_ms']:.2f}  p90 {p['p90_ms']:.2f}  p99 {p['p99_ms']:.2f}  max {p['max_ms']:.2f} ms"


def _connect_row(c: dict[str, Any] | None) -> tuple[str, str]:
    if c is None:
        return "subscribers", "none"
    text = (
        f"{c['connected']:,} of {c['requested']:,} connected in {c['seconds']:.2f} s "
        f"(ready p50 {c['ready_p50_ms']:.1f} ms, p99 {c['ready_p99_ms']:.1f} ms)"
    )
    if c["errors"]:
        text += "; failed: " + ", ".join(f"{n}x {k}" for k, n in c["errors"].items())
    return "subscribers", text


def _machine(result: dict[str, Any]) -> Rows:
    server = result.get("server")
    if server:
        text = (
            f"pid {server['pid']}: CPU {server['cpu_pct']:.1f} %, RSS {server['rss_mib_start']:.1f}"
            f" -> {server['rss_mib_end'] if server['rss_mib_end'] is not None else '?'} MiB"
            + ("" if server["alive"] else " (GONE)")
        )
    else:
        text = "not visible (pass --pid)"
    own = result["loadgen"]
    return [
        ("server", text),
        (
            "load generator",
            f"CPU {own['cpu_pct']:.1f} % ({own['processes']} process(es), {own['cpu_s']:.2f} s)",
        ),
    ]


def _fanout(r: dict[str, Any]) -> tuple[str, Rows]:
    p = r["publish"]
    statuses = ", ".join(f"{n}x {k}" for k, n in p["statuses"].items())
    rows = [
        _connect_row(r["connect"]),
        (
            "published",
            f"{p['ok']:,} ok, {p['errors']:,} errors, {p['skipped']:,} skipped ({statuses}); "
            f"{p['rate_achieved']:.1f} of {p['rate_asked']:g} msg/s"
            + (" held" if p["rate_held"] else " NOT held"),
        ),
        ("publish answer", _ms(p["http_latency"])),
        (
            "events",
            f"expected {r['expected']:,}, received {r['received']:,}, lost {r['lost']:,}, "
            f"duplicated {r['duplicated']:,}, misrouted {r['misrouted']:,}",
        ),
        ("delivered", f"{r['delivered_per_s']:,.0f} events/s over {r['delivery_window_s']:.2f} s"),
        ("latency", _ms(r["latency"])),
        ("latency (corrected)", _ms(r["latency_corrected"])),
    ]
    if r["subscribers_dropped"]:
        rows.append(("dropped", f"{r['subscribers_dropped']} streams ended during the run"))
    title = f"{r['scenario']} {r['target']}: {r['subscribers']:,} subscribers, {r['rate']:g} msg/s, {r['duration_s']:g} s"
    return title, rows


def _idle(r: dict[str, Any]) -> tuple[str, Rows]:
    m = r["server_memory"]
    memory = (
        f"{m['rss_mib_before']:.1f} -> {m['rss_mib_connected']:.1f} MiB: {m['kib_per_connection']:.1f} KiB per stream"
        if m
        else "not visible (pass --pid)"
    )
    rows = [
        _connect_row(r["connect"]),
        ("held", f"{r['held_at_end']:,} open at the end (lowest {r['held_min']:,})"),
        ("server memory", memory),
    ]
    return f"s3 idle: {r['subscribers']:,} streams held {r['hold_s']:g} s", rows


def _resume(r: dict[str, Any]) -> tuple[str, Rows]:
    rows = [
        _connect_row(r["connect"]),
        ("before", f"{r['received_before']:,} of {r['expected_before']:,} received"),
        ("missed", f"{r['expected']:,} published in {r['missed_publish_s']:.2f} s (batches of {r['batch']})"),
        ("reconnected", _connect_row(r["reconnect"])[1]),
        ("resume time", _ms(r["resume"])),
        ("replayed", f"{r['replayed_per_s']:,.0f} events/s"),
        (
            "events",
            f"received {r['received']:,} of {r['expected']:,}, lost {r['lost']:,}, duplicated {r['duplicated']:,}, "
            f"out of order at {r['out_of_order_subscribers']} subscribers",
        ),
        ("live after", "all" if not r["live_after_missing"] else f"missing at {r['live_after_missing']}"),
    ]
    title = f"s4 resume: {r['subscribers']} subscribers, {r['before']} before, {r['missed']:,} missed"
    return title, rows


def _publish(r: dict[str, Any]) -> tuple[str, Rows]:
    statuses = ", ".join(f"{n}x {k}" for k, n in r["statuses"].items())
    rows = [
        ("requests", f"{r['requests']:,} ({statuses})"),
        ("accepted", f"{r['requests_per_s']:,.0f} requests/s, {r['events_per_s']:,.0f} events/s"),
        ("answer latency", _ms(r["latency"])),
    ]
    if r["rate_asked"]:
        rows.append(("latency (corrected)", _ms(r["latency_corrected"])))
        rows.append(("rate", f"{r['events_per_s']:,.0f} of {r['rate_asked']:g} events/s"))
    if r["subscribers"]:
        rows += [
            _connect_row(r["connect"]),
            (
                "events",
                f"expected {r['expected']:,}, received {r['received']:,}, lost {r['lost']:,}, "
                f"duplicated {r['duplicated']:,}, misrouted {r['misrouted']:,}",
            ),
            ("delivery latency", _ms(r["delivery_latency"])),
        ]
    title = f"publish: {r['concurrency']} connections, batch {r['batch']}, {r['duration_s']:g} s"
    return title, rows


_BY_SCENARIO = {"s1": _fanout, "s2": _fanout, "s3": _idle, "s4": _resume, "publish": _publish}
