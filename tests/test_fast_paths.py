"""What the performance work changed must not change what the service does: publishing answered
before FastAPI, verified tokens remembered, rate limits counted in this process without
``limits``' storage, the store's driver-level INSERT, the cached timestamp and JSON encoder."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from limits import parse

from scribe_events.auth import VERIFIED_CACHE, TokenVerifier, mint_token
from scribe_events.config import Settings
from scribe_events.events import dumps, rfc3339
from scribe_events.exceptions import InvalidToken
from scribe_events.ratelimit import LocalWindows
from tests.conftest import MakeServer
from tests.harness import ThreadServer, wait_for
from tests.test_metrics import scrape

SECRET = "fast-path-secret-fast-path-secret-0123456789"


# --- publishing before FastAPI -------------------------------------------------------------------


def test_publish_answers_as_documented(server: ThreadServer) -> None:
    """202 with the ids in order; the OpenAPI document still describes the route."""
    h = {"Authorization": f"Bearer {server.token('svc', roles=['publisher'])}"}
    body = {"events": [{"type": "custom.a", "user_id": "u"}, {"type": "custom.b", "user_id": "u"}]}
    r = httpx.post(server.url + "/api/v1/events", json=body, headers=h)
    assert r.status_code == 202 and r.headers["content-type"] == "application/json"
    ids = r.json()["ids"]
    assert len(ids) == 2 and int(ids[0]) + 1 == int(ids[1])
    live = httpx.post(
        server.url + "/api/v1/events", json={"type": "custom.l", "user_id": "u", "persist": False}, headers=h
    )
    assert live.status_code == 202 and live.json()["ids"][0].startswith("L")
    doc = httpx.get(server.url + "/openapi.json").json()
    post = doc["paths"]["/api/v1/events"]["post"]
    assert "202" in post["responses"] and "requestBody" in post
    assert {"name": "idempotency-key", "in": "header"}.items() <= post["parameters"][0].items()


def test_publish_errors_keep_the_contracts_form(make_server: MakeServer) -> None:
    server = make_server(cors_origins=["https://app.example"])
    pub = {"Authorization": f"Bearer {server.token('svc', roles=['publisher'])}"}
    cases = [
        ({}, b'{"type":"custom.a","user_id":"u"}', 401, "unauthorized"),
        ({"Authorization": f"Bearer {server.token('u')}"}, b'{"type":"custom.a"}', 403, "missing_role"),
        ({**pub, "Idempotency-Key": "a b"}, b"{}", 400, "invalid_idempotency_key"),
        (pub, b"{not json", 400, "invalid_json"),
        (pub, b'{"type":"custom.a"}', 422, "invalid_audience"),
    ]
    for headers, body, status, code in cases:
        r = httpx.post(
            server.url + "/api/v1/events", content=body, headers={**headers, "Origin": "https://app.example"}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.post(
        server.url + "/api/v1/events",
        json={"type": "custom.a", "user_id": "u"},
        headers={**pub, "Origin": "https://evil.example"},
    )
    assert other.status_code == 202 and "access-control-allow-origin" not in other.headers


def test_an_unexpected_error_in_publishing_is_a_logged_500(
    server: ThreadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import scribe_events.web.publish as publish

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(publish, "parse_body", broken)
    h = {"Authorization": f"Bearer {server.token('svc', roles=['publisher'])}"}
    r = httpx.post(server.url + "/api/v1/events", json={"type": "custom.a", "user_id": "u"}, headers=h)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error" and "a bug" not in r.text
    monkeypatch.undo()
    ok = httpx.post(server.url + "/api/v1/events", json={"type": "custom.a", "user_id": "u"}, headers=h)
    assert ok.status_code == 202  # the next request is served as ever


# --- verified tokens are remembered until they expire ---------------------------------------------


def _verifier() -> TokenVerifier:
    return TokenVerifier(Settings(jwt_secret=SECRET))


def test_a_remembered_token_still_expires() -> None:  # (waits for the token's second to pass)
    verifier = _verifier()
    token = mint_token(SECRET, "alice", roles=["publisher"], ttl_s=1)
    first = verifier.verify(token)
    assert verifier.verify(token) is first  # remembered
    assert first.expires_at is not None
    time.sleep(max(0.0, first.expires_at - time.time()) + 0.05)
    with pytest.raises(InvalidToken) as refused:
        verifier.verify(token)
    assert refused.value.reason == "expired_token"


def test_only_verified_tokens_are_remembered_and_the_memory_is_bounded() -> None:
    verifier = _verifier()
    forged = mint_token("another-secret-another-secret-0123456789", "mallory")
    for _ in range(2):  # a refusal is never remembered: the second try is refused as well
        with pytest.raises(InvalidToken):
            verifier.verify(forged)
    tokens = [mint_token(SECRET, f"u{i}") for i in range(VERIFIED_CACHE + 10)]
    for t in tokens:
        verifier.verify(t)
    assert len(verifier._verified) == VERIFIED_CACHE
    assert tokens[0] not in verifier._verified and tokens[-1] in verifier._verified
    assert verifier.verify(tokens[0]).user_id == "u0"  # forgotten, so checked again in full


# --- rate limits counted in this process ---------------------------------------------------------


def test_local_windows_allow_the_limit_then_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [60_020.0]  # 20 s into a minute window (number 1000)
    monkeypatch.setattr(time, "time", lambda: now[0])
    windows, item = LocalWindows(), parse("10/minute")
    assert [windows.hit(item, "k") for _ in range(11)] == [True] * 10 + [False]
    assert windows.hit(item, "other")  # each key has its own count
    assert 0 < windows.reset_in(item, "k") <= 60
    # Next window, 30 s in: half of the previous window's 10 still counts, so 5 more are allowed.
    now[0] = 60_090.0  # 30 s into the next window
    assert [windows.hit(item, "k") for _ in range(6)] == [True] * 5 + [False]
    now[0] += 200  # two windows later nothing counts
    assert [windows.hit(item, "k") for _ in range(10)] == [True] * 10


def test_local_windows_sweep_keys_that_count_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [5_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    monkeypatch.setattr(LocalWindows, "SWEEP_EVERY", 100)
    windows, item = LocalWindows(), parse("5/second")
    for i in range(99):
        windows.hit(item, f"ip{i}")
    now[0] += 10
    windows.hit(item, "late")  # the hundredth new window sweeps the old ones
    assert list(windows._windows) == [(item.key_for("late"),)]


# --- the cached parts of an envelope ----------------------------------------------------------------


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_rfc3339_is_the_formatted_time(ms: int) -> None:
    expected = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"
    assert rfc3339(ms) == expected
    assert rfc3339(ms) == rfc3339(ms)  # and again, from the cached second


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_dumps_is_compact_json(value: object) -> None:
    out = dumps(value)
    assert json.loads(out) == value
    assert out == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    with pytest.raises(ValueError):
        dumps(float("nan"))


# --- a stream lets go of its request's task ------------------------------------------------------------


def test_a_stream_outlives_its_request_task_and_ignores_what_the_client_sends(server: ThreadServer) -> None:
    """An open stream holds no ASGI task (about 1.3 KB each); bytes the client sends after its
    request, e.g. a second request, are dropped: nothing may start inside the stream."""
    with server.stream("alice") as s:
        s.read_until(lambda ms: any(m.event == "connection.established" for m in ms))
        deadline = time.monotonic() + 5  # the greeting is written before the task ends
        while (tasks := server.call(_request_tasks())) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tasks == 0, tasks
        s.sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        server.publish_ok({"type": "custom.after", "user_id": "alice"})
        s.read_until(lambda ms: any(m.event == "custom.after" for m in ms))
        assert b"HTTP/1.1 200" not in s.raw.split(b"\r\n\r\n", 1)[1]
        assert server.connections() == 1
    deadline = time.monotonic() + 5
    while server.connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.connections() == 0  # the socket's close ended it, with no task to notice


async def _request_tasks() -> int:
    """uvicorn's request tasks still running (this call's own is not one)."""
    import asyncio

    return sum(1 for t in asyncio.all_tasks() if "run_asgi" in repr(t.get_coro()))


def test_an_event_over_the_size_limit_keeps_the_publishers_connection(server: ThreadServer) -> None:
    """The whole body was read: a 413 about one event's data does not close a pooled connection
    (only a body cut off by the reader's own limit does)."""
    h = {"Authorization": f"Bearer {server.token('svc', roles=['publisher'])}"}
    with httpx.Client(base_url=server.url, headers=h) as client:
        big = client.post(
            "/api/v1/events", json={"type": "custom.big", "user_id": "u", "data": {"x": "a" * 70_000}}
        )
        assert big.status_code == 413 and big.headers.get("connection") != "close"
        assert big.json()["error"]["code"] == "payload_too_large"
        assert client.post("/api/v1/events", json={"type": "custom.ok", "user_id": "u"}).status_code == 202


def test_a_publisher_that_leaves_mid_body_is_not_answered_or_counted(server: ThreadServer) -> None:
    before = scrape(server)
    token = server.token("svc", roles=["publisher"])
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"type":"custom.a"'
        )
        time.sleep(0.2)
    time.sleep(0.3)
    after = scrape(server)
    answered = [  # (the scrapes themselves are 200s)
        k
        for k in after
        if k.startswith("scribe_events_http_responses_total")
        and 'code="200"' not in k
        and after[k] != before.get(k)
    ]
    assert answered == [], answered


