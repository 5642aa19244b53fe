"""FastAPI routes: tickets, publishing, polling, client config, push mode, health, the index page."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from scribe_events.auth import ROLE_ADMIN, ROLE_PUBLISHER, Principal
from scribe_events.config import Settings
from scribe_events.control import ban_target
from scribe_events.events import Event, TypeFilter, parse_publish, rfc3339
from scribe_events.exceptions import (
    BadRequest,
    BrokerUnavailable,
    InvalidJSON,
    NotFound,
    NotReady,
    ValidationFailed,
)
from scribe_events.ids import IDEMPOTENCY_KEY, check_ip, optional_text_id
from scribe_events.metrics import CONTENT_TYPE, render
from scribe_events.service import MAX_ID, dump_with_raw, request_fingerprint
from scribe_events.state import Ban
from scribe_events.store import FailedDelivery
from scribe_events.web import stream
from scribe_events.web.app_state import runtime_of

MAX_TTL_S = 10 * 365 * 86_400  # a ban of ten years is "until lifted" for all purposes
MAX_DAYS = 36_500.0
# Every error, everywhere: {"error": {"code", "message"}} (see errors.py).
_ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_WHY = {
    400: "bad request: invalid JSON, a malformed parameter, a token in the query string",
    401: "missing, bad or expired token or ticket",
    403: "lacking a role, banned, or naming another session than the token's",
    404: "not found",
    408: "the request's head or body did not arrive in time",
    409: "an Idempotency-Key reused with another body, or still being stored",
    413: "the body is over the limit",
    422: "a field is invalid; the message starts with its name",
    429: "too many streams or tickets (Retry-After)",
    431: "the request's headers are over the limit",
    503: "not ready, shutting down, a dependency unavailable or too many connections: retry (Retry-After)",
}
# What any request may be answered, before or beside its route: the protocol (408, 431, 503), the
# body reader (400, 408, 413), admission (401, 403) and validation (422).
_COMMON = (400, 401, 403, 408, 413, 422, 431, 503)


def _errors(*extra: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"description": _WHY[status], "content": {"application/json": {"schema": _ERROR_BODY}}}
        for status in sorted({*_COMMON, *extra})
    }


_AUTH_ERRORS = _errors()
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <JWT>`")


async def authenticate(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None
) -> Principal:
    """The caller, from ``Authorization: Bearer <jwt>``; banned users and addresses get 403.
    (The ``HTTPBearer`` dependency only documents the scheme; admission reads the header itself.)"""
    return await runtime_of(request).admission.caller(
        request.headers.get("authorization"), request.client.host if request.client else None
    )


Caller = Annotated[Principal, Depends(authenticate)]


class TicketOut(BaseModel):
    ticket: str
    expires_in: int


class PublishedOut(BaseModel):
    ids: list[str]


class PushModeIn(BaseModel):
    mode: Literal["sse", "polling"]
    sse_percent: int = Field(100, ge=0, le=100)


_ID = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"}
_EVENT_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "additionalProperties": False,
    "properties": {
        "type": {
            "type": "string",
            "maxLength": 200,
            "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]*(\\.[A-Za-z0-9][A-Za-z0-9_-]*)+$",
            "example": "content.novel-created",
        },
        "data": {"type": "object", "description": "at most 64 KiB encoded, nested at most 32 levels"},
        "user_id": {**_ID, "description": "the audience: this user (all their connections)"},
        "session_id": {**_ID, "description": "only together with user_id"},
        "broadcast": {"type": "boolean", "description": "the audience: every connection"},
        "sensitive": {"type": "boolean", "description": "encrypt at rest"},
        "persist": {"type": "boolean", "description": "custom types only; false = live only"},
    },
}


def _publish_body(max_batch: int) -> dict[str, Any]:
    batch = {"type": "array", "items": _EVENT_SCHEMA, "minItems": 1, "maxItems": max_batch}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            _EVENT_SCHEMA,
                            {
                                "type": "object",
                                "required": ["events"],
                                "additionalProperties": False,
                                "properties": {"events": batch},
                            },
                        ]
                    }
                }
            },
        }
    }


router = APIRouter()


@router.get(
    stream.STREAM_PATH,
    tags=["stream"],
    summary="Open the event stream (text/event-stream)",
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}}, **_errors(429)},
)
async def open_stream(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
    session_id: str | None = None,
    types: Annotated[str | None, Query(description="comma-separated globs, e.g. task.*")] = None,
    last_event_id: str | None = None,
    ticket: str | None = None,
) -> Response:
    """Documented here; served by the stream handler (`scribe_events.web.stream`), which answers the
    path before FastAPI's routing. Send `Authorization: Bearer`, or `ticket=` from a browser."""
    raise NotReady("the service is starting")


