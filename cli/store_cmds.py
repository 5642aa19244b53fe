"""Commands that work on the event store: ``db``, ``purge``, ``resend``, ``keygen``."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from scribe_events_cli.common import (
    client_token,
    console,
    dumps,
    fail,
    friendly,
    literal,
    load_settings,
    visible,
)
from scribe_events_cli.durations import parse_duration, parse_since

from scribe_events import client
from scribe_events.config import Settings
from scribe_events.crypto import new_key
from scribe_events.events import now_ms, rfc3339

if TYPE_CHECKING:
    from scribe_events.store.sql import SQLEventStore

db_app = typer.Typer(help="The event store's schema (Alembic migrations).", no_args_is_help=True)


def _store(settings: Settings) -> SQLEventStore:
    """The configured store, never migrating by itself (``db upgrade`` does that explicitly).
    (SQLAlchemy and Alembic are imported here, not with the module: every other command starts
    without them, about 0.6 s sooner.)"""
    from scribe_events.store import make_store

    return make_store(settings.model_copy(update={"auto_migrate": False}))


@db_app.command("upgrade")
@friendly
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the database (SCRIBE_EVENTS_DATABASE_URL) to the newest schema."""
    from scribe_events.store import migrate

    settings = load_settings()
    store = _store(settings)

    async def run() -> tuple[str | None, str | None]:
        engine = store.make_engine()
        try:
            before = await migrate.current(engine, settings.database_schema)
            after = await migrate.upgrade(engine, settings.database_schema, revision)
            return before, after
        finally:
            await engine.dispose()

    before, after = asyncio.run(run())
    where = visible(store.describe())
    if before == after:
        console.print(Text.assemble(("up to date", "green"), f" {where} at revision {visible(after)}"))
    else:
        console.print(
            Text.assemble(("upgraded", "green"), f" {where}: {visible(before or 'empty')} → {visible(after)}")
        )


@db_app.command("current")
@friendly
def db_current(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the database's schema revision and the one this version needs."""
    from scribe_events.store import migrate

    settings = load_settings()
    store = _store(settings)

    async def run() -> str | None:
        engine = store.make_engine()
        try:
            return await migrate.current(engine, settings.database_schema)
        finally:
            await engine.dispose()

    at, head = asyncio.run(run()), migrate.head()
    if as_json:
        print(dumps({"database": store.describe(), "current": at, "head": head}))
        return
    if at == head:
        state = ("up to date", "green")
    elif at is None or migrate.is_known(at):
        state = ("needs `scribe-events db upgrade`", "yellow")
    else:
        state = ("is unknown to this version (migrated by a newer scribe-events?)", "red")
    console.print(
        Text.assemble(
            f"{visible(store.describe())}: revision {visible(at or 'none')} (this version: {head}) ", state
        )
    )
    if at != head:
        raise typer.Exit(1)


def purge(
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="Age like 7d, 12h (default: SCRIBE_EVENTS_RETENTION_DAYS)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would go.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete stored events older than an age, straight from the database (the server may run)."""
    from scribe_events.store.retention import cutoff_for

    settings = load_settings()
    age = parse_duration(older_than) if older_than else parse_duration(f"{settings.retention_days}d")
    cutoff = cutoff_for(age / timedelta(days=1), now_ms())
    store = _store(settings)

    async def run() -> int:
        await store.start()
        try:
            if dry_run:
                return await store.count_older(cutoff)
            if as_json:
                return await store.purge(cutoff)
            with Progress(
                TextColumn("purging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
            ) as bar:
                task = bar.add_task("purge", total=None)

                def advance(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                return await store.purge(cutoff, progress=advance)
        finally:
            await store.close()

    count = asyncio.run(run())
    if as_json:
        print(dumps({"dry_run": dry_run, "cutoff": rfc3339(cutoff), "events": count}))
    elif dry_run:
        console.print(f"would purge [bold]{count}[/] events older than {rfc3339(cutoff)} (dry run)")
    else:
        console.print(f"[green]purged[/] {count} events older than {rfc3339(cutoff)}")


def resend(
    event: Annotated[list[int] | None, typer.Option("--event", help="Event id (repeatable).")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Failed deliveries of this user.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Failed since: 2h, 1d or an RFC 3339 time.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be resent.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: Annotated[str | None, typer.Option("--url", help="Server URL (env SCRIBE_EVENTS_URL).")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Admin token (env SCRIBE_EVENTS_TOKEN).")
    ] = None,
) -> None:
    """Re-send failed deliveries through a running server (by event id, by user, or since a time).

    Only those whose user (and session) has a live connection are sent and marked resent; the
    others are listed as not resent and stay recorded."""
    if not (event or user or since):
        raise fail("say what to resend: --event ID, --user U and/or --since 2h")
    settings = load_settings(url=url)
    bearer = client_token(settings, token, "scribe-events-cli", ["admin"])
    body: dict[str, Any] = {"event_ids": event or [], "user_id": user, "dry_run": dry_run}
    if since:
        body["since"] = parse_since(since).isoformat()
    answer = asyncio.run(
        client.request_json(settings.url, bearer, "POST", "/api/v1/admin/events/resend", json_body=body)
    )
    rows = answer["resent"]
    if as_json:
        print(dumps(answer))
        return
    table = Table(title=("would resend" if dry_run else "resent") + f" ({len(rows)})")
    for column in ("event", "type", "user", "session", "reason", "failed at", "resent"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            literal(r["event_id"]),
            literal(r["type"] or "(purged)"),
            literal(r["user_id"]),
            literal(r["session_id"] or ""),
            literal(r["reason"]),
            literal(r["failed_at"]),
            str(r["resend_count"] + (0 if dry_run else 1)),
        )
    console.print(table)
    left = answer.get("not_resent", [])
    if left:
        skipped = Table(title=f"not resent ({len(left)}): they stay recorded")
        for column in ("event", "user", "session", "why"):
            skipped.add_column(column)
        for r in left:
            skipped.add_row(
                literal(r["event_id"]),
                literal(r["user_id"]),
                literal(r["session_id"] or ""),
                literal(r["why"]),
            )
        console.print(skipped)


def keygen() -> None:
    """Print a new key for SCRIBE_EVENTS_ENCRYPTION_KEYS (put it first to rotate; keep the old ones)."""
    print(new_key())
