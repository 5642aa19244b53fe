"""Hostile clients at the protocol: oversized heads (431), slow heads (408), too many sockets (503)."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt

from tests.conftest import MakeServer
from tests.harness import SECRET, ThreadServer, wait_for


class Answer:
    """One response read off a raw socket, and whether the server closed the socket after it."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, closed: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.closed = closed

    def error(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        assert int(self.headers["content-length"]) == len(self.body)
        assert self.headers["connection"] == "close"
        return json.loads(self.body)["error"]


@contextlib.contextmanager
def connect(server: ThreadServer) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        yield sock
    finally:
        sock.close()


def _recv(sock: socket.socket, deadline: float) -> bytes | None:
    """Some bytes, b"" once the server closed, None when nothing came before the deadline."""
    ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        return None
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def read_answer(sock: socket.socket, timeout: float = 5.0, pending: bytes = b"") -> Answer:
    deadline = time.monotonic() + timeout
    data = pending
    while b"\r\n\r\n" not in data:
        got = _recv(sock, deadline)
        if not got:
            raise TimeoutError(f"no response head; got {data!r}")
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    closed = False
    while len(rest) < length:
        got = _recv(sock, deadline)
        if not got:
            closed = got == b""
            break
        rest += got
    body, rest = rest[:length], rest[length:]
    if not closed and headers.get("connection") == "close":
        got = _recv(sock, deadline)
        closed = got == b"" and not rest
    return Answer(int(status_line.split()[1]), headers, body, closed)


def send_until_answered(sock: socket.socket, chunks: Iterator[bytes], interval: float = 0.0) -> Answer:
    """Send chunk after chunk (every ``interval`` s) until the server answers; then read the answer."""
    for chunk in chunks:
        ready, _, _ = select.select([sock], [], [], interval)
        if ready:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
    return read_answer(sock)


def head(path: str = "/health", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def health_ok(server: ThreadServer) -> bool:
    try:
        return httpx.get(server.url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --- the size of a head ------------------------------------------------------------------------


def test_headers_over_limit_answered_431_and_closed(make_server: MakeServer) -> None:
    server = make_server(max_header_bytes=4096)
    with connect(server) as sock:
        sock.sendall(head(extra="X-Big: " + "a" * 8000 + "\r\n"))
        answer = read_answer(sock)
    assert answer.status == 431
    assert answer.error()["code"] == "headers_too_large"
    assert answer.closed


def test_headers_at_limit_accepted_one_byte_more_refused(make_server: MakeServer) -> None:
    server = make_server(max_header_bytes=4096)
    start = head()[: -len(b"\r\n")] + b"X-Pad: "
    end = b"\r\n\r\n"
    exact = start + b"p" * (4096 - len(start) - len(end)) + end
    assert len(exact) == 4096
    with connect(server) as sock:
        sock.sendall(exact)
        assert read_answer(sock).status == 200
    with connect(server) as sock:
        sock.sendall(exact[:-4] + b"p" + end)
        answer = read_answer(sock)
    assert answer.status == 431, answer.body
    assert answer.closed


def test_huge_header_value_in_pieces_answered_431(make_server: MakeServer) -> None:
    server = make_server(max_header_bytes=4096)
    pieces = (b"a" * 512 for _ in range(2048))  # up to 1 MiB, in pieces httptools buffers itself
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        answer = send_until_answered(sock, pieces, interval=0.001)
    assert answer.status == 431
    assert answer.error()["code"] == "headers_too_large"
    assert answer.closed


def test_many_small_headers_answered_431(make_server: MakeServer) -> None:
    server = make_server(max_header_bytes=4096)
    with connect(server) as sock:
        sock.sendall(head(extra="".join(f"X-H{i}: v\r\n" for i in range(600))))
        answer = read_answer(sock)
    assert answer.status == 431
    assert answer.closed


def test_headers_over_limit_others_still_served(make_server: MakeServer) -> None:
    server = make_server(max_header_bytes=4096)
    with server.stream("alice") as stream:
        stream.read_count(1, event="connection.established")
        with connect(server) as sock:
            sock.sendall(head(extra="X-Big: " + "a" * 100_000 + "\r\n"))
            assert read_answer(sock).status == 431
        assert health_ok(server)
        server.publish_ok({"type": "custom.x", "user_id": "alice", "data": {}})
        assert [m.event for m in stream.read_count(1)] == ["custom.x"]


def test_headers_under_default_limit_accepted(make_server: MakeServer) -> None:
    server = make_server()
    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 600, "pad": "x" * 4700}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert 6 * 1024 <= len(token) < 7 * 1024
    with server.stream(token=token) as stream:
        assert stream.status == 200
        stream.read_count(1, event="connection.established")
    with connect(server) as sock:  # while past the default limit (32 KiB) is refused
        sock.sendall(head(extra=f"Authorization: Bearer {token * 6}\r\n"))
        assert read_answer(sock).status == 431


# --- the time to send a head -------------------------------------------------------------------


def test_slowloris_answered_408_within_timeout(make_server: MakeServer) -> None:
    server = make_server(header_timeout_s=0.5)
    with connect(server) as sock:
        began = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        answer = send_until_answered(sock, (b"X" for _ in range(30)), interval=0.1)
        took = time.monotonic() - began
    assert answer.status == 408
    assert answer.error()["code"] == "request_timeout"
    assert answer.closed
    assert 0.4 < took < 1.5, took


def test_silent_connection_closed_within_timeout(make_server: MakeServer) -> None:
    server = make_server(header_timeout_s=0.5)
    with connect(server) as sock:
        began = time.monotonic()
        answer = read_answer(sock, timeout=3)
        took = time.monotonic() - began
    assert answer.status == 408
    assert answer.closed
    assert 0.4 < took < 1.5, took


def test_keep_alive_slow_second_request_answered_408(make_server: MakeServer) -> None:
    server = make_server(header_timeout_s=0.5)
    with connect(server) as sock:
        sock.sendall(head())
        first = read_answer(sock)
        assert first.status == 200 and not first.closed
        began = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # these bytes cancel uvicorn's keep-alive timeout
        answer = send_until_answered(sock, (b"X" for _ in range(30)), interval=0.1)
        took = time.monotonic() - began
    assert answer.status == 408
    assert answer.closed
    assert took < 1.5, took


def test_stream_outlives_header_timeout(make_server: MakeServer) -> None:
    server = make_server(header_timeout_s=0.3)
    with server.stream("alice") as stream, connect(server) as slow:
        stream.read_count(1, event="connection.established")
        slow.sendall(b"GET /health HTTP/1.1\r\n")  # a head that never ends, on the same server
        stream.idle(0.6)
        assert read_answer(slow, timeout=0.1).status == 408
        assert not stream.closed
        server.publish_ok({"type": "custom.x", "user_id": "alice", "data": {}})
        assert [m.event for m in stream.read_count(1)] == ["custom.x"]


# --- open sockets --------------------------------------------------------------------------------


def test_connections_past_max_answered_503_until_one_closes(make_server: MakeServer) -> None:
    server = make_server(max_connections=5)
    streams = [server.stream(f"user{i}") for i in range(5)]
    try:
        assert all(s.status == 200 for s in streams)
        with connect(server) as sock:
            sock.sendall(head())
            answer = read_answer(sock)
        assert answer.status == 503
        assert answer.error()["code"] == "too_many_connections"
        assert answer.headers["retry-after"] == "1"
        assert answer.closed
        streams.pop().close()
        wait_for(lambda: health_ok(server), timeout=3, interval=0.05)
    finally:
        for s in streams:
            s.close()


# --- the h11 fallback (uvicorn's own answer: 400 in plain text) -----------------------------------


def test_h11_fallback_huge_header_refused(make_server: MakeServer) -> None:
    server = make_server(http="h11", max_header_bytes=4096)
    # 12 KiB in pieces: h11 bounds only a head still incomplete, by default at 16 KiB.
    pieces = iter([*(b"a" * 512 for _ in range(24)), b"\r\n\r\n"])
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        answer = send_until_answered(sock, pieces, interval=0.001)
    assert answer.status == 400
