"""``scribe-events report``: what the deployment did over a window and what to tune (issue 11, R8.7)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from scribe_events_cli.common import console, dumps, fail, literal, load_settings
from scribe_events_cli.durations import parse_since
from scribe_events_cli.ops_cmds import JsonOpt, TokenOpt, UrlOpt, _call

from scribe_events.client import ClientError

HISTORY = "/api/v1/admin/history"


def since_seconds(text: str, now: datetime | None = None) -> float:
    """``--since`` as other commands read it (``1h``, ``90m``, an RFC 3339 time), in seconds ago."""
    seconds = float(((now or datetime.now(UTC)) - parse_since(text)).total_seconds())
    if seconds <= 0:
        raise ValueError(f"--since {text!r} is not in the past")
    return seconds


def report(
    since: Annotated[
        str, typer.Option("--since", help="The window: 1h, 30m, 2d or an RFC 3339 time.")
    ] = "1h",
    instance: Annotated[str | None, typer.Option("--instance", help="Only this instance.")] = None,
    as_json: JsonOpt = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write the report as one self-contained HTML page.")
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Connections, event rates, latency, failures, costs and tuning advice from the servers'
    metrics history (admin token)."""
    # Here, not with the module: the metrics' modules (prometheus_client, redis) cost every other
    # command's start-up.
    from scribe_events.report import build_report
    from scribe_events.report_html import render_html

    since_s = since_seconds(since)
    settings = load_settings(url=url)
    params: dict[str, Any] = {"since_s": round(since_s, 3)}
    if instance:
        params["instance"] = instance
    try:
        history = _call(settings, token, "GET", HISTORY, params=params)
    except ClientError as exc:
        if exc.status == 404 and exc.message.endswith("Not Found"):  # the route, not an instance
            raise fail(f"{settings.url} has no {HISTORY} (a server older than this command?)") from None
        raise
    data = build_report(history, since_s, instance)
    if html is not None:
        try:
            html.write_text(render_html(data), encoding="utf-8")
        except OSError as exc:
            raise fail(f"cannot write {html}: {exc.strerror or exc}") from None
    if as_json:
        print(dumps(data))
        return
    show(data, console)
    if html is not None:
        console.print(Text.assemble(("wrote", "green"), " ", literal(html)))


def show(data: dict[str, Any], out: Console) -> None:
    from scribe_events.report import family_rows, fmt_span, fmt_value, overview_rows, problem_rows, time_rows

    """The report as Rich tables; every text from the server shown literally."""
    start = datetime.fromtimestamp(data["start"], UTC).strftime("%Y-%m-%d %H:%M")
    end = datetime.fromtimestamp(data["now"], UTC).strftime("%H:%M")
    who = data["instance"] or f"{len(data['instances'])} instance(s)"
    out.print(
        Text.assemble(
            ("scribe-events report", "bold"),
            f" {start} to {end} UTC (the last {fmt_span(data['since_s'])}): ",
            literal(who),
            ", answered by ",
            literal(data["answered_by"] or "?"),
        )
    )
    head, rows = overview_rows(data)
    table = Table(title="summary")
    for column in head:
        table.add_column(literal(column), justify="right" if column else "left")
    for row in rows:
        table.add_row(*(literal(c) for c in row))
    out.print(table)

    table = Table(title="events by family")
    for column in ("family", "published /s", "stored /s", "delivered /s", "failed"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for row in family_rows(data["total"]):
        table.add_row(*(literal(c) for c in row))
    out.print(table)

    table = Table(title="where the time goes")
    for column in ("part", "mean", "share"):
        table.add_column(column)
    for row in time_rows(data["time"]):
        table.add_row(*(literal(c) for c in row))
    out.print(table)

    problems = problem_rows(data["total"])
    if problems:
        table = Table(title="closes and problems")
        for column in ("what", "label", "count"):
            table.add_column(column)
        for row in problems:
            table.add_row(*(literal(c) for c in row))
        out.print(table)

    out.print(Text.assemble(("cost ", "bold"), literal(data["cost"]["summary"])))
    if not data["advice"]:
        out.print(literal(data["verdict"], "green"))
        return
    table = Table(title="tuning advice", show_lines=True)
    for column in ("setting", "current", "suggested", "why"):
        table.add_column(column, overflow="fold")
    for a in data["advice"]:
        table.add_row(
            literal(a["env"], "bold"),
            literal(fmt_value(a["current"])),
            literal(fmt_value(a["suggested"]), "green"),
            literal(a["why"]),
        )
    out.print(table)
