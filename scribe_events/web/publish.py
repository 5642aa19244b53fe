"""``POST /api/v1/events``: publishing, answered before FastAPI's routing.

A worker's progress updates arrive one HTTP request each, so this path's cost per request is the
service's publish rate. FastAPI's middleware, dependency solving and response model took about
half of it; here a request costs the checks themselves. The route in ``routes`` documents it in
the OpenAPI document and runs the same :func:`accept` (it is reached only while the service starts
or stops, and answers 503 then).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from scribe_events.auth import ROLE_ADMIN, ROLE_PUBLISHER
from scribe_events.events import Event
from scribe_events.exceptions import BadRequest, InvalidJSON, ScribeEventsError, ValidationFailed
from scribe_events.ids import IDEMPOTENCY_KEY
from scribe_events.runtime import Runtime
from scribe_events.service import request_fingerprint
from scribe_events.vocabulary import parse_publish
from scribe_events.web.errors import INTERNAL_ERROR, send_error
from scribe_events.web.stream import cors_headers

log = logging.getLogger("scribe_events.web")

PUBLISH_PATH = "/api/v1/events"


async def accept(
    rt: Runtime, authorization: str | None, ip: str | None, idempotency_key: str | None, body: bytes
) -> list[str]:
    """Check, store and send one publish request; the ids of its events, in order."""
    principal = await rt.admission.caller(authorization, ip)
    principal.require(ROLE_PUBLISHER, ROLE_ADMIN)
    await rt.admission.limit("publish", principal, ip)
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise BadRequest(
            "Idempotency-Key must be 1-200 visible ASCII characters", code="invalid_idempotency_key"
        )
    s = rt.settings
    events = parse_body(body, s.max_event_bytes, s.max_batch_events, s.max_data_depth)
    return await rt.service.publish(
        principal, events, idempotency_key=idempotency_key, request_hash=request_fingerprint(body)
    )


def parse_body(body: bytes, max_event_bytes: int, max_batch: int, max_depth: int = 32) -> list[Event]:
    """One event, or ``{"events": [...]}`` of at most ``max_batch``."""
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


def ids_body(ids: list[str]) -> bytes:
    """``{"ids": [...]}`` (ids are a sequence number or ``L`` and one: nothing to escape)."""
    return b'{"ids":["' + '","'.join(ids).encode() + b'"]}' if ids else b'{"ids":[]}'


async def handle(rt: Runtime, scope: dict[str, Any], body: bytes, send: Any) -> None:
    authorization = idempotency_key = origin = None
    for name, value in scope["headers"]:  # the first of each, as Starlette's headers.get
        if name == b"authorization":
            authorization = authorization or value.decode("latin-1")
        elif name == b"idempotency-key":
            idempotency_key = idempotency_key or value.decode("latin-1")
        elif name == b"origin":
            origin = origin or value
    cors = cors_headers(rt.settings, origin)
    client = scope.get("client")
    try:
        ids = await accept(rt, authorization, client[0] if client else None, idempotency_key, body)
    except ScribeEventsError as exc:
        rt.requests.refused(exc)
        if exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        await send_error(send, exc, cors, body_read=True)
        return
    except Exception as exc:  # as FastAPI's last handler: logged, answered 500 in the contract's form
        log.error("unexpected error", exc_info=exc)
        await send_error(send, INTERNAL_ERROR, cors, body_read=True)
        return
    answer = ids_body(ids)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer)), *cors]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
