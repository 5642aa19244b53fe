"""Real servers over real sockets for the tests: an in-thread uvicorn, a subprocess, a raw stream reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from scribe_events.auth import mint_token
from scribe_events.client import Message, SSEParser
from scribe_events.config import Settings
from scribe_events.server import build_server

SECRET = "test-secret-" + "x" * 60


class IsolatedSettings(Settings):
    """Settings from what the test says only: never the runner's SCRIBE_EVENTS_*, .env or
    scribe-events.toml (a variable in the shell must not change what a test checks)."""

    model_config = {**Settings.model_config, "env_file": None, "toml_file": None}  # type: ignore[typeddict-item]

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, **_: Any) -> tuple[Any, ...]:
        return (init_settings,)


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ThreadServer:
    """scribe-events under uvicorn (our protocol, uvloop) in a background thread, on its own port."""

    def __init__(self, db_path: Path, *, http: str | None = None, **overrides: Any) -> None:
        self.db_path = db_path
        self.http = http  # a uvicorn protocol name: run without our streaming protocol
        self.overrides = overrides
        self.sock: socket.socket | None = None
        self.port = 0
        self._thread: threading.Thread | None = None
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> Settings:
        values: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{self.db_path}",
            "jwt_secret": SECRET,
            "access_log": False,
            "log_level": "warning",
            "instance_id": "test-instance",
            "gc_freeze": False,  # gc.freeze() is for a server process, not for the test runner's
            # The configured windows exactly (a busy test machine's lag must not widen them);
            # tests/test_adaptive.py switches it on.
            "adaptive_load": False,
            # Tests send forged tokens from 127.0.0.1 on purpose; tests/test_ratelimit.py switches
            # automatic bans on (and so do server processes, unless a test says otherwise).
            "auto_ban_failures": 0,
        }
        values.update(self.overrides)
        return IsolatedSettings(**values)

    def start(self) -> ThreadServer:
        self.sock = bound_socket()
        self.port = self.sock.getsockname()[1]
        self.server = build_server(self.settings(), **({"http": self.http} if self.http else {}))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(15)
        self._thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    @property
    def runtime(self) -> Any:
        return self.server.scribe_app.runtime

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's own event loop (to drive its parts directly) and wait."""
        loop = self.runtime.hub._heartbeat.get_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def connections(self) -> int:
        return int(httpx.get(self.url + "/health").json()["connections"])

    def token(self, user: str, **kw: Any) -> str:
        return mint_token(SECRET, user, **kw)

    def publisher(self) -> str:
        return self.token("worker", roles=["publisher"])

    def publish(self, body: dict[str, Any], *, headers: dict[str, str] | None = None) -> httpx.Response:
        h = {"Authorization": f"Bearer {self.publisher()}", **(headers or {})}
        return httpx.post(self.url + "/api/v1/events", json=body, headers=h, timeout=10)

    def publish_ok(self, body: dict[str, Any]) -> list[str]:
        r = self.publish(body)
        assert r.status_code == 202, r.text
        return list(r.json()["ids"])

    def stream(
        self,
        user: str | None = None,
        *,
        token: str | None = None,
        path: str = "/api/v1/events/stream",
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> RawStream:
        h = dict(headers or {})
        if token is None and user is not None:
            token = self.token(user)
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return RawStream(self.port, path, h, **kw)


class RawStream:
    """An SSE client on a plain socket: exact bytes in, disconnects exactly when we say."""

    def __init__(
        self,
        port: int,
        path: str,
        headers: dict[str, str],
        *,
        rcvbuf: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        lines = [
            f"GET {path} HTTP/1.1",
            "Host: 127.0.0.1",
            "Accept: text/event-stream",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.timeout = timeout
        self.raw = b""  # everything received, as sent on the wire
        self.body = b""  # the de-chunked body
        self._pending = b""
        self.ended = False  # the terminating chunk arrived
        self.closed = False  # the server closed the socket
        self.parser = SSEParser()
        self.messages: list[Message] = []
        self.status, self.headers, self.error_body = self._read_head()

    def _recv(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.closed:
            return False
        ready, _, _ = select.select([self.sock], [], [], remaining)
        if not ready:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.raw += data
        self._pending += data
        return True

    def _read_head(self) -> tuple[int, dict[str, str], Any]:
        deadline = time.monotonic() + self.timeout
        while b"\r\n\r\n" not in self._pending:
            if not self._recv(deadline):
                raise TimeoutError(f"no response head; got {self.raw!r}")
        head, _, self._pending = self._pending.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        error_body = None
        if status != 200:
            length = int(headers.get("content-length", "0"))
            while len(self._pending) < length and self._recv(deadline):
                pass
            error_body = json.loads(self._pending[:length]) if length else None
        return status, headers, error_body

    def _dechunk(self) -> None:
        while True:
            line_end = self._pending.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self._pending[:line_end], 16)
            if size == 0:
                if len(self._pending) >= line_end + 4:
                    self.ended = True
                    self._pending = b""
                return
            if len(self._pending) < line_end + 2 + size + 2:
                return
            payload = self._pending[line_end + 2 : line_end + 2 + size]
            assert self._pending[line_end + 2 + size : line_end + 4 + size] == b"\r\n"
            self._pending = self._pending[line_end + 4 + size :]
            self.body += payload
            self.messages.extend(self.parser.feed(payload.decode("utf-8")))

    def read_until(self, predicate: Any, timeout: float | None = None) -> list[Message]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._dechunk()
        while not predicate(self.messages):
            if not self._recv(deadline):
                self._dechunk()
                if predicate(self.messages):
                    break
                raise TimeoutError(f"condition not met; messages so far: {[m.event for m in self.messages]}")
            self._dechunk()
        return self.messages

    def read_count(self, n: int, *, event: str | None = None, timeout: float | None = None) -> list[Message]:
        def enough(ms: list[Message]) -> bool:
            return len(self.events(event)) >= n

        self.read_until(enough, timeout)
        return self.events(event)

    def events(self, event: str | None = None, *, skip_control: bool = True) -> list[Message]:
        out = []
        for m in self.messages:
            if event is not None:
                if m.event == event:
                    out.append(m)
            elif not skip_control or m.event not in (
                "heartbeat",
                "connection.established",
                "replay.truncated",
            ):
                out.append(m)
        return out

    def idle(self, seconds: float) -> None:
        """Read whatever arrives for a while (to show nothing more comes)."""
        deadline = time.monotonic() + seconds
        while self._recv(deadline):
            pass
        self._dechunk()

    def wait_closed(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not close the stream")
            self._recv(deadline)
        self._dechunk()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def free_port() -> int:
    with contextlib.closing(bound_socket()) as sock:
        return int(sock.getsockname()[1])


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``scribe-events ARGS`` as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_EVENTS_")}
    full_env.update(env or {})
    full_env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "scribe_events_cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> float:
    """Poll until true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
    return time.monotonic() - start


class ProcessServer:
    """``scribe-events serve`` as a subprocess, on a socket the test bound (``--fd``)."""

    def __init__(
        self,
        cwd: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        """With ``port``, the server binds it itself (``--port``); otherwise it gets our socket (``--fd``)."""
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_EVENTS_")}
        self.env.update(env or {})
        self.args = args or []
        self.sock = None if port else bound_socket()
        self.port = port or self.sock.getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> ProcessServer:
        if self.sock is not None:
            where = ["--fd", str(self.sock.fileno())]
            fds: tuple[int, ...] = (self.sock.fileno(),)
        else:
            where, fds = ["--port", str(self.port)], ()
        self.output = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scribe_events_cli", "serve", *where, *self.args],
            cwd=self.cwd,
            env={**self.env, "COLUMNS": "200"},
            pass_fds=fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(self._healthy, timeout, 0.05)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("server exited:\n" + "".join(self.output))
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = 2, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def text(self) -> str:
        return "".join(self.output)


@contextlib.contextmanager
def running(db_path: Path, **overrides: Any) -> Iterator[ThreadServer]:
    server = ThreadServer(db_path, **overrides).start()
    try:
        yield server
    finally:
        server.stop()
