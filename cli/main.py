"""``scribe-events``: run the service and talk to a running one."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text
from scribe_events_cli import bench_cmds, ops_cmds, report_cmd, store_cmds
from scribe_events_cli.common import (
    client_token,
    console,
    dumps,
    err_console,
    fail,
    friendly,
    load_settings,
    visible,
)
from scribe_events_cli.render import render_message

from scribe_events import __version__, client
from scribe_events.auth import ROLES, mint_token

app = typer.Typer(
    name="scribe-events",
    help="The real-time event service of InfiniteScribe (Server-Sent Events).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

UrlOpt = Annotated[str | None, typer.Option("--url", help="Server URL (env SCRIBE_EVENTS_URL).")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", help="Bearer token (env SCRIBE_EVENTS_TOKEN); default: minted with the local secret."
    ),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"scribe-events {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """The real-time event service of InfiniteScribe (Server-Sent Events)."""


@app.command()
@friendly
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (env SCRIBE_EVENTS_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (env SCRIBE_EVENTS_PORT).")] = None,
    fd: Annotated[
        int | None, typer.Option(help="Serve on an already bound socket (file descriptor).")
    ] = None,
    heartbeat: Annotated[float | None, typer.Option(help="Heartbeat interval in seconds.")] = None,
    task_heartbeat: Annotated[
        float | None,
        typer.Option(
            help="Seconds a running task may be silent before its readers get task.progress-heartbeat "
            "(env SCRIBE_EVENTS_TASK_HEARTBEAT_S, default 60).",
        ),
    ] = None,
    task_stall: Annotated[
        float | None,
        typer.Option(
            help="Seconds of silence after which a task's heartbeat says stalled: true "
            "(env SCRIBE_EVENTS_TASK_STALL_S, default 300).",
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    access_log: Annotated[
        bool | None, typer.Option("--access-log/--no-access-log", help="Log every HTTP request.")
    ] = None,
) -> None:
    """Run the service. With no configuration: SQLite file, in-process broker, generated dev secret."""
    from scribe_events.server import preflight, run

    settings = load_settings(
        host=host,
        port=port,
        heartbeat_s=heartbeat,
        task_heartbeat_s=task_heartbeat,
        task_stall_s=task_stall,
        log_level=log_level,
        access_log=access_log,
    )
    asyncio.run(preflight(settings))
    if settings.is_default_setup:
        _welcome(settings, _bound_to(fd) if fd is not None else (settings.host, settings.port))
    run(settings, fd=fd)


def _bound_to(fd: int) -> tuple[str, int]:
    """Where an inherited socket (``--fd``) listens, so the welcome names the real address."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        host, port = sock.getsockname()[:2]
    finally:
        sock.close()
    return str(host), int(port)


def _welcome(settings: Any, where: tuple[str, int]) -> None:
    secret = settings.signing_secret(create=True)
    demo = mint_token(secret, "demo", ttl_s=24 * 3600)
    base = f"http://{where[0]}:{where[1]}"
    console.print(
        Panel(
            f"[bold]Open[/] {base}/   (API docs: {base}/docs)\n"
            f"Embedded defaults: SQLite [cyan]{escape(settings.database_url)}[/], in-process broker, "
            f"dev secret in [cyan]{escape(settings.jwt_secret_file)}[/].",
            title="scribe-events (development setup)",
            border_style="green",
        )
    )
    # Plain lines, never wrapped, so they can be copied whole.
    auth = shlex.quote("Authorization: Bearer " + demo)
    print(f"Dev token for user 'demo' (24 h):\n  {demo}\n")
    print(f"Watch the stream:\n  curl -N -s -H {auth} {base}/api/v1/events/stream\n")
    me = _how_to_call_me()
    print(
        "Send it an event (another terminal, same folder):\n"
        f"  {me} publish system.notification --user demo "
        '--data \'{"level": "info", "title": "Hello", "message": "It works"}\'\n'
        f"Or follow it readably:\n  {me} tail --user demo\n"
        f"Run simulated novel-writing tasks for it (progress, chapters, a failure, completion):\n"
        f"  {me} demo --user demo\n",
        flush=True,
    )


def _how_to_call_me() -> str:
    """``scribe-events`` if that is on PATH, else the path this run was started by (e.g. .venv/bin/...)."""
    argv0 = Path(sys.argv[0]).resolve()
    found = shutil.which("scribe-events")
    if found and Path(found).resolve() == argv0:
        return "scribe-events"
    if argv0.name != "scribe-events":
        return "scribe-events"  # started as `python -m scribe_events_cli`
    try:
        return str(argv0.relative_to(Path.cwd()))
    except ValueError:
        return str(argv0)


