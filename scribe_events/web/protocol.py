"""uvicorn's httptools protocol: telling the app its transport, bounding hostile clients, a little lighter.

The stream writes each event's pre-built chunk straight to the transport (see ``hub.py``); with any
other server the stream falls back to ASGI ``send`` through :class:`~scribe_events.web.sinks.AsgiSink`.

Hostile or careless clients: a request's head (request line and headers) may hold at most
``max_header_bytes`` (431), must arrive within ``header_timeout_s`` (408) of the connection's start or
of the previous response's end, and past ``max_connections`` open sockets a new one is answered 503.
httptools keeps a partly received header to itself before it calls ``on_header``, so the bytes are
counted as they are fed, in ``data_received``. Errors are the contract's JSON, then the socket closes.

Every byte of per-connection state is multiplied by the number of idle streams, so the protocol
also swaps uvicorn's pipelining ``deque`` and its two events' waiter deques (about 760 bytes each,
almost always empty) for lists, and keeps its own state in slots (not in the instance
``__dict__``, whose keys uvicorn already fills).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from scribe_events.config import Settings
from scribe_events.metrics import REJECTED

TRANSPORT_EXTENSION = "scribe_events.transport"
# The protocol itself: a stream sets its ``on_writable`` (called when the transport resumes writing).
PROTOCOL_EXTENSION = "scribe_events.protocol"
# After an error, how long the socket keeps reading (and dropping) what the client still sends: closing
# with unread input makes the kernel send a reset, which can destroy the answer before it is read.
LINGER_S = 2.0
# At most one "too many connections" warning this often (a flood would otherwise flood the log too).
WARN_EVERY_S = 10.0

log = logging.getLogger("scribe_events.web")
_last_warning = 0.0
Detach = Literal["detached", "gone", "queued"]


def error_bytes(
    status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    """A whole ``connection: close`` response with the contract's JSON error body."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [STATUS_LINE[status]]
    for name, value in [
        *(headers or []),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]:
        lines += [name, b": ", value, b"\r\n"]
    lines += [b"\r\n", body]
    return b"".join(lines)


def _lighter(event: asyncio.Event) -> None:
    """Keep an ``asyncio.Event``'s waiters in a list: its deque (about 760 bytes) is almost always
    empty, and every connection has two such events (uvicorn's flow control and request cycle).
    The event only appends, removes, counts and iterates its waiters, which a list does as well."""
    event._waiters = []  # type: ignore[assignment]


