"""The event model: validation, routing fields kept out of the envelope, type filters."""

from __future__ import annotations

import json

import pytest

from scribe_events.events import Event, TypeFilter
from scribe_events.exceptions import PayloadTooLarge, ValidationFailed
from scribe_events.vocabulary import parse_publish


def _parse(raw: dict[str, object]) -> Event:
    return parse_publish(raw, max_event_bytes=65536)


def test_events_owner_is_never_in_the_envelope() -> None:
    ev = _parse(
        {
            "type": "task.progress-started",
            "user_id": "u",
            "data": {"task_id": "t1", "owner": "u", "title": "Chapter 3", "estimated_duration_s": 60},
        }
    )
    ev.id = 5
    envelope = json.loads(ev.envelope())
    assert envelope["data"] == {"task_id": "t1", "title": "Chapter 3", "estimated_duration_s": 60}
    assert envelope["task_id"] == "t1"
    assert envelope["id"] == "5"


def test_events_custom_types_pass_data_through() -> None:
    ev = _parse({"type": "acme.thing", "broadcast": True, "data": {"owner": "kept", "x": [1, 2]}})
    assert json.loads(ev.data_json) == {"owner": "kept", "x": [1, 2]}
    assert ev.persist


def test_events_extra_fields_in_known_types_are_kept() -> None:
    ev = _parse(
        {
            "type": "content.novel-created",
            "user_id": "u",
            "data": {"novel_id": "n", "title": "t", "genre": "wuxia"},
        }
    )
    assert json.loads(ev.data_json)["genre"] == "wuxia"
    assert ev.novel_id == "n"


@pytest.mark.parametrize(
    ("type_", "persist"),
    [
        ("task.progress-heartbeat", False),
        ("system.push-mode", False),
        ("system.error", True),
        ("task.progress-updated", True),
    ],
)
def test_events_builtin_persistence(type_: str, persist: bool) -> None:
    data = {"task_id": "t", "progress": 1, "mode": "sse", "level": "info", "impact": "x", "message": "m"}
    assert _parse({"type": type_, "broadcast": True, "data": data}).persist is persist


def test_events_size_limit_counts_encoded_utf8() -> None:
    with pytest.raises(PayloadTooLarge):
        parse_publish({"type": "a.b", "broadcast": True, "data": {"t": "龙" * 30}}, max_event_bytes=64)


def test_events_lone_surrogate_is_a_validation_error() -> None:
    with pytest.raises(ValidationFailed):
        _parse({"type": "a.b", "broadcast": True, "data": {"t": "\ud800"}})


def test_type_filter_globs_and_sql() -> None:
    f = TypeFilter.parse("task.*, content.novel-created")
    assert f is not None
    assert f("task.progress-updated") and f("content.novel-created") and not f("content.chapter-updated")
    assert f.sql_like() == ["task.%", "content.novel-created"]
    assert TypeFilter.parse("") is None
    with pytest.raises(ValidationFailed):
        TypeFilter.parse("a b")
