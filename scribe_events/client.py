"""A small client for a running scribe-events server: an SSE parser, a resuming follower, publishing.

Used by the command line (``tail``, ``publish``) and by the tests; it is also the start of the
publisher SDK.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from scribe_events.exceptions import ScribeEventsError

_LINES = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Message:
    """One dispatched SSE message."""

    event: str
    data: str
    id: str | None  # the ``id:`` field of this message, if it had one
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Incremental parser following the HTML living standard's event-stream rules."""

    def __init__(self) -> None:
        self._buffer = ""
        self._after_cr = False
        self._started = False  # a BOM is dropped only at the very start of the stream
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self.last_event_id: str | None = None

    def feed(self, text: str) -> list[Message]:
        if not text:
            return []  # nothing: in particular, not the end of a CR awaiting its LF
        if not self._started:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._after_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across two reads
        self._after_cr = text.endswith("\r")
        self._buffer += text
        lines = _LINES.split(self._buffer)
        self._buffer = lines.pop()  # an unfinished line (or "")
        out: list[Message] = []
        for line in lines:
            message = self._line(line)
            if message is not None:
                out.append(message)
        return out

    def _line(self, line: str) -> Message | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self._id = value
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> Message | None:
        data, event, id_, retry = self._data, self._event, self._id, self._retry
        self._data, self._event, self._id, self._retry = [], "", None, None
        if not data:
            return None
        return Message(event or "message", "\n".join(data), id_, retry)


class ClientError(ScribeEventsError):
    """The server refused a request, or could not be reached."""

    def __init__(self, message: str, *, status: int = 0, code: str = "client_error") -> None:
        super().__init__(message, code=code)
        self.status = status


def error_from(response: httpx.Response) -> ClientError:
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
        text = message if message.startswith(code) else f"{code}: {message}"  # no "banned: banned: …"
        return ClientError(text, status=response.status_code, code=code)
    except (ValueError, KeyError, TypeError):
        return ClientError(f"HTTP {response.status_code}", status=response.status_code)


def stream_url(
    base_url: str, *, session_id: str | None = None, types: str | None = None
) -> tuple[str, dict[str, str]]:
    params = {}
    if session_id:
        params["session_id"] = session_id
    if types:
        params["types"] = types
    return base_url.rstrip("/") + "/api/v1/events/stream", params


async def follow(
    base_url: str,
    token: str,
    *,
    session_id: str | None = None,
    types: str | None = None,
    last_event_id: str | None = None,
    idle_timeout_s: float = 90.0,
    max_delay_s: float = 30.0,
    on_status: Callable[[str, str], None] | None = None,
) -> AsyncIterator[Message]:
    """Yield messages forever, reconnecting with ``Last-Event-ID`` when the connection drops.

    Stops (raises :class:`ClientError`) only when the server refuses the request (4xx).
    """
    url, params = stream_url(base_url, session_id=session_id, types=types)
    parser = SSEParser()
    parser.last_event_id = last_event_id
    delay = 1.0
    retry_s: float | None = None
    timeout = httpx.Timeout(10.0, read=idle_timeout_s)
    async with httpx.AsyncClient(timeout=timeout) as client:
        while True:
            headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
            if parser.last_event_id:
                headers["Last-Event-ID"] = parser.last_event_id
            try:
                async with client.stream("GET", url, params=params, headers=headers) as response:
                    if response.status_code != 200:
                        await response.aread()
                        error = error_from(response)
                        if 400 <= response.status_code < 500 and response.status_code != 429:
                            raise error
                        raise httpx.TransportError(str(error))
                    delay = 1.0
                    async for text in response.aiter_text():
                        for message in parser.feed(text):
                            if message.retry is not None:
                                retry_s = message.retry / 1000
                            yield message
                reason = "the server closed the stream"
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            wait = retry_s if retry_s is not None and delay <= 1.0 else delay
            if on_status is not None:
                on_status("reconnecting", f"{reason}; reconnecting in {wait:.1f}s")
            await asyncio.sleep(wait)
            parser = _carry(parser)
            delay = min(delay * 2, max_delay_s)


def _carry(old: SSEParser) -> SSEParser:
    fresh = SSEParser()
    fresh.last_event_id = old.last_event_id
    return fresh


async def publish(
    base_url: str,
    token: str,
    body: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    timeout_s: float = 10.0,
) -> list[str]:
    """POST one event (or ``{"events": [...]}``); returns the ids."""
    headers = {"Authorization": f"Bearer {token}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        try:
            response = await client.post(base_url.rstrip("/") + "/api/v1/events", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {base_url}: {exc}", code="unreachable") from exc
    if response.status_code != 202:
        raise error_from(response)
    ids: list[str] = response.json()["ids"]
    return ids


async def request_json(
    base_url: str,
    token: str,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    params: dict[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> Any:
    """One authenticated API call; the contract's error body becomes a :class:`ClientError`."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        try:
            response = await client.request(
                method,
                base_url.rstrip("/") + path,
                json=json_body,
                params=params,
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {base_url}: {exc}", code="unreachable") from exc
    if response.status_code >= 400:
        raise error_from(response)
    return response.json()
