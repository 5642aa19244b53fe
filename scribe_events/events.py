"""The event and its wire form: the envelope, the frame, and type filters.

An :class:`Event` is what a publisher asked for, checked (see :mod:`scribe_events.vocabulary`).
Once the store has given it an id it becomes a :class:`Delivery`: routing plus the finished envelope
and its wire bytes, encoded once for every connection on this instance that will receive it.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from scribe_events import sse
from scribe_events.exceptions import ValidationFailed
from scribe_events.ids import TYPE_GLOB

log = logging.getLogger("scribe_events.events")

MAX_TYPE_GLOBS = 50

# --- the event --------------------------------------------------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_TIME_FIELD = ',"time":"'


def envelope_time_ms(envelope: str) -> int:
    """The publish time an envelope states (epoch ms), 0 if it states none. The field follows the
    id and the type, neither of which can hold a quote, so its first occurrence is the one."""
    at = envelope.find(_TIME_FIELD)
    if at < 0:
        return 0
    start = at + len(_TIME_FIELD)
    try:
        when = datetime.fromisoformat(envelope[start : envelope.index('"', start)])
    except ValueError:
        return 0
    return int(when.timestamp() * 1000)


_second: list[Any] = [None, ""]  # the last second formatted: events of one batch share it


def rfc3339(ms: int) -> str:
    """UTC time with milliseconds, e.g. ``2026-11-29T18:16:31.123Z``."""
    second, milli = divmod(ms, 1000)
    if _second[0] != second:
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{milli:03d}Z"


# One encoder for every call: json.dumps with options builds a new one each time.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def dumps(value: Any) -> str:
    """Compact JSON, UTF-8 friendly. The output never holds a raw CR or LF."""
    return _encode(value)


# Live-only ids: unique per process run, never confused with stored ids (which are integers).
_live_ids = (f"{_run}-{n}" for _run in [secrets.token_hex(4)] for n in itertools.count(1))


class Event:
    """A validated event. ``id`` is set by the store (persisted) or made live-only (``L…``)."""

    __slots__ = (
        "broadcast",
        "data_json",
        "for_task",
        "grants",
        "id",
        "live_id",
        "novel_id",
        "owner",
        "persist",
        "readers",
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
        for_task: bool = False,
        owner: str | None = None,
        grants: tuple[str, ...] = (),
        readers: tuple[str, ...] | None = None,
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
        # Addressed to a task (``task_id`` audience): it reaches the task's readers, resolved by
        # the store when the event is committed (``readers``: the users allowed at this id).
        self.for_task = for_task
        self.readers = readers
        self.owner = owner  # task.progress-started: who owns the task, and the first readers
        self.grants = grants
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
            self.wire_id,
            seq,
            self.type,
            self.user_id,
            self.session_id,
            self.broadcast,
            self.envelope(),
            self.readers if self.for_task else None,
            self.task_id,
            self.novel_id,
            time_ms=0 if self.resend else self.time_ms,  # a resend is not a publish to time
        )


class Delivery:
    """An event ready for the wire: routing fields copied flat for the hub's loop, bytes made once."""

    __slots__ = (
        "broadcast",
        "chunk",
        "envelope",
        "id",
        "novel_id",
        "readers",
        "seq",
        "session_id",
        "task_id",
        "time_ms",
        "type",
        "user_id",
    )

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
        readers: tuple[str, ...] | None = None,
        task_id: str | None = None,
        novel_id: str | None = None,
        time_ms: int = 0,
    ) -> None:
        self.id = id
        self.seq = seq  # the stored id, which rises within a stream; None for live-only and resent events
        self.type = type
        self.user_id = user_id
        self.session_id = session_id
        self.broadcast = broadcast
        self.envelope = envelope
        self.chunk = chunk
        # A task's event: the users it reaches (all their connections), instead of user/broadcast.
        self.readers = readers
        self.task_id = task_id  # what throttling and coalescing are keyed by
        self.novel_id = novel_id
        # When it was published (epoch ms), for the publish-to-write latency; 0: not measured
        # (held on purpose by the throttle or coalescing, or a snapshot of state).
        self.time_ms = time_ms

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
        readers: Iterable[str] | None = None,
        task_id: str | None = None,
        novel_id: str | None = None,
        *,
        time_ms: int = 0,
    ) -> Delivery:
        """Encode the frame and its HTTP chunk, once. Only ordered (stored) events get an ``id:`` line."""
        frame = sse.frame(envelope, event=type, id=id if seq is not None else None)
        return cls(
            id,
            seq,
            type,
            user_id,
            session_id,
            broadcast,
            envelope,
            sse.chunk(frame),
            None if readers is None else tuple(str(r) for r in readers),
            task_id,
            novel_id,
            time_ms,
        )

    def unordered(self) -> Delivery:
        """The same event without its ``id:`` line: sent after newer ids (a throttled progress
        update let out when its window ends), it must not move a client's Last-Event-ID."""
        return Delivery(
            self.id,
            None,
            self.type,
            self.user_id,
            self.session_id,
            self.broadcast,
            self.envelope,
            self.overtaking_chunk(),
            self.readers,
            self.task_id,
            self.novel_id,
        )


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
