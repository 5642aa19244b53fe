"""uvicorn's httptools protocol, telling the app its socket transport.

The stream writes each event's pre-built chunk straight to the transport (see ``hub.py``); with any
other server the stream falls back to ASGI ``send`` through :class:`~scribe_events.web.sinks.AsgiSink`.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TRANSPORT_EXTENSION = "scribe_events.transport"


class StreamingHttpToolsProtocol(HttpToolsProtocol):
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {TRANSPORT_EXTENSION: self.transport}  # type: ignore[typeddict-unknown-key]