class _Pipeline(list):  # type: ignore[type-arg]
    """The two deque operations uvicorn uses on its request pipeline, on a list."""

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class StreamingHttpToolsProtocol(HttpToolsProtocol):
    __slots__ = ("_detached", "_head_bytes", "_rejected", "_timer", "on_lost", "on_writable")

    # The limits; build_server uses a subclass with the configured ones (see ``configured``).
    max_header_bytes: ClassVar[int] = Settings.model_fields["max_header_bytes"].default
    header_timeout_s: ClassVar[float] = Settings.model_fields["header_timeout_s"].default
    max_connections: ClassVar[int] = Settings.model_fields["max_connections"].default

    @classmethod
    def configured(cls, settings: Settings) -> type[StreamingHttpToolsProtocol]:
        """This protocol with the limits of ``settings`` (uvicorn makes the instances itself)."""
        limits = {
            "__slots__": (),
            "max_header_bytes": settings.max_header_bytes,
            "header_timeout_s": settings.header_timeout_s,
            "max_connections": settings.max_connections,
        }
        return cast(type[StreamingHttpToolsProtocol], type(cls.__name__, (cls,), limits))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes of the current request head so far; None once it is complete (until its message is).
        self._head_bytes: int | None = 0
        # The head's deadline, or after an error the end of the linger.
        self._timer: asyncio.TimerHandle | None = None
        self._rejected = False
        self.on_writable: Callable[[], None] | None = None
        # A stream the app has let go of (see detach): told when the socket closes.
        self.on_lost: Callable[[], None] | None = None
        self._detached = False

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_writable is not None:
            self.on_writable()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.pipeline = _Pipeline()  # type: ignore[assignment]
        _lighter(self.flow._is_writable_event)
        if len(self.connections) > self.max_connections:  # uvicorn has just added this one
            self._warn_too_many()
            self._reject(503, "too_many_connections", "this instance has too many open connections; retry")
            return
        # The clock starts now, not at the first byte, so a client that sends nothing is closed too.
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            # Once the transport is closed (as a request task would learn of it): a write in between
            # then raises, and the hub takes that as the client leaving, not as a cut.
            self.loop.call_soon(on_lost)
        # Break the cycles through this protocol (its scope's extensions, the stream's drain hook),
        # so a closed connection is freed at once, not by a full collection that must walk every
        # live object: after a thousand streams closed, that pause lasted hundreds of milliseconds.
        self.on_writable = None
        if self.scope is not None:
            self.scope.pop("extensions", None)

    def detach(self, scope: dict[str, Any], on_lost: Callable[[], None]) -> Detach:
        """Let the request's ASGI task end while its response goes on, written straight to the
        transport (a stream): no task, coroutine frames or waiter are held per idle stream, about
        1.3 KB. ``on_lost`` is called when the socket closes; anything the client still sends is
        dropped (an SSE client sends nothing, and no second response may start inside the stream).
        ``"gone"``: the client has left; ``"queued"``: a request pipelined behind this one already
        has its cycle, so this one cannot be let go: its task waits, and sets ``on_lost`` itself (uvicorn
        would tell only the queued request's cycle of the disconnect)."""
        cycle = self.cycle
        if cycle is None or cycle.disconnected or self.transport.is_closing():
            return "gone"
        self._detached = True  # what the client sends from now on is dropped
        # (The app may have copied the scope, e.g. with a forwarded client: its extensions are ours.)
        if cycle.scope.get("extensions") is not scope.get("extensions") or self.pipeline:
            # uvicorn stopped reading when the request was queued: read again (and drop what comes),
            # or the socket's close would be noticed only by a write failing.
            self.flow.resume_reading()
            return "queued"
        self.on_lost = on_lost
        cycle.response_complete = True  # for uvicorn: nothing more goes through this cycle
        return "detached"

    def data_received(self, data: bytes) -> None:
        if self._rejected or self._detached:
            return  # answered with an error (see _reject), or a stream (see detach): drop what comes
        limit = self.max_header_bytes
        start = 0
        while start < len(data) and not self._rejected and not self.transport.is_closing():
            head = self._head_bytes
            if head is None:
                # A body. Fed in slices so that a head starting inside one is counted from the next:
                # a pipelined head can go uncounted for at most one slice.
                size = limit
            elif head >= limit:
                self._reject(431, "headers_too_large", f"the request's headers exceed {limit} bytes")
                return
            else:
                # Only what the head may still hold: past it, the head must have ended in this slice.
                size = limit - head
                self._head_bytes = head + min(size, len(data) - start)
            piece = data if start == 0 and size >= len(data) else data[start : start + size]
            start += size
            super().data_received(piece)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {TRANSPORT_EXTENSION: self.transport, PROTOCOL_EXTENSION: self}  # type: ignore[typeddict-unknown-key,dict-item]

    def on_headers_complete(self) -> None:
        # From here on no header timer: a stream may stay open for hours.
        self._head_bytes = None
        self._cancel_timer()
        super().on_headers_complete()
        if self.cycle is not None:
            _lighter(self.cycle.message_event)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes = 0  # the next request's head starts with the next byte

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Idle, the connection is uvicorn's keep-alive timeout's; once the next head has begun (its
        # bytes cancel that timeout), it is ours. A pipelined request already running keeps it unarmed.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._start_head_timer()

    def _start_head_timer(self) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._head_bytes is None:
            # Still the body of a request already answered: there is nothing left to answer.
            self.transport.close()
            return
        seconds = f"{self.header_timeout_s:g}"
        self._reject(408, "request_timeout", f"the request's headers did not arrive within {seconds} s")

    def _reject(self, status: int, code: str, message: str) -> None:
        """Answer with an error and close: at once after a FIN, fully once the client closes or lingers."""
        self._rejected = True
        REJECTED[code] += 1
        self._cancel_timer()
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return  # already on its way out (connection_lost is coming)
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is under way (a pipelined head): an error now would land inside it.
            self.transport.close()
            return
        extra = [(b"retry-after", b"1")] if status == 503 else []
        self.transport.write(error_bytes(status, code, message, self.server_state.default_headers + extra))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _warn_too_many(self) -> None:
        global _last_warning
        now = time.monotonic()
        if now - _last_warning >= WARN_EVERY_S:
            _last_warning = now
            log.warning("%d connections open (max_connections): refusing new ones", len(self.connections))