def test_a_request_pipelined_behind_a_stream_leaves_the_stream_open(server: ThreadServer) -> None:
    """Sent in one segment with the stream's request, a second request already has uvicorn's cycle
    when the stream would let go of its task: the stream then keeps its task, and stays open."""
    token = server.token("alice")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        sock.settimeout(5)
        got = b""
        while b"connection.established" not in got:
            got += sock.recv(65536)
        server.publish_ok({"type": "custom.after", "user_id": "alice"})
        while b"custom.after" not in got:
            chunk = sock.recv(65536)
            assert chunk, got  # the server closed the stream
            got += chunk
        assert server.connections() == 1
    # uvicorn tells only the queued request of the disconnect: the stream's task heard of it anyway
    wait_for(lambda: server.connections() == 0 and server.call(_request_tasks()) == 0, timeout=5)


def test_a_closed_stream_leaves_no_cyclic_garbage(server: ThreadServer) -> None:
    """Closed connections are freed by reference counting: garbage in cycles waits for a full
    collection, which walks every live object (with thousands of streams, a pause of hundreds of
    milliseconds for everyone)."""
    import gc

    streams = 50

    def open_and_close(i: int) -> None:
        with server.stream(f"u{i % 5}") as s:
            s.read_until(lambda ms: any(m.event == "connection.established" for m in ms))

    for i in range(5):  # what a process makes once (lazy caches) is not what this is about
        open_and_close(i)
    time.sleep(0.2)
    gc.collect()
    gc.disable()
    try:
        for i in range(streams):
            open_and_close(i)
        deadline = time.monotonic() + 5
        while server.runtime.hub.connections and time.monotonic() < deadline:  # (no HTTP client here:
            time.sleep(0.02)  # its own objects would be counted)
        time.sleep(0.2)
        found = gc.collect()
    finally:
        gc.enable()
    assert found < streams, f"{found} objects in cycles after {streams} streams closed"
