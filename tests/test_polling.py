"""The polling fallback, client config and push mode: same events and visibility as the stream."""

from __future__ import annotations

import httpx

from tests.conftest import MakeServer
from tests.harness import ThreadServer


def _get(server: ThreadServer, path: str, user: str = "u", **kw: object) -> httpx.Response:
    return httpx.get(server.url + path, headers={"Authorization": f"Bearer {server.token(user, **kw)}"})


def test_poll_without_after_starts_from_now(server: ThreadServer) -> None:
    [old] = server.publish_ok({"type": "custom.a", "user_id": "u"})
    body = _get(server, "/api/v1/events").json()
    assert body == {"events": [], "mode": "sse", "poll_interval_s": 30, "last_id": old}


def test_poll_pages_with_the_same_envelopes_as_the_stream(server: ThreadServer) -> None:
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        ids = server.publish_ok(
            {"events": [{"type": "custom.n", "user_id": "u", "data": {"n": n}} for n in range(5)]}
        )
        streamed = [m.json() for m in s.read_count(5)]
    first = _get(server, "/api/v1/events?after=0&limit=3").json()
    assert [e["id"] for e in first["events"]] == ids[:3]
    assert first["last_id"] == ids[2]
    rest = _get(server, f"/api/v1/events?after={first['last_id']}&limit=3").json()
    assert [e["id"] for e in rest["events"]] == ids[3:]
    assert first["events"] + rest["events"] == streamed
    empty = _get(server, f"/api/v1/events?after={rest['last_id']}").json()
    assert empty["events"] == [] and empty["last_id"] == ids[-1]


def test_poll_visibility_matches_the_stream(server: ThreadServer) -> None:
    server.publish_ok({"type": "custom.mine", "user_id": "u", "session_id": "s1"})
    server.publish_ok({"type": "custom.other-session", "user_id": "u", "session_id": "s2"})
    server.publish_ok({"type": "custom.theirs", "user_id": "v"})
    server.publish_ok({"type": "custom.all", "broadcast": True})
    server.publish_ok({"type": "custom.user", "user_id": "u"})
    types = [e["type"] for e in _get(server, "/api/v1/events?after=0", session_id="s1").json()["events"]]
    assert types == ["custom.mine", "custom.all", "custom.user"]
    no_session = [e["type"] for e in _get(server, "/api/v1/events?after=0").json()["events"]]
    assert no_session == ["custom.all", "custom.user"]


def test_poll_types_filter(server: ThreadServer) -> None:
    server.publish_ok({"type": "custom.a", "user_id": "u"})
    server.publish_ok({"type": "task.progress-completed", "user_id": "u", "data": {"task_id": "t"}})
    body = _get(server, "/api/v1/events?after=0&types=task.*").json()
    assert [e["type"] for e in body["events"]] == ["task.progress-completed"]


def test_poll_bad_parameters(server: ThreadServer) -> None:
    r = _get(server, "/api/v1/events?after=abc")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_after"
    r = _get(server, "/api/v1/events?after=0&limit=501")
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("limit")
    r = _get(server, "/api/v1/events?after=0&types=bad%20glob")
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    r = httpx.get(server.url + "/api/v1/events")
    assert r.status_code == 401


def test_client_config(server: ThreadServer) -> None:
    body = _get(server, "/api/v1/events/config").json()
    assert body == {
        "mode": "sse",
        "poll_interval_s": 30,
        "heartbeat_interval_s": 30.0,
        "reconnect": {"max_retries": 5, "initial_delay_ms": 1000, "max_delay_ms": 30000},
    }


def test_push_mode_switch_tells_connected_clients(make_server: MakeServer) -> None:
    server = make_server()
    admin = {"Authorization": f"Bearer {server.token('root', roles=['admin'])}"}
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        r = httpx.put(server.url + "/api/v1/admin/push-mode", json={"mode": "polling"}, headers=admin)
        assert r.status_code == 200
        [message] = s.read_count(1, event="system.push-mode")
        assert message.json()["data"] == {"mode": "polling", "poll_interval_s": 30}
    assert _get(server, "/api/v1/events/config").json()["mode"] == "polling"
    assert _get(server, "/api/v1/events").json()["mode"] == "polling"
    # A/B: with 0 % on SSE everyone polls; with 100 % everyone streams.
    httpx.put(server.url + "/api/v1/admin/push-mode", json={"mode": "sse", "sse_percent": 0}, headers=admin)
    assert {_get(server, "/api/v1/events/config", f"user{i}").json()["mode"] for i in range(20)} == {
        "polling"
    }
    httpx.put(server.url + "/api/v1/admin/push-mode", json={"mode": "sse", "sse_percent": 50}, headers=admin)
    modes = {_get(server, "/api/v1/events/config", f"user{i}").json()["mode"] for i in range(40)}
    assert modes == {"sse", "polling"}
    r = httpx.put(
        server.url + "/api/v1/admin/push-mode",
        json={"mode": "sse"},
        headers={"Authorization": f"Bearer {server.token('u')}"},
    )
    assert r.status_code == 403
    r = httpx.put(server.url + "/api/v1/admin/push-mode", json={"mode": "carrier-pigeon"}, headers=admin)
    assert r.status_code == 422


def test_health_and_readiness(server: ThreadServer) -> None:
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        live = httpx.get(server.url + "/health").json()
        ready = httpx.get(server.url + "/health/ready")
    assert live["status"] == "ok" and live["connections"] == 1 and live["instance"] == "test-instance"
    assert set(live) == {"status", "instance", "connections", "uptime_s", "dependencies"}
    assert ready.status_code == 200
    body = ready.json()
    assert body["dependencies"] == {"store": "ok", "broker": "ok", "history": "ok"}
    assert body["thresholds_exceeded"] == [] and 0 <= body["event_loop_lag_s"] < 1


def test_openapi_documents_the_endpoints(server: ThreadServer) -> None:
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in (
        "/api/v1/events/stream",
        "/api/v1/events",
        "/api/v1/events/tickets",
        "/api/v1/events/config",
        "/api/v1/admin/push-mode",
        "/health",
        "/health/ready",
    ):
        assert path in paths


def test_metrics_are_prometheus_text_with_our_prefix(server: ThreadServer) -> None:
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        server.publish_ok({"type": "custom.m", "user_id": "u"})
        s.read_count(1)
        text = httpx.get(server.url + "/metrics").text
    assert 'scribe_events_connections{instance="test-instance"} 1.0' in text
    assert 'scribe_events_events_delivered_total{family="custom",instance="test-instance"} 1.0' in text
    assert 'scribe_events_events_stored_total{family="custom",instance="test-instance"} 1.0' in text
    assert 'scribe_events_broker_up{instance="test-instance"} 1.0' in text
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    assert names and all(n.startswith("scribe_events_") for n in names)
