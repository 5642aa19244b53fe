"""The event model: types and their shapes, validation of published events, and the envelope.

An :class:`Event` is what a publisher asked for, checked. Once the store has given it an id it
becomes a :class:`Delivery`: routing plus the finished envelope and its wire bytes, encoded once for
every connection on this instance that will receive it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from scribe_events import sse
from scribe_events.exceptions import PayloadTooLarge, ValidationFailed
from scribe_events.ids import TYPE_GLOB, TYPE_NAME, optional_text_id

log = logging.getLogger("scribe_events.events")

RESERVED_PREFIXES = ("task.", "content.", "workflow.", "system.", "connection.", "replay.")
MAX_DATA_DEPTH = 32
MAX_TYPE_GLOBS = 50

# Data fields that route an event and are never sent to clients.
ROUTING_FIELDS = ("owner", "readers")

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
        "yes", {"task_id": _str}, {"estimated_duration_s": _num, "owner": _str, "title": _str}
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


# --- the event --------------------------------------------------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rfc3339(ms: int) -> str:
    """UTC time with milliseconds, e.g. ``2026-11-29T18:16:31.123Z``."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def dumps(value: Any) -> str:
    """Compact JSON, UTF-8 friendly. The output never holds a raw CR or LF."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# Live-only ids: unique per process run, never confused with stored ids (which are integers).
_live_ids = (f"{_run}-{n}" for _run in [secrets.token_hex(4)] for n in itertools.count(1))


class Event:
    """A validated event. ``id`` is set by the store (persisted) or made live-only (``L…``)."""

    __slots__ = (
        "broadcast",
        "data_json",
        "id",
        "live_id",
        "novel_id",
        "persist",
        "replace_key",
        "resend",
        "sensitive",
        "session_id",
        "tail",
        "task_id",
        "time_ms",
        "type",
        "user_id",
    )

    def __init__(
        self,
        type: str,
        data_json: str,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        broadcast: bool = False,
        task_id: str | None = None,
        novel_id: str | None = None,
        persist: bool = True,
        replace_key: str | None = None,
        sensitive: bool = False,
        time_ms: int | None = None,
        id: int | None = None,
    ) -> None:
        self.type = type
        self.data_json = data_json
        self.user_id = user_id
        self.session_id = session_id
        self.broadcast = broadcast
        self.task_id = task_id
        self.novel_id = novel_id
        self.persist = persist
        self.replace_key = replace_key
        self.sensitive = sensitive
        self.time_ms = now_ms() if time_ms is None else time_ms
        self.id = id
        self.live_id: str | None = None
        self.tail: str | None = None  # the envelope after its id, encoded once (see envelope)
        # A stored event sent again (resend): its envelope keeps its id, but no ``id:`` line, so
        # it never moves a client's Last-Event-ID backwards; clients de-duplicate by envelope id.
        self.resend = False

    @property
    def wire_id(self) -> str:
        """The id clients see: the stored sequence number, or the live-only id."""
        if self.id is not None:
            return str(self.id)
        if self.live_id is None:
            self.live_id = f"L{next(_live_ids)}"
        return self.live_id

    def envelope(self) -> str:
        """The envelope as one line of JSON (routing lists are never part of it)."""
        return '{"id":' + dumps(self.wire_id) + self.envelope_tail()

    def envelope_tail(self) -> str:
        """Everything of the envelope after its id: made once, when the event is checked, so
        what is stored is known to encode before it is committed."""
        if self.tail is None:
            parts = [
                ',"type":',
                dumps(self.type),
                ',"time":"',
                rfc3339(self.time_ms),
                '","data":',
                self.data_json,
            ]
            if self.task_id is not None:
                parts += [',"task_id":', dumps(self.task_id)]
            if self.novel_id is not None:
                parts += [',"novel_id":', dumps(self.novel_id)]
            if self.session_id is not None:
                parts += [',"session_id":', dumps(self.session_id)]
            parts.append("}")
            self.tail = "".join(parts)
        return self.tail

    def delivery(self) -> Delivery:
        """Encode once for this instance. Live-only events carry no ``id:`` line (nothing to resume)."""
        seq = self.id if not self.resend else None
        return Delivery.build(
            self.wire_id, seq, self.type, self.user_id, self.session_id, self.broadcast, self.envelope()
        )


class Delivery:
    """An event ready for the wire: routing fields copied flat for the hub's loop, bytes made once."""

    __slots__ = ("broadcast", "chunk", "envelope", "id", "seq", "session_id", "type", "user_id")

    def __init__(
        self,
        id: str,
        seq: int | None,
        type: str,
        user_id: str | None,
        session_id: str | None,
        broadcast: bool,
        envelope: str,
        chunk: bytes,
    ) -> None:
        self.id = id
        self.seq = seq  # the stored id, which rises within a stream; None for live-only and resent events
        self.type = type
        self.user_id = user_id
        self.session_id = session_id
        self.broadcast = broadcast
        self.envelope = envelope
        self.chunk = chunk

    def overtaking_chunk(self) -> bytes:
        """The frame without its ``id:`` line: for a ``system.error`` sent ahead of events still
        queued for a stream (the client's Last-Event-ID must not jump past them). It comes again,
        in order, with its id; clients de-duplicate by envelope id."""
        return sse.chunk(sse.frame(self.envelope, event=self.type))

    @classmethod
    def build(
        cls,
        id: str,
        seq: int | None,
        type: str,
        user_id: str | None,
        session_id: str | None,
        broadcast: bool,
        envelope: str,
    ) -> Delivery:
        """Encode the frame and its HTTP chunk, once. Only ordered (stored) events get an ``id:`` line."""
        frame = sse.frame(envelope, event=type, id=id if seq is not None else None)
        return cls(id, seq, type, user_id, session_id, broadcast, envelope, sse.chunk(frame))


