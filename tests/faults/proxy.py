"""A small TCP proxy on 127.0.0.1 that can stall: while paused it forwards nothing, either way."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from typing import Any


class PausingProxy:
    """Listens on a socket it binds and forwards every connection to ``127.0.0.1:target``.

    ``pause()`` stops forwarding (bytes wait in the kernel buffers, as on a stalled link; no
    connection is closed), ``resume()`` starts again. One thread, one selector, bounded waits.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(512)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._pending: dict[socket.socket, bytes] = {}  # bytes read but not yet written to the peer
        self._thread = threading.Thread(target=self._run, name=f"proxy-{self.port}", daemon=True)
        self.accepted = 0

    def start(self) -> PausingProxy:
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._thread.start()
        return self

    def pause(self) -> None:
        self.paused.set()

    def resume(self) -> None:
        self.paused.clear()

    @property
    def open_pairs(self) -> int:
        return len(self._peers) // 2

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.05):
                sock: Any = key.fileobj
                if sock is self.listener:
                    self._accept()
                elif not self.paused.is_set():
                    self._forward(sock)
            if self.paused.is_set() or any(self._pending.values()):
                time.sleep(0.005)  # readable sockets stay readable: do not spin while stalled
            else:
                self._flush()

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            client, _ = self.listener.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()  # the instance is gone: the client sees the connection end
                return
            for s in (client, upstream):
                s.setblocking(False)
                self._sel.register(s, selectors.EVENT_READ)
            self._peers[client], self._peers[upstream] = upstream, client
            self.accepted += 1

    def _forward(self, sock: socket.socket) -> None:
        peer = self._peers.get(sock)
        if peer is None:
            return
        if self._pending.get(peer):
            return  # the peer is backed up: read no more from this side until it drains
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        self._pending[peer] = data
        self._flush()

    def _flush(self) -> None:
        for sock, data in list(self._pending.items()):
            if not data or sock not in self._peers:
                self._pending.pop(sock, None)
                continue
            try:
                sent = sock.send(data)
            except BlockingIOError:
                continue
            except OSError:
                self._drop(sock)
                continue
            self._pending[sock] = data[sent:]

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peers.pop(s, None)
            self._pending.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for s in list(self._peers):
            self._drop(s)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self.listener)
        self.listener.close()
        self._sel.close()

    def __enter__(self) -> PausingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
