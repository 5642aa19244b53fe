"""What every route shares: the caller, the runtime, the documented error answers, id fields."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field

from scribe_events.auth import Principal
from scribe_events.exceptions import StoreUnavailable
from scribe_events.runtime import Runtime
from scribe_events.service import MAX_ID

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
    429: "too many streams or tickets, or past a rate limit (Retry-After)",
    431: "the request's headers are over the limit",
    503: "not ready, shutting down, a dependency unavailable or too many connections: retry (Retry-After)",
}
# What any request may be answered, before or beside its route: the protocol (408, 431, 503), the
# body reader (400, 408, 413), admission (401, 403, 429) and validation (422).
_COMMON = (400, 401, 403, 408, 413, 422, 429, 431, 503)


def errors(*extra: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"description": _WHY[status], "content": {"application/json": {"schema": _ERROR_BODY}}}
        for status in sorted({*_COMMON, *extra})
    }


AUTH_ERRORS = errors()
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <JWT>`")


async def authenticate(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None
) -> Principal:
    """The caller, from ``Authorization: Bearer <jwt>``; banned users and addresses get 403.
    (The ``HTTPBearer`` dependency only documents the scheme; admission reads the header itself.)"""
    return await runtime_of(request).admission.caller(
        request.headers.get("authorization"), client_ip(request)
    )


Caller = Annotated[Principal, Depends(authenticate)]


def client_ip(request: Request) -> str | None:
    """The client's address (behind trusted proxies, the one they forwarded; see proxies.py)."""
    return request.client.host if request.client else None


def runtime_of(request: Request) -> Runtime:
    """The lifespan's runtime; 503 ``not_ready`` while the service starts or stops."""
    runtime: Runtime | None = request.app.state.owner.runtime
    if runtime is None:
        raise StoreUnavailable("the service is starting or stopping", code="not_ready")
    return runtime


UserId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")]
EventId = Annotated[int, Field(ge=1, le=MAX_ID)]


def ms(when: datetime | None) -> int | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)
