"""The event vocabulary: the built-in types, their shapes, and checking what a publisher sent.

Every type of the contract is validated on publish (a wrong shape is a 422 naming the field); an
unknown type in a reserved namespace is refused; custom dotted types pass through untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from scribe_events import sse
from scribe_events.events import Event, dumps
from scribe_events.exceptions import PayloadTooLarge, ValidationFailed
from scribe_events.ids import TYPE_NAME, optional_text_id

RESERVED_PREFIXES = ("task.", "content.", "workflow.", "system.", "connection.", "replay.")
MAX_DATA_DEPTH = 32

# Data fields that route an event and are never sent to clients.
ROUTING_FIELDS = ("owner", "readers")
MAX_TASK_READERS = 100  # readers named when a task starts, and granted later (each)

TASK_STARTED = "task.progress-started"
TASK_UPDATED = "task.progress-updated"
TASK_HEARTBEAT = "task.progress-heartbeat"
TASK_ENDED = frozenset({"task.progress-completed", "task.progress-failed"})
CHAPTER_UPDATED = "content.chapter-updated"
SYSTEM_ERROR = "system.error"

Persistence = Literal["yes", "latest", "no"]


# --- shapes of the built-in types -------------------------------------------------------------


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _percent(v: Any) -> bool:
    return _num(v) and 0 <= v <= 100


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _any(v: Any) -> bool:
    return True


def _one_of(*values: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return v in values

    check.__doc__ = "one of " + ", ".join(values)
    return check


def _obj(**fields: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return isinstance(v, dict) and all(k in v and f(v[k]) for k, f in fields.items())

    check.__doc__ = "an object with " + ", ".join(fields)
    return check


_KIND: dict[Callable[[Any], bool], str] = {
    _str: "a string",
    _num: "a number",
    _percent: "a number from 0 to 100",
    _bool: "a boolean",
}
_LEVEL = _one_of("info", "warning", "critical")


@dataclass(frozen=True, slots=True)
class TypeSpec:
    persist: Persistence
    required: Mapping[str, Callable[[Any], bool]]
    optional: Mapping[str, Callable[[Any], bool]]


def _spec(persist: Persistence, required: dict[str, Any], optional: dict[str, Any] | None = None) -> TypeSpec:
    return TypeSpec(persist, required, optional or {})


TYPES: dict[str, TypeSpec] = {
    "task.progress-started": _spec(
        "yes",
        {"task_id": _str},
        {"estimated_duration_s": _num, "owner": _str, "title": _str, "readers": _any},
    ),
    "task.progress-updated": _spec("latest", {"task_id": _str, "progress": _percent}, {"status_text": _str}),
    "task.progress-heartbeat": _spec(
        "no", {"task_id": _str, "progress": _percent}, {"last_update_at": _str, "stalled": _bool}
    ),
    "task.progress-completed": _spec(
        "yes", {"task_id": _str}, {"result": _any, "summary": _str, "duration_s": _num}
    ),
    "task.progress-failed": _spec(
        "yes",
        {"task_id": _str, "error": _obj(code=_str, message=_str)},
        {"retry": _obj(retryable=_bool)},
    ),
    "content.novel-created": _spec("yes", {"novel_id": _str, "title": _str}),
    "content.chapter-updated": _spec(
        "yes", {"novel_id": _str}, {"chapter_id": _str, "summary": _str, "coalesced": _num}
    ),
    "workflow.status-changed": _spec("yes", {"workflow_id": _str, "old_status": _str, "new_status": _str}),
    "system.notification": _spec("yes", {"level": _LEVEL, "title": _str, "message": _str}, {"action": _any}),
    "system.error": _spec("yes", {"level": _LEVEL, "impact": _str, "message": _str}),
    "system.push-mode": _spec("no", {"mode": _one_of("sse", "polling")}, {"poll_interval_s": _num}),
}


def _describe(check: Callable[[Any], bool]) -> str:
    return _KIND.get(check) or check.__doc__ or "of the right type"


def check_type_name(type_: Any, field: str = "type") -> str:
    if not isinstance(type_, str) or len(type_) > 200 or not TYPE_NAME.fullmatch(type_):
        raise ValidationFailed(
            "must be a dotted event type name such as 'content.novel-created'", field=field
        )
    if type_.startswith(RESERVED_PREFIXES) and type_ not in TYPES:
        raise ValidationFailed(f"'{type_}' is not a known type in a reserved namespace", field=field)
    return type_


def check_data(type_: str, data: Mapping[str, Any], where: str = "data") -> None:
    spec = TYPES.get(type_)
    if spec is None:
        return
    for name, check in spec.required.items():
        if name not in data:
            raise ValidationFailed(f"is required for {type_}", field=f"{where}.{name}")
        if not check(data[name]):
            raise ValidationFailed(f"must be {_describe(check)}", field=f"{where}.{name}")
    for name, check in spec.optional.items():
        if name in data and data[name] is not None and not check(data[name]):
            raise ValidationFailed(f"must be {_describe(check)}", field=f"{where}.{name}")


# --- parsing what a publisher sent --------------------------------------------------------------

_PUBLISH_FIELDS = {"type", "data", "user_id", "session_id", "broadcast", "task_id", "sensitive", "persist"}


def parse_publish(
    raw: Any, *, max_event_bytes: int, index: int | None = None, max_depth: int = MAX_DATA_DEPTH
) -> Event:
    """Check one published event (a decoded JSON object) and build the :class:`Event`.

    What this accepts can always be stored and sent: its frame is built once here, before the
    event is committed."""
    at = "" if index is None else f"events[{index}]."
    if not isinstance(raw, dict):
        raise ValidationFailed("must be a JSON object", field=(at[:-1] or "body"))
    unknown = sorted(set(raw) - _PUBLISH_FIELDS)
    if unknown:
        raise ValidationFailed("is not a field of an event", field=at + unknown[0])
    type_ = check_type_name(raw.get("type"), field=at + "type")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise ValidationFailed("must be a JSON object", field=at + "data")
    _check_depth(data, max_depth, at + "data")
    check_data(type_, data, where=at + "data")

    user_id = _opt_id(raw, "user_id", at)
    session_id = _opt_id(raw, "session_id", at)
    task_id = _opt_id(raw, "task_id", at)
    broadcast = raw.get("broadcast", False)
    if not isinstance(broadcast, bool):
        raise ValidationFailed("must be a boolean", field=at + "broadcast")
    audiences = sum((user_id is not None, broadcast, task_id is not None))
    if session_id is not None and user_id is None:
        raise ValidationFailed(
            "a session is addressed together with its user_id",
            field=at + "session_id",
            code="invalid_audience",
        )
    if audiences != 1:
        raise ValidationFailed(
            "name exactly one audience: user_id (optionally with session_id), broadcast: true, or task_id",
            field=at + "audience",
            code="invalid_audience",
        )
    owner, grants = _task_routing(type_, data, user_id, task_id, at)

    sensitive = raw.get("sensitive", False)
    if not isinstance(sensitive, bool):
        raise ValidationFailed("must be a boolean", field=at + "sensitive")
    spec = TYPES.get(type_)
    persist_raw = raw.get("persist")
    if persist_raw is not None:
        if not isinstance(persist_raw, bool):
            raise ValidationFailed("must be a boolean", field=at + "persist")
        if spec is not None:
            raise ValidationFailed("is fixed for built-in types", field=at + "persist")
    persistence: Persistence = spec.persist if spec else ("no" if persist_raw is False else "yes")

    public = {k: v for k, v in data.items() if k not in ROUTING_FIELDS} if spec else data
    try:
        data_json = dumps(public)
        size = len(data_json.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ValidationFailed(f"cannot be encoded: {exc}", field=at + "data") from None
    if size > max_event_bytes:
        raise PayloadTooLarge(f"{at}data is {size} bytes encoded; the limit is {max_event_bytes}")

    # Copied into the envelope and stored in their own columns: held to the id rule when present.
    event_task, novel_id = (
        optional_text_id(v, f"{at}data.{k}") if isinstance(v := data.get(k), str) else None
        for k in ("task_id", "novel_id")
    )
    if task_id is not None and event_task is not None and event_task != task_id:
        raise ValidationFailed(
            f"must be the task_id the event is for ({task_id!r})", field=f"{at}data.task_id"
        )
    event = Event(
        type_,
        data_json,
        user_id=user_id,
        session_id=session_id,
        broadcast=broadcast,
        task_id=task_id or event_task,
        novel_id=novel_id,
        persist=persistence != "no",
        # "Latest per task" is per task *and audience*: one reader's update never replaces another's.
        replace_key=(
            hashlib.sha256(dumps([type_, event_task, user_id, session_id, broadcast]).encode()).hexdigest()
            if persistence == "latest" and event_task
            else None
        ),
        sensitive=sensitive,
        for_task=task_id is not None,
        owner=owner,
        grants=grants,
    )
    try:  # what is stored must be sendable: its frame's parts are made and checked before the commit
        sse.check_field(type_, "event name")
        event.envelope_tail().encode("utf-8")
    except ValueError as exc:  # UnicodeEncodeError included
        raise ValidationFailed(f"cannot be sent: {exc}", field=at.rstrip(".") or "body") from None
    return event


def _task_routing(
    type_: str, data: Mapping[str, Any], user_id: str | None, task_id: str | None, at: str
) -> tuple[str | None, tuple[str, ...]]:
    """The owner and first readers a ``task.progress-started`` names (publish side only): the owner
    is ``data.owner``, else the user the event is addressed to; with a ``task_id`` audience the
    owner must be named."""
    if type_ != TASK_STARTED:
        return None, ()
    owner = optional_text_id(data.get("owner"), f"{at}data.owner") or user_id
    if owner is None:
        raise ValidationFailed(
            "is required when a task is started for its task_id audience", field=f"{at}data.owner"
        )
    raw = data.get("readers")
    if raw is None:
        return owner, ()
    if not isinstance(raw, list) or len(raw) > MAX_TASK_READERS:
        raise ValidationFailed(
            f"must be a list of at most {MAX_TASK_READERS} user ids", field=f"{at}data.readers"
        )
    readers = [optional_text_id(r, f"{at}data.readers[{i}]") for i, r in enumerate(raw)]
    if None in readers:
        raise ValidationFailed("must be user ids", field=f"{at}data.readers")
    return owner, tuple(dict.fromkeys(r for r in readers if r is not None and r != owner))


def _opt_id(raw: Mapping[str, Any], name: str, at: str) -> str | None:
    return optional_text_id(raw.get(name), at + name)


def _check_depth(data: Any, limit: int, field: str) -> None:
    """Refuse data nested deeper than ``limit`` (iteratively: no recursion to exhaust)."""
    level: list[Any] = [data]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise ValidationFailed(f"nests deeper than {limit} levels", field=field)
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, dict | list)
        ]
