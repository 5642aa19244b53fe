"""Admin routes (role ``admin``): push mode, failed deliveries and resend, purge, connections, bans."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from scribe_events.auth import ROLE_ADMIN
from scribe_events.control import ban_target
from scribe_events.events import now_ms, rfc3339
from scribe_events.exceptions import BrokerUnavailable, NotFound, ValidationFailed
from scribe_events.ids import check_ip, optional_text_id
from scribe_events.metrics import samples
from scribe_events.state import Ban
from scribe_events.store import FailedDelivery
from scribe_events.web.deps import AUTH_ERRORS, Caller, EventId, UserId, errors, ms, runtime_of

MAX_TTL_S = 10 * 365 * 86_400  # a ban of ten years is "until lifted" for all purposes
MAX_DAYS = 36_500.0

router = APIRouter(tags=["admin"])


class PushModeIn(BaseModel):
    mode: Literal["sse", "polling"]
    sse_percent: int = Field(100, ge=0, le=100)


@router.put("/api/v1/admin/push-mode", tags=["admin"], responses=AUTH_ERRORS)
async def set_push_mode(request: Request, principal: Caller, body: PushModeIn) -> dict[str, Any]:
    """Switch between SSE and polling at run time (`sse_percent` for A/B tests); connected clients
    are told with `system.push-mode`."""
    principal.require(ROLE_ADMIN)
    rt = runtime_of(request)
    await rt.control.set_push_mode(body.mode, body.sse_percent)
    return {"mode": body.mode, "sse_percent": body.sse_percent}


class ResendIn(BaseModel):
    event_ids: list[EventId] = Field(default_factory=list, max_length=1000)
    user_id: UserId | None = None
    since: datetime | None = Field(None, description="RFC 3339 time; failures at or after it")
    dry_run: bool = False
    limit: int = Field(1000, ge=1, le=10_000)


class PurgeIn(BaseModel):
    older_than_days: float = Field(
        ..., gt=0, le=MAX_DAYS, allow_inf_nan=False, description="purge events older than this many days"
    )
    dry_run: bool = False


def _failure_out(f: FailedDelivery) -> dict[str, Any]:
    return {
        "event_id": str(f.event_id),
        "type": f.type,
        "user_id": f.user_id,
        "session_id": f.session_id,
        "connection_id": f.connection_id,
        "reason": f.reason,
        "failed_at": rfc3339(f.failed_ms),
        "resent_at": rfc3339(f.resent_ms) if f.resent_ms else None,
        "resend_count": f.resend_count,
    }


@router.get("/api/v1/admin/events/failed", tags=["admin"], responses=AUTH_ERRORS)
async def list_failed(
    request: Request,
    principal: Caller,
    user_id: Annotated[str | None, Query(max_length=200)] = None,
    event_id: Annotated[list[EventId] | None, Query(max_length=1000)] = None,
    since: datetime | None = None,
    include_resent: bool = False,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    """Important events that could not be written to a connection that should have had them."""
    principal.require(ROLE_ADMIN)
    found = await runtime_of(request).service.failed(
        event_ids=event_id or [],
        user_id=optional_text_id(user_id, "user_id"),
        since_ms=ms(since),
        include_resent=include_resent,
        limit=limit,
    )
    return {"failed": [_failure_out(f) for f in found]}


@router.post("/api/v1/admin/events/resend", tags=["admin"], responses=AUTH_ERRORS)
async def resend(request: Request, principal: Caller, body: ResendIn) -> dict[str, Any]:
    """Send failed deliveries again (by event ids, by user, since a time); `dry_run` lists them."""
    principal.require(ROLE_ADMIN)
    if not (body.event_ids or body.user_id or body.since):
        raise ValidationFailed("name event_ids, user_id or since", field="body", code="missing_selection")
    done, skipped = await runtime_of(request).service.resend(
        event_ids=body.event_ids,
        user_id=optional_text_id(body.user_id, "user_id"),
        since_ms=ms(body.since),
        dry_run=body.dry_run,
        limit=body.limit,
    )
    return {
        "dry_run": body.dry_run,
        "resent": [_failure_out(f) for f in done],
        "not_resent": [{**_failure_out(f), "why": why} for f, why in skipped],
    }


@router.post("/api/v1/admin/events/purge", tags=["admin"], responses=AUTH_ERRORS)
async def purge(request: Request, principal: Caller, body: PurgeIn) -> dict[str, Any]:
    """Delete stored events older than `older_than_days` now (retention does this every hour)."""
    principal.require(ROLE_ADMIN)
    return await runtime_of(request).service.purge(body.older_than_days, dry_run=body.dry_run)


@router.get("/api/v1/admin/connections", tags=["admin"], responses=AUTH_ERRORS)
async def list_connections(
    request: Request,
    principal: Caller,
    user_id: Annotated[str | None, Query(max_length=200)] = None,
    session_id: Annotated[str | None, Query(max_length=200)] = None,
    instance: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    """Live connections on every instance (from Redis when configured, else this instance)."""
    principal.require(ROLE_ADMIN)
    registry = runtime_of(request).registry
    try:
        found = await registry.list(
            user_id=optional_text_id(user_id, "user_id"),
            session_id=optional_text_id(session_id, "session_id"),
            instance=optional_text_id(instance, "instance"),
        )
    except (RedisError, OSError) as exc:
        raise BrokerUnavailable(
            f"the registry (Redis) is unavailable: {exc}", code="redis_unavailable"
        ) from exc
    return {"connections": sorted(found, key=lambda c: c["connected_at"])}


class BanIn(BaseModel):
    user_id: UserId | None = None
    ip: str | None = Field(None, max_length=64, description="an IPv4 or IPv6 address")
    reason: str = Field("", max_length=500)
    ttl_s: int | None = Field(None, gt=0, le=MAX_TTL_S, description="seconds; unset: until lifted")


def _ban_out(ban: Ban) -> dict[str, Any]:
    kind, _, value = ban.target.partition(":")
    return {
        kind if kind == "ip" else "user_id": value,
        "reason": ban.reason,
        "until": rfc3339(ban.until_ms) if ban.until_ms else None,
    }


def _target(user_id: str | None, ip: str | None) -> str:
    try:
        return ban_target(optional_text_id(user_id, "user_id"), None if ip is None else check_ip(ip, "ip"))
    except ValueError:
        raise ValidationFailed(
            "name exactly one of user_id and ip", field="target", code="invalid_ban"
        ) from None


@router.get("/api/v1/admin/bans", tags=["admin"], responses=AUTH_ERRORS)
async def list_bans(request: Request, principal: Caller) -> dict[str, Any]:
    """Users and addresses refused on every instance (R8.5)."""
    principal.require(ROLE_ADMIN)
    return {"bans": [_ban_out(b) for b in runtime_of(request).control.active_bans()]}


@router.post("/api/v1/admin/bans", tags=["admin"], status_code=201, responses=AUTH_ERRORS)
async def add_ban(request: Request, principal: Caller, body: BanIn) -> dict[str, Any]:
    """Ban a user or an address: its open streams close, and it is refused until lifted (or ``ttl_s``)."""
    principal.require(ROLE_ADMIN)
    ban = await runtime_of(request).control.ban(_target(body.user_id, body.ip), body.reason, body.ttl_s)
    return _ban_out(ban)


@router.delete("/api/v1/admin/bans", tags=["admin"], responses=errors(404))
async def remove_ban(
    request: Request,
    principal: Caller,
    user_id: Annotated[str | None, Query(max_length=200)] = None,
    ip: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Lift a ban (`?user_id=` or `?ip=`)."""
    principal.require(ROLE_ADMIN)
    target = _target(user_id, ip)
    if not await runtime_of(request).control.unban(target):
        raise NotFound(f"no ban on {target}")
    return {"lifted": target}