SkipHook = Callable[["Event", Exception], None]


def sendable(events: Iterable[Event], on_skip: SkipHook | None = None) -> list[Delivery]:
    """The deliveries of ``events``, skipping (logged, and reported to ``on_skip``) any that cannot
    be framed, e.g. a row stored by an older version: one bad event never stops the others."""
    out = []
    for e in events:
        try:
            out.append(e.delivery())
        except Exception as exc:
            skipped(e, exc, on_skip)
    return out


def skipped(event: Event, exc: Exception, on_skip: SkipHook | None) -> None:
    """Log and report an event that cannot be sent (the one place that says so)."""
    log.error("event %s of type %r cannot be sent; skipped: %s", event.wire_id, event.type, exc)
    if on_skip is not None:
        on_skip(event, exc)


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
    if task_id is not None:
        raise ValidationFailed(
            "task audiences are not supported by this version", field=at + "task_id", code="invalid_audience"
        )

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
    )
    try:  # what is stored must be sendable: its frame's parts are made and checked before the commit
        sse.check_field(type_, "event name")
        event.envelope_tail().encode("utf-8")
    except ValueError as exc:  # UnicodeEncodeError included
        raise ValidationFailed(f"cannot be sent: {exc}", field=at.rstrip(".") or "body") from None
    return event


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


# --- type filters (the stream's and the poll's ``types=``) --------------------------------------


class TypeFilter:
    """Comma-separated globs such as ``task.*,content.novel-created``; answers are cached per type."""

    __slots__ = ("_cache", "_regex", "patterns")

    _CACHE_MAX = 512

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._regex = re.compile("|".join(fnmatch.translate(p) for p in self.patterns))
        self._cache: dict[str, bool] = {}

    @classmethod
    def parse(cls, text: str | None, *, max_globs: int = MAX_TYPE_GLOBS) -> TypeFilter | None:
        if text is None or not text.strip(" "):
            return None
        patterns = list(dict.fromkeys(p.strip(" ") for p in text.split(",") if p.strip(" ")))
        if len(patterns) > max_globs:
            raise ValidationFailed(f"names {len(patterns)} globs; at most {max_globs}", field="types")
        for p in patterns:
            if not TYPE_GLOB.fullmatch(p):
                raise ValidationFailed(
                    f"{p!r} is not a type or glob of letters, digits, '.', '-', '_', '*'", field="types"
                )
        return cls(patterns)

    def __call__(self, type_: str) -> bool:
        hit = self._cache.get(type_)
        if hit is None:
            hit = self._regex.match(type_) is not None
            if len(self._cache) < self._CACHE_MAX:
                self._cache[type_] = hit
        return hit

    def sql_like(self) -> list[str]:
        """The globs as SQL LIKE patterns (escape character ``\\``)."""
        out = []
        for p in self.patterns:
            esc = p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            out.append(esc.replace("*", "%").replace("?", "_"))
        return out
