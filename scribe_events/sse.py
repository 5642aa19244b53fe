"""Server-Sent Events wire encoding. Nothing else in the service writes frames.

A frame is ``[retry: N\\n][id: I\\n][event: T\\n]data: D\\n[data: D\\n...]\\n``. ``id`` and ``event``
values may never hold CR, LF or NUL (refused); a ``data`` value that holds line breaks is split into
several ``data:`` lines, which a client joins back with ``\\n``. So no payload can end a frame early or
start a new one.

Streams are sent as HTTP/1.1 chunked bodies, and the hub writes pre-framed chunks straight to the
socket, so each event is also wrapped as a chunk here, once.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\x00]")

CHUNK_END = b"0\r\n\r\n"


def check_field(value: str, name: str) -> None:
    """Refuse a field value that could end a line (``id`` and ``event`` are one line each)."""
    if _FORBIDDEN_IN_FIELD.search(value):
        raise ValueError(f"an SSE {name} may not contain CR, LF or NUL")


def frame(data: str, *, event: str | None = None, id: str | None = None, retry: int | None = None) -> bytes:
    """Encode one SSE frame as UTF-8 bytes (ValueError for what cannot be framed: CR, LF or NUL
    in ``id`` or ``event``, or text UTF-8 cannot carry, such as a lone surrogate)."""
    parts: list[str] = []
    if retry is not None:
        parts.append(f"retry: {int(retry)}\n")
    if id is not None:
        check_field(id, "id")
        parts.append(f"id: {id}\n")
    if event is not None:
        check_field(event, "event name")
        parts.append(f"event: {event}\n")
    if "\n" in data or "\r" in data:
        parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    else:
        parts.append(f"data: {data}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def chunk(payload: bytes) -> bytes:
    """Wrap bytes as one HTTP/1.1 chunk (``<hex length>\\r\\n<payload>\\r\\n``)."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def unchunk(data: bytes) -> bytes:
    """The payload of one chunk made by :func:`chunk`."""
    start = data.index(b"\r\n") + 2
    return data[start:-2]
