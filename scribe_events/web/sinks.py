"""A write-buffer-like sink over ASGI ``send``, for servers that do not expose the transport."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from scribe_events import sse
from scribe_events.tasks import cancel, spawn


class AsgiSink:
    """Looks like a transport to the hub: ``write`` queues bytes and a task sends them.

    The hub bounds the queued size exactly as it bounds a socket's write buffer.
    """

    def __init__(self, send: Any) -> None:
        self._send = send
        self._queue: deque[bytes] = deque()
        self._size = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._aborted = False
        self._task = spawn(self._run(), "scribe-asgi-sink")
        self.on_writable: Callable[[], None] | None = None  # told when everything queued was sent

    def write(self, data: bytes) -> None:
        if self._closing:
            raise RuntimeError("the stream is closing")
        self._queue.append(data)
        self._size += len(data)
        self._wake.set()

    def get_write_buffer_size(self) -> int:
        return self._size

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def abort(self) -> None:
        self._closing = self._aborted = True
        self._queue.clear()
        self._size = 0
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                data = self._queue.popleft()
                self._size -= len(data)
                if data != sse.CHUNK_END:
                    await self._send(
                        {"type": "http.response.body", "body": sse.unchunk(data), "more_body": True}
                    )
            if self.on_writable is not None and not self._closing:
                self.on_writable()
            if self._closing:
                if not self._aborted:
                    await self._send({"type": "http.response.body", "body": b"", "more_body": False})
                return

    async def wait_closed(self, receive: Any) -> None:
        """Until the client goes away or the sink is closed; then stop both."""

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        listener = spawn(disconnected(), "scribe-asgi-disconnect")
        await asyncio.wait({listener, self._task}, return_when=asyncio.FIRST_COMPLETED)
        await cancel(listener)
        await cancel(self._task)
