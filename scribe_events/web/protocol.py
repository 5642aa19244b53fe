"""uvicorn's httptools protocol, telling the app its socket transport, and a little lighter.

The stream writes each event's pre-built chunk straight to the transport (see ``hub.py``); with any
other server the stream falls back to ASGI ``send`` through :class:`~scribe_events.web.sinks.AsgiSink`.

Every byte of per-connection state is multiplied by the number of idle streams, so the protocol
also swaps uvicorn's pipelining ``deque`` (about 760 bytes, almost always empty) for a list.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TRANSPORT_EXTENSION = "scribe_events.transport"


class _Pipeline(list):  # type: ignore[type-arg]
    """The two deque operations uvicorn uses on its request pipeline, on a list."""

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class StreamingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.pipeline = _Pipeline()  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {TRANSPORT_EXTENSION: self.transport}  # type: ignore[typeddict-unknown-key,dict-item]
