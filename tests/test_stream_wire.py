"""The stream's exact bytes, headers and heartbeat, over a real socket."""

from __future__ import annotations

import itertools
import json
import re
import time

from tests.conftest import MakeServer
from tests.harness import ThreadServer


def test_stream_headers_and_first_frame_bytes(server: ThreadServer) -> None:
    with server.stream("alice") as s:
        assert s.status == 200
        assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert s.headers["cache-control"] == "no-cache"
        assert s.headers["x-accel-buffering"] == "no"
        assert s.headers["transfer-encoding"] == "chunked"
        s.read_count(1, event="connection.established")
        match = re.fullmatch(rb"retry: 3000\nevent: connection\.established\ndata: (\{.*\})\n\n", s.body)
        assert match, s.body
        hello = json.loads(match.group(1))
        assert set(hello) == {
            "connection_id",
            "server_time",
            "instance",
            "heartbeat_interval_s",
            "resumed_from",
            "last_event_id",  # ours, beyond the contract: where a fresh stream starts
        }
        assert hello["resumed_from"] is None
        assert hello["last_event_id"] == "0"  # nothing stored yet
        assert hello["instance"] == "test-instance"
        assert hello["heartbeat_interval_s"] == 30
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", hello["server_time"])


def test_stream_event_frame_bytes(server: ThreadServer) -> None:
    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        start = len(s.body)
        [event_id] = server.publish_ok(
            {
                "type": "content.novel-created",
                "user_id": "alice",
                "data": {"novel_id": "n1", "title": "龙之书"},
            }
        )
        s.read_count(1, event="content.novel-created")
        frame = s.body[start:]
        match = re.fullmatch(rb"id: (\d+)\nevent: content\.novel-created\ndata: (\{.*\})\n\n", frame)
        assert match, frame
        assert match.group(1).decode() == event_id
        envelope = json.loads(match.group(2))
        assert list(envelope) == ["id", "type", "time", "data", "novel_id"]
        assert envelope["id"] == event_id
        assert envelope["data"] == {"novel_id": "n1", "title": "龙之书"}
        assert "user_id" not in envelope


def test_stream_heartbeat_every_interval_without_id(make_server: MakeServer) -> None:
    server = make_server(heartbeat_s=0.3)
    with server.stream("alice") as s:
        s.read_count(4, event="heartbeat", timeout=5)
        arrivals = []
        for _ in range(3):
            n = len(s.events("heartbeat"))
            s.read_count(n + 1, event="heartbeat", timeout=2)
            arrivals.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert all(0.2 < g < 0.45 for g in gaps), gaps
        for m in s.events("heartbeat"):
            assert m.id is None
            assert set(m.json()) == {"server_time"}
        assert b"id:" not in s.body


def test_stream_payload_cannot_forge_a_frame(server: ThreadServer) -> None:
    evil = 'line1\r\nline2\n\nevent: system.error\ndata: {"forged": true}\n\nid: 999999\r\r'
    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        server.publish_ok({"type": "custom.note", "user_id": "alice", "data": {"text": evil, evil: evil}})
        [message] = s.read_count(1)
        s.idle(0.3)
        assert [m.event for m in s.events()] == ["custom.note"]
        assert message.json()["data"] == {"text": evil, evil: evil}
        assert message.id == message.json()["id"]
        # Every data line of the body is one JSON line: nothing raw got through.
        assert b"\r" not in s.body
        assert s.body.count(b"\nevent: ") + s.body.startswith(b"event: ") == 2


def test_stream_graceful_shutdown_ends_the_chunked_body(make_server: MakeServer) -> None:
    server = make_server()
    with server.stream("alice") as s:
        s.read_count(1, event="connection.established")
        started = time.monotonic()
        server.stop()
        s.wait_closed(timeout=5)
        assert s.ended, s.raw[-40:]
        assert time.monotonic() - started < 5
