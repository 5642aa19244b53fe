"""Commands for operators: ``connections``, ``ban``, ``push-mode``."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
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
from scribe_events_cli.durations import parse_duration

from scribe_events import client
from scribe_events.config import Settings

UrlOpt = Annotated[str | None, typer.Option("--url", help="Server URL (env SCRIBE_EVENTS_URL).")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Admin token (env SCRIBE_EVENTS_TOKEN).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _admin(settings: Settings, token: str | None) -> str:
    return str(client_token(settings, token, "scribe-events-cli", ["admin"]))


def _call(settings: Settings, token: str | None, method: str, path: str, **kw: Any) -> Any:
    return asyncio.run(client.request_json(settings.url, _admin(settings, token), method, path, **kw))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


async def _from_redis(settings: Settings, **filters: str | None) -> list[dict[str, Any]]:
    from scribe_events.constants import RedisKeys, redis_client
    from scribe_events.registry import RedisRegistry

    assert settings.redis_url is not None
    client = redis_client(settings.redis_url)
    try:
        registry = RedisRegistry(client, RedisKeys(settings.redis_prefix), None, ttl_s=1, refresh_s=1)
        return await registry.list(**filters)
    finally:
        await client.aclose()


def connections(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's connections.")] = None,
    session: Annotated[str | None, typer.Option("--session", help="Only this session (with --user).")] = None,
    instance: Annotated[str | None, typer.Option("--instance", help="Only this instance's.")] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Live connections on all instances: read from Redis when SCRIBE_EVENTS_REDIS_URL is set,
    otherwise asked of the running server."""
    if session and not user:
        raise fail("--session needs --user (a session is always a user's)")
    settings = load_settings(url=url)
    filters = {"user_id": user, "session_id": session, "instance": instance}
    if settings.redis_url:
        from redis.exceptions import RedisError

        try:
            rows = sorted(asyncio.run(_from_redis(settings, **filters)), key=lambda c: c["connected_at"])
        except (RedisError, OSError) as exc:
            raise fail(f"cannot read the registry from Redis: {exc}") from None
    else:
        params = {k: v for k, v in filters.items() if v}
        rows = _call(settings, token, "GET", "/api/v1/admin/connections", params=params)["connections"]
    if as_json:
        print(dumps({"connections": rows}))
        return
    now = time.time()
    table = Table(title=f"{len(rows)} live connection(s)")
    for column in ("connection", "user", "session", "instance", "age", "last seen", "remote", "user agent"):
        table.add_column(column)
    for c in rows:
        table.add_row(
            literal(c["connection_id"]),
            literal(c["user_id"]),
            literal(c["session_id"] or ""),
            literal(c["instance"]),
            _age(now - c["connected_at"]),
            _age(now - c["last_seen"]) + " ago",
            literal(c["remote"]),
            literal(c["user_agent"]),
        )
    console.print(table)


ban_app = typer.Typer(
    help="Ban users or addresses on every instance (their streams close).", no_args_is_help=True
)


@ban_app.command("add")
@friendly
def ban_add(
    user: Annotated[str | None, typer.Option("--user", help="User id to ban.")] = None,
    ip: Annotated[str | None, typer.Option("--ip", help="Address to ban.")] = None,
    reason: Annotated[str, typer.Option("--reason", help="Shown to the client.")] = "",
    ttl: Annotated[
        str | None, typer.Option("--ttl", help="For how long: 30m, 1d (default: until lifted).")
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Ban a user or an address."""
    settings = load_settings(url=url)
    body = {
        "user_id": user,
        "ip": ip,
        "reason": reason,
        "ttl_s": int(parse_duration(ttl).total_seconds()) if ttl else None,
    }
    out = _call(settings, token, "POST", "/api/v1/admin/bans", json_body=body)
    target = out.get("user_id") or out.get("ip")
    console.print(
        Text.assemble(("banned", "red"), f" {visible(target)} until {visible(out['until'] or 'lifted')}")
    )


@ban_app.command("remove")
@friendly
def ban_remove(
    user: Annotated[str | None, typer.Option("--user", help="User id.")] = None,
    ip: Annotated[str | None, typer.Option("--ip", help="Address.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Lift a ban."""
    settings = load_settings(url=url)
    params = {k: v for k, v in {"user_id": user, "ip": ip}.items() if v}
    out = _call(settings, token, "DELETE", "/api/v1/admin/bans", params=params)
    console.print(Text.assemble(("lifted", "green"), " ", visible(out["lifted"])))


@ban_app.command("list")
@friendly
def ban_list(as_json: JsonOpt = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """The bans in force."""
    settings = load_settings(url=url)
    bans = _call(settings, token, "GET", "/api/v1/admin/bans")["bans"]
    if as_json:
        print(dumps({"bans": bans}))
        return
    table = Table(title=f"{len(bans)} ban(s)")
    for column in ("banned", "reason", "until"):
        table.add_column(column)
    for b in bans:
        table.add_row(
            literal((b.get("user_id") and f"user {b['user_id']}") or f"ip {b['ip']}"),
            literal(b["reason"]),
            literal(b["until"] or "lifted"),
        )
    console.print(table)


def push_mode(
    mode: Annotated[str | None, typer.Argument(help="sse or polling; omit to show the current mode.")] = None,
    sse_percent: Annotated[
        int,
        typer.Option(
            "--sse-percent", min=0, max=100, help="With sse: the share of users on SSE (A/B tests)."
        ),
    ] = 100,
    user: Annotated[str, typer.Option("--user", help="Show the mode this user gets.")] = "scribe-events-cli",
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Show or switch the push mode on every instance; connected clients are told."""
    settings = load_settings(url=url)
    if mode is None:
        bearer = client_token(settings, token, user, [])
        out = asyncio.run(client.request_json(settings.url, bearer, "GET", "/api/v1/events/config"))
        console.print(
            Text.assemble(
                f"push mode for {visible(user)}: ",
                (visible(out["mode"]), "bold"),
                f" (poll every {visible(out['poll_interval_s'])} s)",
            )
        )
        return
    if mode not in ("sse", "polling"):
        raise fail("the mode is sse or polling")
    out = _call(
        settings,
        token,
        "PUT",
        "/api/v1/admin/push-mode",
        json_body={"mode": mode, "sse_percent": sse_percent},
    )
    console.print(
        Text.assemble(
            ("push mode", "green"), f" {visible(out['mode'])} ({visible(out['sse_percent'])} % on SSE)"
        )
    )
