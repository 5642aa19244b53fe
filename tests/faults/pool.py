"""A pool of resuming SSE clients on raw sockets, all on one asyncio loop in a background thread.

Each client follows one user's stream; when its connection ends (closed, reset, refused, or no
byte for ``read_timeout`` s — heartbeats come every second) it reconnects to its next target with
``Last-Event-ID`` set to the last id it saw. Every loop is bounded in attempts and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from scribe_events.auth import mint_token
from scribe_events.client import SSEParser
from tests.faults.ledger import Ledger
from tests.harness import SECRET

CONTROL = {"heartbeat", "connection.established", "replay.truncated"}
MAX_ATTEMPTS = 400


@dataclass
class Client:
    name: str
    user: str
    targets: list[int]  # ports, the first one first; the client moves on to the next after a drop
    rcvbuf: int | None = None  # SO_RCVBUF (a slow consumer's small window)
    reader_limit: int = 64 * 1024  # asyncio's StreamReader buffer limit
    ids: list[int] = field(default_factory=list)  # every event id received, in arrival order
    last_id: str | None = None
    connects: int = 0  # 200 responses
    established: int = 0
    truncated: int = 0  # replay.truncated notices (would mean a gap)
    drops: Counter[str] = field(default_factory=Counter)  # why connections ended
    refused: Counter[int] = field(default_factory=Counter)  # non-200 statuses
    instances: list[str] = field(default_factory=list)  # the instance of each connection
    hold_until: float = 0.0  # monotonic time before which the client does not read (slow consumer)
    current: int = 0
    done: bool = False


class ClientPool:
    def __init__(self, clients: list[Client], *, read_timeout: float = 3.0, lifetime: float = 90.0) -> None:
        self.clients = clients
        self.read_timeout = read_timeout
        self.deadline = time.monotonic() + lifetime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._thread = threading.Thread(target=self._thread_main, name="client-pool", daemon=True)

    # -- the test's side ---------------------------------------------------------------------------

    def start(self) -> ClientPool:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the client pool did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the client pool did not stop"

    def wait_connected(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while any(c.established == 0 for c in self.clients):
            if time.monotonic() > end:
                late = [c.name for c in self.clients if c.established == 0]
                raise TimeoutError(f"clients never connected: {late[:10]}")
            time.sleep(0.02)

    def wait_delivered(self, ledger: Ledger, timeout: float) -> bool:
        """Until every client has every id meant for its user (or ``timeout``); True if they all have."""
        end = time.monotonic() + timeout
        wanted = {c.user: set(ledger.meant_for(c.user)) for c in self.clients}
        while time.monotonic() < end:
            if all(wanted[c.user] <= set(c.ids) for c in self.clients):
                return True
            time.sleep(0.05)
        return False

    def kick(self, names: list[str]) -> None:
        """Close these clients' current connections from the client side (they resume)."""
        assert self._loop is not None

        def close() -> None:
            for name in names:
                writer = self._writers.get(name)
                if writer is not None:
                    writer.transport.abort()

        self._loop.call_soon_threadsafe(close)

    def received(self) -> dict[str, tuple[str, list[int]]]:
        return {c.name: (c.user, list(c.ids)) for c in self.clients}

    @property
    def reconnects(self) -> int:
        return sum(max(0, c.connects - 1) for c in self.clients)

    # -- the loop's side ---------------------------------------------------------------------------

    def _thread_main(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        tasks = [asyncio.create_task(self._follow(c), name=c.name) for c in self.clients]
        self._ready.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, self.deadline - time.monotonic()))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, c: Client) -> None:
        failures = 0
        for _ in range(MAX_ATTEMPTS):
            if time.monotonic() > self.deadline:
                break
            port = c.targets[c.current % len(c.targets)]
            before = c.established
            try:
                reason = await self._session(c, port)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                reason = type(exc).__name__
            finally:
                self._writers.pop(c.name, None)
            c.drops[reason] += 1
            c.current += 1  # the next attempt goes to the next instance
            failures = 0 if c.established > before else failures + 1
            await asyncio.sleep(min(0.05 * 2**failures, 1.0))
        c.done = True

    async def _session(self, c: Client, port: int) -> str:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if c.rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, c.rcvbuf)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 2.0)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=c.reader_limit)
        self._writers[c.name] = writer
        try:
            lines = [
                "GET /api/v1/events/stream HTTP/1.1",
                "Host: 127.0.0.1",
                "Accept: text/event-stream",
                f"Authorization: Bearer {mint_token(SECRET, c.user)}",
            ]
            if c.last_id is not None:
                lines.append(f"Last-Event-ID: {c.last_id}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                c.refused[status] += 1
                return f"status {status}"
            c.connects += 1
            parser = SSEParser()
            while True:
                while c.hold_until > time.monotonic():  # a slow consumer: read nothing for a while
                    await asyncio.sleep(0.02)
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), self.read_timeout)
                size = int(size_line.strip(), 16)
                if size == 0:
                    return "end of body"
                payload = await asyncio.wait_for(reader.readexactly(size + 2), self.read_timeout)
                for m in parser.feed(payload[:-2].decode("utf-8")):
                    if m.event == "connection.established":
                        c.established += 1
                        c.instances.append(str(json.loads(m.data)["instance"]))
                    elif m.event == "replay.truncated":
                        c.truncated += 1
                    elif m.event not in CONTROL and m.id is not None and m.id.isdigit():
                        c.ids.append(int(m.id))
                    if m.id is not None:
                        c.last_id = m.id
        finally:
            writer.transport.abort()