@router.post("/api/v1/events/tickets", tags=["stream"], response_model=TicketOut, responses=_errors(429))
async def issue_ticket(request: Request, principal: Caller) -> TicketOut:
    """A single-use ticket (30 s) for `GET /api/v1/events/stream?ticket=…`, for `EventSource`."""
    rt = runtime_of(request)
    ticket = await rt.state.issue_ticket(
        principal, rt.settings.ticket_ttl_s, per_user=rt.settings.max_tickets_per_user
    )
    return TicketOut(ticket=ticket, expires_in=rt.settings.ticket_ttl_s)


@router.post(
    "/api/v1/events",
    tags=["publish"],
    status_code=202,
    response_model=PublishedOut,
    openapi_extra=_publish_body(Settings.model_fields["max_batch_events"].default),
    responses=_errors(409),
)
async def publish(
    request: Request,
    principal: Caller,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> PublishedOut:
    """Publish one event or `{"events": [...]}` (roles `publisher`, `admin`). Important events are
    committed to the store before anyone is sent them; the answer carries their ids in order."""
    principal.require(ROLE_PUBLISHER, ROLE_ADMIN)
    rt = runtime_of(request)
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise BadRequest(
            "Idempotency-Key must be 1-200 visible ASCII characters", code="invalid_idempotency_key"
        )
    body = await request.body()
    events = parse_body(
        body, rt.settings.max_event_bytes, rt.settings.max_batch_events, rt.settings.max_data_depth
    )
    ids = await rt.service.publish(
        principal, events, idempotency_key=idempotency_key, request_hash=request_fingerprint(body)
    )
    return PublishedOut(ids=ids)


def parse_body(body: bytes, max_event_bytes: int, max_batch: int, max_depth: int = 32) -> list[Event]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidJSON("the body is not valid JSON") from None
    if isinstance(payload, dict) and "events" in payload:
        items = payload["events"]
        extra = sorted(set(payload) - {"events"})
        if extra:
            raise ValidationFailed("is not allowed beside 'events'", field=extra[0])
        if not isinstance(items, list) or not items:
            raise ValidationFailed("must be a non-empty list of events", field="events")
        if len(items) > max_batch:
            raise ValidationFailed(
                f"holds {len(items)} events; at most {max_batch} per request", field="events"
            )
        return [
            parse_publish(item, max_event_bytes=max_event_bytes, index=i, max_depth=max_depth)
            for i, item in enumerate(items)
        ]
    return [parse_publish(payload, max_event_bytes=max_event_bytes, max_depth=max_depth)]


@router.get("/api/v1/events", tags=["polling"], responses=_AUTH_ERRORS)
async def poll(
    request: Request,
    principal: Caller,
    after: Annotated[str | None, Query(description="last id seen; omit to start from now, 0 for all")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    types: str | None = None,
    session_id: str | None = None,
) -> Response:
    """Polling fallback: the same events, visibility and envelopes as the stream."""
    rt = runtime_of(request)
    body = await rt.service.poll(
        principal,
        rt.admission.session(principal, session_id),
        after,
        limit,
        TypeFilter.parse(types, max_globs=rt.settings.max_type_globs),
    )
    return Response(dump_with_raw(body), media_type="application/json")


@router.get("/api/v1/events/config", tags=["polling"], responses=_AUTH_ERRORS)
async def client_config(request: Request, principal: Caller) -> dict[str, Any]:
    """How this user's client should connect: push mode, intervals, reconnect policy."""
    return runtime_of(request).service.config_for(principal)


@router.put("/api/v1/admin/push-mode", tags=["admin"], responses=_AUTH_ERRORS)
async def set_push_mode(request: Request, principal: Caller, body: PushModeIn) -> dict[str, Any]:
    """Switch between SSE and polling at run time (`sse_percent` for A/B tests); connected clients
    are told with `system.push-mode`."""
    principal.require(ROLE_ADMIN)
    rt = runtime_of(request)
    await rt.control.set_push_mode(body.mode, body.sse_percent)
    return {"mode": body.mode, "sse_percent": body.sse_percent}


UserId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")]
EventId = Annotated[int, Field(ge=1, le=MAX_ID)]


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


@router.get("/api/v1/admin/events/failed", tags=["admin"], responses=_AUTH_ERRORS)
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
        since_ms=_ms(since),
        include_resent=include_resent,
        limit=limit,
    )
    return {"failed": [_failure_out(f) for f in found]}


@router.post("/api/v1/admin/events/resend", tags=["admin"], responses=_AUTH_ERRORS)
async def resend(request: Request, principal: Caller, body: ResendIn) -> dict[str, Any]:
    """Send failed deliveries again (by event ids, by user, since a time); `dry_run` lists them."""
    principal.require(ROLE_ADMIN)
    if not (body.event_ids or body.user_id or body.since):
        raise ValidationFailed("name event_ids, user_id or since", field="body", code="missing_selection")
    done, skipped = await runtime_of(request).service.resend(
        event_ids=body.event_ids,
        user_id=optional_text_id(body.user_id, "user_id"),
        since_ms=_ms(body.since),
        dry_run=body.dry_run,
        limit=body.limit,
    )
    return {
        "dry_run": body.dry_run,
        "resent": [_failure_out(f) for f in done],
        "not_resent": [{**_failure_out(f), "why": why} for f, why in skipped],
    }


@router.post("/api/v1/admin/events/purge", tags=["admin"], responses=_AUTH_ERRORS)
async def purge(request: Request, principal: Caller, body: PurgeIn) -> dict[str, Any]:
    """Delete stored events older than `older_than_days` now (retention does this every hour)."""
    principal.require(ROLE_ADMIN)
    return await runtime_of(request).service.purge(body.older_than_days, dry_run=body.dry_run)


@router.get("/api/v1/admin/connections", tags=["admin"], responses=_AUTH_ERRORS)
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


@router.get("/api/v1/admin/bans", tags=["admin"], responses=_AUTH_ERRORS)
async def list_bans(request: Request, principal: Caller) -> dict[str, Any]:
    """Users and addresses refused on every instance (R8.5)."""
    principal.require(ROLE_ADMIN)
    return {"bans": [_ban_out(b) for b in runtime_of(request).control.active_bans()]}


@router.post("/api/v1/admin/bans", tags=["admin"], status_code=201, responses=_AUTH_ERRORS)
async def add_ban(request: Request, principal: Caller, body: BanIn) -> dict[str, Any]:
    """Ban a user or an address: its open streams close, and it is refused until lifted (or ``ttl_s``)."""
    principal.require(ROLE_ADMIN)
    ban = await runtime_of(request).control.ban(_target(body.user_id, body.ip), body.reason, body.ttl_s)
    return _ban_out(ban)


@router.delete("/api/v1/admin/bans", tags=["admin"], responses=_errors(404))
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


def _ms(when: datetime | None) -> int | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _health(request: Request, ready: dict[str, bool] | None) -> dict[str, Any]:
    rt = runtime_of(request)
    status = "ok" if ready is None or all(ready.values()) else "unavailable"
    return {
        "status": status,
        "instance": rt.settings.instance_id,
        "connections": len(rt.hub),
        "uptime_s": round(time.time() - rt.started_at, 3),
        "dependencies": {k: ("ok" if v else "down") for k, v in (ready or {}).items()},
    }


@router.get("/health", tags=["operations"])
async def health(request: Request) -> dict[str, Any]:
    """Liveness: the process answers."""
    return _health(request, None)


@router.get("/health/ready", tags=["operations"], responses={503: {"description": "a dependency is down"}})
async def health_ready(request: Request) -> JSONResponse:
    """Readiness: 503 when the store (or, when configured, Redis) is down."""
    rt = runtime_of(request)
    deps = {"store": await rt.store.ping(), "broker": await rt.broker.ready()}
    body = _health(request, deps)
    if rt.broker.foreign:
        body["warnings"] = [
            f"{rt.broker.foreign} broker message(s) from another deployment were ignored: this Redis "
            f"prefix ({rt.settings.redis_prefix!r}) is shared with another database. Give each "
            "deployment its own SCRIBE_EVENTS_REDIS_PREFIX."
        ]
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@router.get("/metrics", tags=["operations"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (every one of ours is prefixed ``scribe_events_``)."""
    owner = request.app.state.owner
    return Response(render(owner.metrics), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse((Path(__file__).parent.parent / "static" / "index.html").read_text())


def install(app: FastAPI, settings: Settings) -> None:
    app.include_router(router)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        """The document, with this deployment's batch limit in the publish body."""
        if app.openapi_schema is None:
            doc = generate()
            body = doc["paths"]["/api/v1/events"]["post"]["requestBody"]["content"]["application/json"]
            body["schema"]["oneOf"][1]["properties"]["events"]["maxItems"] = settings.max_batch_events
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
