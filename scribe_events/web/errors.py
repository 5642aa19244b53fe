"""Every error leaves as the contract's JSON: ``{"error": {"code", "message"}}`` with its status."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scribe_events.exceptions import ScribeEventsError

log = logging.getLogger("scribe_events.web")

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    413: "payload_too_large",
    429: "rate_limited",
}


# What an unexpected exception is answered (it is logged, never shown).
INTERNAL_ERROR = ScribeEventsError("an unexpected error occurred; it has been logged")


def error_response(exc: ScribeEventsError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def send_error(
    send: Any,
    exc: ScribeEventsError,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    body_read: bool = False,
) -> None:
    """Answer a raw ASGI request with the contract's error (the stream, publishing, the body reader).
    ``body_read``: the whole body was read, so the connection may go on whatever the error."""
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    headers += list(extra_headers)
    if (
        exc.status in (408, 413) and not body_read
    ):  # the body was not read to its end: the connection cannot go on
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    @app.exception_handler(ScribeEventsError)
    async def _domain(request: Request, exc: ScribeEventsError) -> JSONResponse:
        request.app.state.owner.requests.refused(exc)
        if exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(_body("invalid_json", "the body is not valid JSON"), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header"))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid"))
        return JSONResponse(_body("validation_error", message), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return JSONResponse(
            _body(code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return error_response(INTERNAL_ERROR)
