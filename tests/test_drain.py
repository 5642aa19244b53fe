"""Restarts without a reconnect storm: a stopping instance refuses new streams (readiness 503) and
tells each open stream to come back after a random delay within drain_window_s."""

from __future__ import annotations

import httpx

from tests.conftest import MakeServer
from tests.harness import RawStream


def test_a_stopping_instance_spreads_its_clients_return_over_the_window(make_server: MakeServer) -> None:
    server = make_server(drain_window_s=2)
    streams = [server.stream(f"u{i}") for i in range(60)]
    try:
        for s in streams:
            s.read_count(1, event="connection.established")
        server.stop()
        delays = []
        for s in streams:
            [closing] = s.read_count(1, event="connection.closing", timeout=5)
            body = closing.json()
            assert body["reason"] == "shutdown" and closing.retry == body["reconnect_after_ms"]
            delays.append(body["reconnect_after_ms"])
            s.wait_closed()
            assert s.ended  # the chunked body finished cleanly
    finally:
        for s in streams:
            s.close()
    assert all(0 <= d <= 2000 for d in delays)
    assert len(set(delays)) > 40 and min(delays) < 500 and max(delays) > 1500  # spread, not one instant


def test_while_draining_readiness_is_503_and_new_streams_are_refused(make_server: MakeServer) -> None:
    server = make_server()
    hub = server.runtime.hub
    hub.closing = True  # what SIGTERM sets first
    try:
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert ready.json()["status"] == "unavailable"
        with RawStream(
            server.port, "/api/v1/events/stream", {"Authorization": f"Bearer {server.token('u')}"}
        ) as s:
            assert s.status == 503 and s.error_body["error"]["code"] == "shutting_down"
    finally:
        hub.closing = False
    assert httpx.get(server.url + "/health/ready").status_code == 200


def test_without_a_window_streams_end_at_once_without_a_notice(make_server: MakeServer) -> None:
    server = make_server(drain_window_s=0)
    s = server.stream("u")
    try:
        s.read_count(1, event="connection.established")
        server.stop()
        s.wait_closed()
        assert s.ended and s.events("connection.closing", skip_control=False) == []
    finally:
        s.close()