@app.command()
@friendly
def token(
    user: Annotated[str, typer.Option("--user", help="User id (the 'sub' claim).")],
    session: Annotated[str | None, typer.Option("--session", help="Bind to this session ('sid').")] = None,
    role: Annotated[
        list[str] | None, typer.Option("--role", help=f"Role to grant: {', '.join(ROLES)}. Repeatable.")
    ] = None,
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="Lifetime in seconds.")] = 3600,
) -> None:
    """Mint a token signed with the local secret (development and scripts)."""
    settings = load_settings()
    roles = role or []
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise fail(f"unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    secret = settings.signing_secret()
    if secret is None:
        raise fail(
            f"no secret: set SCRIBE_EVENTS_JWT_SECRET or run `scribe-events serve` once here "
            f"(it writes {settings.jwt_secret_file})"
        )
    print(
        mint_token(
            secret,
            user,
            session_id=session,
            roles=roles,
            ttl_s=ttl,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    )


@app.command()
@friendly
def publish(
    type_: Annotated[str, typer.Argument(metavar="TYPE", help="Event type, e.g. content.novel-created.")],
    data: Annotated[str, typer.Option("--data", help="The event's data as a JSON object.")] = "{}",
    user: Annotated[
        str | None, typer.Option("--user", help="Send to this user (all their connections).")
    ] = None,
    session: Annotated[str | None, typer.Option("--session", help="Only this session of --user.")] = None,
    broadcast: Annotated[bool, typer.Option("--broadcast", help="Send to every connection.")] = False,
    sensitive: Annotated[bool, typer.Option("--sensitive", help="Encrypt at rest.")] = False,
    persist: Annotated[
        bool | None,
        typer.Option(
            "--persist/--no-persist", help="Custom types only: store and replay (default) or live only."
        ),
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Retry-safe key.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Publish one event to a running server."""
    settings = load_settings(url=url)
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise fail(f"--data is not valid JSON: {exc}") from None
    body: dict[str, Any] = {"type": type_, "data": payload}
    if user is not None:
        body["user_id"] = user
    if session is not None:
        body["session_id"] = session
    if broadcast:
        body["broadcast"] = True
    if sensitive:
        body["sensitive"] = True
    if persist is not None:
        body["persist"] = persist
    bearer = client_token(settings, token, "scribe-events-cli", ["publisher"])
    ids = asyncio.run(client.publish(settings.url, bearer, body, idempotency_key=idempotency_key))
    if as_json:
        print(dumps({"ids": ids}))
    else:
        console.print(
            Text.assemble(("published", "green"), f" {visible(type_)} id={visible(', '.join(ids))}")
        )


@app.command()
@friendly
def tail(
    user: Annotated[str, typer.Option("--user", help="Whose stream to follow.")],
    session: Annotated[str | None, typer.Option("--session", help="Session of that user.")] = None,
    types: Annotated[
        str | None, typer.Option("--types", help="Comma-separated globs, e.g. 'task.*'.")
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help="Resume after this event id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    heartbeats: Annotated[bool, typer.Option("--heartbeats", help="Show heartbeats too.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Follow a user's live stream on a running server; reconnects with Last-Event-ID."""
    settings = load_settings(url=url)
    bearer = client_token(settings, token, user, [])

    def status(state: str, detail: str) -> None:
        err_console.print(Text.assemble((state, "yellow"), " ", visible(detail)))

    async def run() -> None:
        async for message in client.follow(
            settings.url, bearer, session_id=session, types=types, last_event_id=since, on_status=status
        ):
            if message.event == "heartbeat" and not heartbeats:
                continue
            if as_json:
                print(_json_line(message), flush=True)
            else:
                console.print(render_message(message))

    try:
        asyncio.run(run())
    except client.ClientError as exc:
        raise fail(exc.message) from None


def _json_line(message: client.Message) -> str:
    try:
        data = message.json()
    except ValueError:
        data = message.data
    if isinstance(data, dict) and "type" in data and "id" in data:
        return str(dumps(data))  # an envelope
    return str(dumps({"type": message.event, "data": data}))


@app.command()
@friendly
def demo(
    user: Annotated[str, typer.Option("--user", help="Who owns the simulated tasks.")] = "demo",
    reader: Annotated[str, typer.Option("--reader", help="A second user granted the tasks.")] = "demo-reader",
    tasks: Annotated[int, typer.Option("--tasks", min=1, max=50, help="Chapters drafted at once.")] = 3,
    step: Annotated[
        float, typer.Option("--step", min=0.001, max=10.0, help="Seconds between progress reports.")
    ] = 0.05,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Run simulated novel-writing tasks (start, progress, chapters, a failure with retry advice,
    completion) through the publisher SDK against a running server. Watch them with
    `scribe-events tail --user demo` or on the server's page."""
    from scribe_events.demo import DemoPlan, run_demo
    from scribe_events.sdk import EventPublisher, PublishError

    settings = load_settings(url=url)
    bearer = client_token(settings, token, "scribe-events-demo", ["publisher"])
    err_console.print(
        Text.assemble(
            ("demo", "bold green"),
            f" publishing to {visible(settings.url)}; follow it with ",
            (f"scribe-events tail --user {visible(user)}", "bold"),
        )
    )

    def report(line: str) -> None:
        console.print(Text.assemble(("•", "cyan"), " ", visible(line)))

    async def run() -> dict[str, int]:
        async with EventPublisher(settings.url, token=bearer) as events:
            return await run_demo(
                events, DemoPlan(user=user, reader=reader, tasks=tasks, step_s=step), report
            )

    try:
        counts = asyncio.run(run())
    except PublishError as exc:
        raise fail(str(exc)) from None
    console.print(
        Text.assemble(
            ("done", "green"),
            f" {counts['tasks']} tasks completed, {counts['failed']} failed once and retried, "
            f"{counts['progress_calls']} progress reports (throttled to at most one a second per task)",
        )
    )


app.add_typer(store_cmds.db_app, name="db")
app.add_typer(ops_cmds.ban_app, name="ban")
app.command()(friendly(ops_cmds.connections))
app.command("push-mode")(friendly(ops_cmds.push_mode))
app.add_typer(bench_cmds.bench_app, name="bench")
app.command()(friendly(store_cmds.purge))
app.command()(friendly(store_cmds.resend))
app.command()(store_cmds.keygen)
app.command()(friendly(report_cmd.report))


def main() -> None:
    app()
