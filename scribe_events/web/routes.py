"""FastAPI routes: tickets, publishing, polling, client config, health, metrics, the index page.
(The stream itself is served by ``stream``; admin routes are in ``admin``.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from scribe_events.auth import mint_token
from scribe_events.config import Settings
from scribe_events.events import TypeFilter
from scribe_events.exceptions import NotFound, NotReady
from scribe_events.ids import check_text_id
from scribe_events.metrics import CONTENT_TYPE, render
from scribe_events.service import dump_with_raw
from scribe_events.web import admin, stream, tasks
from scribe_events.web.deps import AUTH_ERRORS, Caller, UserId, bearer, client_ip, errors, runtime_of
from scribe_events.web.publish import PUBLISH_PATH, accept


class TicketOut(BaseModel):
    ticket: str
    expires_in: int


class PublishedOut(BaseModel):
    ids: list[str]


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
        "task_id": {**_ID, "description": "the audience: the task's owner and readers (see grants)"},
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
    responses={200: {"content": {"text/event-stream": {}}}, **errors(429)},
)
async def open_stream(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
    session_id: str | None = None,
    types: Annotated[str | None, Query(description="comma-separated globs, e.g. task.*")] = None,
    last_event_id: str | None = None,
    ticket: str | None = None,
) -> Response:
    """Documented here; served by the stream handler (`scribe_events.web.stream`), which answers the
    path before FastAPI's routing. Send `Authorization: Bearer`, or `ticket=` from a browser."""
    raise NotReady("the service is starting")


@router.post("/api/v1/events/tickets", tags=["stream"], response_model=TicketOut, responses=errors(429))
async def issue_ticket(request: Request, principal: Caller) -> TicketOut:
    """A single-use ticket (30 s) for `GET /api/v1/events/stream?ticket=…`, for `EventSource`."""
    rt = runtime_of(request)
    await rt.admission.limit("tickets", principal, client_ip(request))
    ticket = await rt.state.issue_ticket(
        principal, rt.settings.ticket_ttl_s, per_user=rt.settings.max_tickets_per_user
    )
    return TicketOut(ticket=ticket, expires_in=rt.settings.ticket_ttl_s)


@router.post(
    PUBLISH_PATH,
    tags=["publish"],
    status_code=202,
    response_model=PublishedOut,
    openapi_extra=_publish_body(Settings.model_fields["max_batch_events"].default),
    responses=errors(409),
)
async def publish(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> PublishedOut:
    """Publish one event or `{"events": [...]}` (roles `publisher`, `admin`). Important events are
    committed to the store before anyone is sent them; the answer carries their ids in order.
    (Served by `scribe_events.web.publish`, before FastAPI's routing, with the same checks.)"""
    rt = runtime_of(request)
    ids = await accept(
        rt, request.headers.get("authorization"), client_ip(request), idempotency_key, await request.body()
    )
    return PublishedOut(ids=ids)


@router.get("/api/v1/events", tags=["polling"], responses=AUTH_ERRORS)
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
    await rt.admission.limit("polling", principal, client_ip(request))
    body = await rt.service.poll(
        principal,
        rt.admission.session(principal, session_id),
        after,
        limit,
        TypeFilter.parse(types, max_globs=rt.settings.max_type_globs),
    )
    return Response(dump_with_raw(body), media_type="application/json")


@router.get("/api/v1/events/config", tags=["polling"], responses=AUTH_ERRORS)
async def client_config(request: Request, principal: Caller) -> dict[str, Any]:
    """How this user's client should connect: push mode, intervals, reconnect policy."""
    return runtime_of(request).service.config_for(principal)


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
    """Readiness: 503 when the store (or, when configured, Redis) is down, or while the instance
    drains for a restart (`"draining": true`). Also says whether the
    metric history can be kept, which thresholds are exceeded, and the event loop's lag."""
    rt = runtime_of(request)
    deps = {"store": await rt.store.ping(), "broker": await rt.broker.ready()}
    body = _health(request, deps)
    if rt.hub.closing:  # draining for a restart: send new streams elsewhere
        body["status"] = "unavailable"
        body["draining"] = True
    # Not a reason to refuse traffic: the report's history (Redis or the store) and the thresholds.
    body["dependencies"]["history"] = "ok" if rt.monitor.history_ok else "down"
    body["thresholds_exceeded"] = sorted(k for k, over in rt.monitor.exceeded.items() if over)
    body["event_loop_lag_s"] = round(rt.monitor.loop_lag, 4)
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


STATIC = Path(__file__).parent.parent / "static"


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    """The demo page, built on the browser client (``/static/scribe-events.js``)."""
    return HTMLResponse((STATIC / "index.html").read_text())


class DevTokenIn(BaseModel):
    user_id: UserId = "demo"


@router.post("/api/v1/dev/token", include_in_schema=False)
async def dev_token(request: Request, body: DevTokenIn) -> dict[str, Any]:
    """Development only: a token for any user, signed with the generated dev secret, for the demo
    page's one-click button. Answers 404 unless the server runs in development on its generated
    secret and the caller is on this machine."""
    rt = runtime_of(request)
    s = rt.settings
    peer = request.client.host if request.client else ""
    local = peer in ("127.0.0.1", "::1", "localhost")
    if s.environment != "development" or s.jwt_secret or s.jwt_public_key or not local:
        raise NotFound("not found")
    secret = s.signing_secret()
    if secret is None:
        raise NotFound("not found")
    user = check_text_id(body.user_id, "user_id")
    return {"token": mint_token(secret, user, ttl_s=24 * 3600), "user_id": user, "expires_in": 24 * 3600}


def install(app: FastAPI, settings: Settings) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(admin.router)
    app.include_router(tasks.router)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        """The document, with this deployment's batch limit in the publish body."""
        if app.openapi_schema is None:
            doc = generate()
            body = doc["paths"]["/api/v1/events"]["post"]["requestBody"]["content"]["application/json"]
            body["schema"]["oneOf"][1]["properties"]["events"]["maxItems"] = settings.max_batch_events
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
