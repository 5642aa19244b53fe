"""Publishing: single and batch, every bad input's status and JSON, idempotency, store-before-send."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from tests.conftest import MakeServer
from tests.harness import ThreadServer


def _post(server: ThreadServer, body: bytes | str, headers: dict[str, str] | None = None) -> httpx.Response:
    h = {
        "Authorization": f"Bearer {server.publisher()}",
        "Content-Type": "application/json",
        **(headers or {}),
    }
    return httpx.post(server.url + "/api/v1/events", content=body, headers=h)


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return str(body["error"]["message"])


def test_publish_single_and_batch_answer_ids_in_order(server: ThreadServer) -> None:
    [one] = server.publish_ok({"type": "custom.a", "user_id": "u"})
    many = server.publish_ok(
        {"events": [{"type": "custom.b", "user_id": "u", "data": {"i": i}} for i in range(5)]}
    )
    assert [int(i) for i in many] == list(range(int(one) + 1, int(one) + 6))


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"\xff\xfe", 400, "invalid_json", None),
        (b"[1, 2]", 422, "validation_error", "body"),
        (b'{"type": "custom.a"}', 422, "invalid_audience", "audience"),
        (b'{"type": "custom.a", "user_id": "u", "broadcast": true}', 422, "invalid_audience", "audience"),
        (b'{"type": "custom.a", "session_id": "s"}', 422, "invalid_audience", "session_id"),
        (b'{"type": "custom.a", "group": "g"}', 422, "validation_error", "group"),
        (b'{"type": "nodots", "user_id": "u"}', 422, "validation_error", "type"),
        (b'{"type": "task.unknown", "user_id": "u"}', 422, "validation_error", "type"),
        (
            b'{"type": "task.progress-updated", "user_id": "u", "data": {"task_id": "t", "progress": 140}}',
            422,
            "validation_error",
            "data.progress",
        ),
        (
            b'{"type": "system.notification", "broadcast": true, "data": {"level": "loud", "title": "t", '
            b'"message": "m"}}',
            422,
            "validation_error",
            "data.level",
        ),
        (
            b'{"type": "content.novel-created", "user_id": "u", "data": {"title": "t"}}',
            422,
            "validation_error",
            "data.novel_id",
        ),
        (
            b'{"type": "system.error", "broadcast": true, "persist": false, "data": {"level": "critical", '
            b'"impact": "all", "message": "m"}}',
            422,
            "validation_error",
            "persist",
        ),
        (b'{"type": "custom.a", "user_id": "u", "data": [1]}', 422, "validation_error", "data"),
        (b'{"type": "custom.a", "user_id": "", "data": {}}', 422, "validation_error", "user_id"),
        (b'{"events": []}', 422, "validation_error", "events"),
        (
            b'{"events": [{"type": "custom.a", "user_id": "u"}, {"type": "custom.a"}]}',
            422,
            "invalid_audience",
            "events[1].audience",
        ),
    ],
)
def test_publish_bad_input_is_a_clear_error(
    server: ThreadServer, body: bytes, status: int, code: str, field: str | None
) -> None:
    message = _error(_post(server, body), status, code)
    if field:
        assert message.startswith(field + ":"), message


def test_publish_oversized_event_is_413_and_nothing_is_stored(server: ThreadServer) -> None:
    big = json.dumps({"type": "custom.a", "user_id": "u", "data": {"x": "y" * (64 * 1024)}})
    _error(_post(server, big), 413, "payload_too_large")
    batch = json.dumps({"events": [{"type": "custom.a", "user_id": "u", "data": {"x": "y" * 60_000}}] * 20})
    _error(_post(server, batch), 413, "payload_too_large")
    poll = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('u')}"}
    )
    assert poll.json()["events"] == []


def test_publish_body_over_limit_without_length_is_413(server: ThreadServer) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"type": "custom.a", "user_id": "u", "data": {"x": "'
        for _ in range(40):
            yield b"y" * 32_768
        yield b'"}}'

    r = httpx.post(
        server.url + "/api/v1/events",
        content=chunks(),
        headers={"Authorization": f"Bearer {server.publisher()}"},
    )
    _error(r, 413, "payload_too_large")


def test_sensitive_event_without_keys_is_refused(server: ThreadServer) -> None:
    r = server.publish({"type": "custom.a", "user_id": "u", "sensitive": True})
    _error(r, 422, "encryption_not_configured")


def test_publish_without_token_is_401(server: ThreadServer) -> None:
    r = httpx.post(server.url + "/api/v1/events", json={"type": "custom.a", "user_id": "u"})
    _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"


def test_unknown_route_is_json_404(server: ThreadServer) -> None:
    _error(httpx.get(server.url + "/api/v1/nope"), 404, "not_found")


def test_idempotency_key_stores_once_and_answers_same_ids(server: ThreadServer) -> None:
    body = {"events": [{"type": "custom.a", "user_id": "u"}, {"type": "custom.b", "user_id": "u"}]}
    first = server.publish(body, headers={"Idempotency-Key": "job-42"})
    again = server.publish(body, headers={"Idempotency-Key": "job-42"})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    poll = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('u')}"}
    )
    assert [e["id"] for e in poll.json()["events"]] == first.json()["ids"]
    other = server.publish({"type": "custom.c", "user_id": "u"}, headers={"Idempotency-Key": "job-42"})
    _error(other, 409, "idempotency_key_reused")


def test_idempotency_survives_restart(make_server: MakeServer) -> None:
    body = {"type": "custom.a", "user_id": "u"}
    server = make_server("idem.db")
    ids = server.publish(body, headers={"Idempotency-Key": "k1"}).json()["ids"]
    server.stop()
    again = make_server("idem.db")
    assert again.publish(body, headers={"Idempotency-Key": "k1"}).json()["ids"] == ids


def test_important_event_is_committed_before_anyone_receives_it(server: ThreadServer) -> None:
    db = server.db_path
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        server.publish_ok(
            {"type": "content.novel-created", "user_id": "u", "data": {"novel_id": "n", "title": "t"}}
        )
        [message] = s.read_count(1)
        # Read the file with a separate connection: the row is there, committed.
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT type, user_id FROM events WHERE id = ?", (int(message.id),)).fetchone()
        assert row == ("content.novel-created", "u")


def test_live_only_event_is_sent_but_not_stored(server: ThreadServer) -> None:
    with server.stream("u") as s:
        s.read_count(1, event="connection.established")
        [live_id] = server.publish_ok({"type": "custom.typing", "user_id": "u", "persist": False})
        [message] = s.read_count(1)
        assert message.id is None  # no id: line, so Last-Event-ID does not move
        assert message.json()["id"] == live_id
    poll = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('u')}"}
    )
    assert poll.json()["events"] == []


def test_progress_updates_keep_only_the_latest_per_task(server: ThreadServer) -> None:
    for p in (10, 50, 90):
        server.publish_ok(
            {
                "type": "task.progress-updated",
                "user_id": "u",
                "data": {"task_id": "t1", "progress": p, "status_text": f"{p}%"},
            }
        )
    poll = httpx.get(
        server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token('u')}"}
    )
    events = poll.json()["events"]
    assert [e["data"]["progress"] for e in events] == [90]
    assert events[0]["task_id"] == "t1"


def test_publish_nan_is_refused_not_sent_as_invalid_json(server: ThreadServer) -> None:
    r = _post(server, b'{"type": "custom.a", "user_id": "u", "data": {"x": NaN}}')
    _error(r, 422, "validation_error")


def test_progress_latest_is_kept_per_audience_not_across_users(server: ThreadServer) -> None:
    for user, p in (("alice", 40), ("bob", 70)):
        server.publish_ok(
            {
                "type": "task.progress-updated",
                "user_id": user,
                "data": {"task_id": "shared-id", "progress": p, "status_text": "x"},
            }
        )
    for user, p in (("alice", 40), ("bob", 70)):
        poll = httpx.get(
            server.url + "/api/v1/events?after=0", headers={"Authorization": f"Bearer {server.token(user)}"}
        )
        assert [e["data"]["progress"] for e in poll.json()["events"]] == [p]
