"""Hostile clients against ``scribe-events serve`` (embedded defaults): what a huge head costs the server,
and how long a slowloris and a silent connection live. Prints one JSON line.

    .venv/bin/python benchmarks/hostile.py

Loopback only; every loop is bounded, so it stops by itself (at most about four and a half minutes).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
HUGE_BYTES = 64 * 1024 * 1024
CHUNK = 64 * 1024
SLOW_LIMIT_S = 45.0  # give up on a slow connection after this long (the default timeout is 10 s)
SECRET = "hostile-benchmark-" + "s" * 46


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def status_of(data: bytes) -> int | None:
    """The status of the response at the start of ``data``, if any."""
    if not data.startswith(b"HTTP/"):
        return None
    return int(data.split(b" ", 2)[1])


def read_rest(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (or the deadline); and whether it closed."""
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            got = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not got:
            return data, True
        data += got
    return data, False


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data, _ = read_rest(sock, time.monotonic() + 2)
            if status_of(data) == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the server did not become healthy")


def huge_head(port: int, pid: int) -> dict[str, Any]:
    """Send a 64 MiB header as fast as the socket takes it, until the server answers or closes."""
    before = rss_kib(pid)
    peak = before
    sent = 0
    chunk = b"a" * CHUNK
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        sock.setblocking(False)
        answered = b""
        while sent < HUGE_BYTES and time.monotonic() - started < 60:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            if sent % (1024 * 1024) < CHUNK:
                peak = max(peak, rss_kib(pid))
        took = time.monotonic() - started
        time.sleep(0.2)  # the server's RSS while this connection is still open (its state held)
        held = rss_kib(pid)
        sock.setblocking(True)
        answered, closed = read_rest(sock, time.monotonic() + 5)
    time.sleep(0.5)  # let the server drop the connection's state
    after = rss_kib(pid)
    return {
        "sent_bytes": sent,
        "status": status_of(answered),
        "closed_by_server": closed,
        "seconds": round(took, 3),
        "rss_before_kib": before,
        "rss_growth_open_kib": held - before,
        "rss_growth_peak_kib": max(peak, held, after) - before,
        "rss_growth_after_close_kib": after - before,
    }


def slow(port: int, every_s: float | None) -> dict[str, Any]:
    """A connection sending one header byte every ``every_s`` (None: nothing): how long it lives."""
    started = time.monotonic()
    data = b""
    closed = False
    with socket.create_connection((HOST, port), timeout=10) as sock:
        if every_s is not None:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - started < SLOW_LIMIT_S:
            got, closed = read_rest(sock, time.monotonic() + (every_s or 1.0))
            data += got
            if closed:
                break
            if every_s is not None:
                try:
                    sock.sendall(b"X")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
    return {
        "lived_s": round(time.monotonic() - started, 3),
        "closed_by_server": closed,
        "status": status_of(data),
        "gave_up_after_s": None if closed else SLOW_LIMIT_S,
    }


def main() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_EVENTS_")}
    env.update({"SCRIBE_EVENTS_JWT_SECRET": SECRET, "SCRIBE_EVENTS_ACCESS_LOG": "false"})
    with tempfile.TemporaryDirectory(prefix="scribe-hostile-") as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scribe_events_cli", "serve", "--host", HOST, "--port", str(port)],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_healthy(port, proc)
            # Three in a row: the first also pays for code paths run for the first time.
            attempts = [huge_head(port, proc.pid) for _ in range(3)]
            results: dict[str, Any] = {"label": "scribe-events hostile", "huge_head": attempts}
            slow_results: dict[str, dict[str, Any]] = {}

            def run(name: str, every_s: float | None) -> None:
                slow_results[name] = slow(port, every_s)

            threads = [
                threading.Thread(target=run, args=("slowloris", 1.0)),
                threading.Thread(target=run, args=("silent", None)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(SLOW_LIMIT_S + 15)
            results.update(slow_results)
            results["rss_end_kib"] = rss_kib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
