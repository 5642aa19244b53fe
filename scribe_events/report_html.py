"""The page of ``scribe-events report``: one self-contained HTML document, its charts inline SVG.

:func:`render_html` lays out what :func:`scribe_events.report.build_report` computed; nothing here
computes a figure. Every text from the server is HTML-escaped, and the page loads nothing (its
Content-Security-Policy forbids it).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping
from typing import Any

from scribe_events.report import (
    family_rows,
    fmt_bytes,
    fmt_count,
    fmt_seconds,
    fmt_span,
    fmt_value,
    overview_rows,
    problem_rows,
    time_rows,
)

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;
color:#111827;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #e5e7eb}
.meta{color:#6b7280}.verdict{font-weight:600;padding:.6rem .8rem;border-radius:6px;background:#ecfdf5}
.verdict.warn{background:#fef3c7}table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #e5e7eb;padding:.25rem .6rem;text-align:right;vertical-align:top}
.text{text-align:left}th{background:#f9fafb}
code{background:#f3f4f6;padding:0 .25rem;border-radius:3px}
.charts{display:grid;grid-template-columns:1fr;gap:1rem}svg.chart{width:100%;height:auto;
background:#fff;border:1px solid #e5e7eb;border-radius:6px}
"""


def _e(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else fmt_value(value), quote=True)


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return float(next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value))


def _clock(at: float) -> str:
    return time.strftime("%H:%M", time.gmtime(at))


def svg_chart(
    title: str, lines: Mapping[str, list[list[float]]], fmt: Any, start: float, end: float, cid: str
) -> str:
    """A line chart as inline SVG: one polyline a series (broken where a point is missing)."""
    w, h, left, right, top, bottom = 760, 250, 70, 16, 34, 46
    pw, ph = w - left - right, h - top - bottom
    ymax = _nice_ceiling(max((v for pts in lines.values() for _, v in pts), default=0.0))
    span = max(end - start, 1e-9)

    def x(t: float) -> float:
        return left + pw * min(1.0, max(0.0, (t - start) / span))

    def y(v: float) -> float:
        return top + ph * (1 - v / ymax)

    out = [
        f'<svg class="chart" id="{_e(cid)}" viewBox="0 0 {w} {h}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{_e(title)}"><title>{_e(title)}</title>',
        f'<text x="{left}" y="20" font-size="14" font-weight="600">{_e(title)}</text>',
    ]
    for i in range(5):
        v = ymax * i / 4
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e5e7eb"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#6b7280">'
            f"{_e(fmt(v))}</text>"
        )
    for i in range(6):
        t = start + span * i / 5
        out.append(
            f'<text x="{x(t):.1f}" y="{h - bottom + 16}" font-size="11" text-anchor="middle" '
            f'fill="#6b7280">{_e(_clock(t))}</text>'
        )
    if not any(lines.values()):
        out.append(
            f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" fill="#6b7280">'
            "no data in the window</text>"
        )
    legend_x = left
    for n, (name, pts) in enumerate(lines.items()):
        colour = PALETTE[n % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if name == "total" or "store_commit" in name else ""
        points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        if len(pts) > 1:
            out.append(
                f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2"{dash} '
                f'points="{points}"/>'
            )
        elif pts:
            out.append(
                f'<circle class="series" cx="{x(pts[0][0]):.1f}" cy="{y(pts[0][1]):.1f}" r="3" fill="{colour}"/>'
            )
        shown = name.replace("publish_to_write", "publish→write").replace("store_commit", "store commit")
        label = shown if len(shown) <= 40 else shown[:39] + "…"
        out.append(
            f'<rect x="{legend_x}" y="{h - 16}" width="12" height="4" fill="{colour}"/>'
            f'<text x="{legend_x + 16}" y="{h - 11}" font-size="11">{_e(label)}</text>'
        )
        legend_x += 28 + 7 * len(label)
    out.append("</svg>")
    return "".join(out)


def _table(head: list[str], rows: list[list[Any]], text: tuple[int, ...] = (0,)) -> str:
    """A table whose columns ``text`` are read as words (left-aligned), the others as figures."""

    def cls(i: int) -> str:
        return " class='text'" if i in text else ""

    cells = "".join(f"<th{cls(i)}>{_e(c)}</th>" for i, c in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained page (no script, font or image from elsewhere; the charts inline SVG);
    everything from the server HTML-escaped."""
    start, end, charts = report["start"], report["now"], report["series"]
    who = report["instance"] or f"{len(report['instances'])} instance(s)"
    head, rows = overview_rows(report)
    advice = report["advice"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>scribe-events report: {_e(who)}</title><style>{CSS}</style></head><body>",
        "<h1>scribe-events report</h1>",
        f"<p class='meta'>{_e(_clock(start))} to {_e(_clock(end))} UTC (the last {_e(fmt_span(report['since_s']))}), "
        f"{_e(who)}, answered by <code>{_e(report['answered_by'] or '?')}</code>.</p>",
        f"<p class='verdict{' warn' if advice else ''}'>{_e(report['verdict'])}</p>",
    ]
    if advice:
        parts.append("<h2>Tuning advice</h2>")
        parts.append(
            _table(
                ["setting", "current", "suggested", "why"],
                [[a["env"], fmt_value(a["current"]), fmt_value(a["suggested"]), a["why"]] for a in advice],
                text=(0, 3),
            )
        )
    parts.append("<h2>Over time</h2><div class='charts'>")
    parts.append(svg_chart("Open streams", charts["connections"], fmt_count, start, end, "chart-connections"))
    parts.append(svg_chart("Events per second", charts["rates"], fmt_count, start, end, "chart-rates"))
    parts.append(
        svg_chart("Latency percentiles", charts["latency"], fmt_seconds, start, end, "chart-latency")
    )
    parts.append("</div><h2>Summary</h2>")
    parts.append(_table(head, rows))
    parts.append("<h2>Events by family</h2>")
    parts.append(
        _table(
            ["family", "published /s", "stored /s", "delivered /s", "failed"], family_rows(report["total"])
        )
    )
    parts.append("<h2>Where the time goes</h2>")
    parts.append(_table(["part", "mean", "share"], time_rows(report["time"])))
    parts.append(f"<h2>Cost and capacity</h2><p>{_e(report['cost']['summary'])}</p>")
    problems = problem_rows(report["total"])
    parts.append("<h2>Closes and problems</h2>")
    parts.append(_table(["what", "label", "count"], problems, (0, 1)) if problems else "<p>None.</p>")
    store = report["store"]
    if store:
        parts.append("<h2>Store</h2>")
        shown = {k: fmt_bytes(v) if k == "size_bytes" else fmt_value(v) for k, v in store.items()}
        parts.append(_table(["", "value"], [[k, v] for k, v in shown.items()], (0, 1)))
    parts.append("</body></html>\n")
    return "".join(parts)