# The settings the report's advice may name, with their current values.
REPORT_SETTINGS = (
    "alert_connections",
    "alert_p99_latency_s",
    "coalesce_window_s",
    "end_stream_at_token_expiry",
    "heartbeat_s",
    "history_interval_s",
    "max_connection_buffer",
    "max_connection_queue",
    "max_connections",
    "max_failed_per_user",
    "max_store_mb",
    "max_streams_per_ip",
    "max_streams_per_user",
    "max_tickets_per_user",
    "progress_throttle_s",
    "publish_batch",
    "publish_queue",
    "publish_queue_bytes",
    "rate_limit_admin",
    "rate_limit_polling_per_ip",
    "rate_limit_polling_per_user",
    "rate_limit_publish_per_ip",
    "rate_limit_publish_per_user",
    "rate_limit_streams_per_ip",
    "rate_limit_streams_per_user",
    "rate_limit_tickets_per_ip",
    "rate_limit_tickets_per_user",
    "replay_page",
    "retention_days",
)


@router.get("/api/v1/admin/history", tags=["admin"], responses=AUTH_ERRORS)
async def history(
    request: Request,
    principal: Caller,
    since_s: Annotated[float, Query(gt=0, le=MAX_DAYS * 86_400, allow_inf_nan=False)] = 3600.0,
    instance: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    """What `scribe-events report` reads: every instance's metric snapshots of the last `since_s`
    seconds (kept every `SCRIBE_EVENTS_HISTORY_INTERVAL_S` for `SCRIBE_EVENTS_HISTORY_KEEP_S`; a
    long window is thinned to 720 per instance), this instance's metrics now, the store's figures
    and the settings the report's advice names."""
    principal.require(ROLE_ADMIN)
    rt = runtime_of(request)
    instance = optional_text_id(instance, "instance")
    now = time.time()
    snapshots = await rt.monitor.history.read(since=now - since_s, instance=instance)
    live = {
        "instance": rt.settings.instance_id,
        "at": now,
        "metrics": samples(request.app.state.owner.metrics),
    }
    store = rt.store
    return {
        "now": now,
        "interval_s": rt.settings.history_interval_s,
        "answered_by": rt.settings.instance_id,
        "instances": snapshots,
        "live": live,
        "store": {
            "backend": getattr(store, "dialect", store.describe()),
            "events": await store.count_older(now_ms() + 1),
            "oldest_id": await store.oldest(),
            "newest_id": await store.head(),
            "failed_deliveries": await store.count_failures(None),
            "size_bytes": await store.size_bytes(),
        },
        "settings": {name: getattr(rt.settings, name) for name in REPORT_SETTINGS},
    }
