"""Subscribers: SSE streams read on raw asyncio protocols, with the accounting in the read path.

A subscriber writes one HTTP/1.1 GET, reads the answer's head, de-chunks the body when it is
chunked, and splits it into SSE frames at blank lines. It does not parse the frames properly (the
cost per event is what matters): a frame with ``"seq":`` somewhere in it is a benchmark event, and
``"ts":`` next to it is its send time; anything else (``connection.established``, heartbeats,
comments) is counted and ignored. An envelope may wrap the publisher's data.

:class:`Tally` is what the subscribers of one event loop count together (see ``workers.py``):
events per sequence number, duplicates, misrouted events and two latency histograms (from the
send time in the event, and from its scheduled time).
"""

from __future__ import annotations

import asyncio
import re
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from scribe_events.loadgen import stats
from scribe_events.loadgen.http import Endpoint, Template, describe, parse_header, request_head

READY_HEADERS = "headers"  # connected once the 200 head arrived
READY_FRAME = "frame"  # ... and the first frame (scribe-events sends connection.established at once)

BROADCAST, TARGETED = "broadcast", "targeted"  # Accounting.mode

_NUM = re.compile(rb'[ \t]*"?(\d+)')  # after "seq": or "ts": (a number, or a number in a string)
_USUAL = re.compile(rb'"ts":(\d+),"seq":(\d+),"run":(\d+)')
_EXACT, _SUB_BITS = stats.EXACT, stats.SUB_BITS
_MAX_US = (1 << 32) - 1  # the histogram's last bucket
_SUB_SHIFT = stats.SUB_BITS + 1
CLOSED_BY_US = "closed by us"
PRESIZE = 1 << 24  # a per-seq table up to this length is made whole at the start
_ERROR_CODE = re.compile(rb'"code"\s*:\s*"([a-z_]{1,40})"')


@dataclass(frozen=True, slots=True)
class SubscriberSpec:
    """What every subscriber of a run sends; picklable, so worker processes get the same."""

    url: str  # template: {i} subscriber index, {user}
    headers: tuple[str, ...] = ()  # "Name: value" templates
    user_headers: tuple[str, ...] = ()  # one header per user; subscriber i sends line i mod len
    users: int = 1
    run: int = 0  # the run's nonce; events carrying another run's are not counted
    ready: str = READY_FRAME
    dial_timeout_s: float = 10.0
    ready_timeout_s: float = 60.0
    dial_concurrency: int = 200

    def user_of(self, i: int) -> str:
        return f"u{i % self.users}"

    def request(self, i: int, last_event_id: str | None = None) -> tuple[Endpoint, bytes]:
        values = {"i": i, "user": self.user_of(i)}
        endpoint = Endpoint.parse(Template(self.url).fill(**values))
        headers = [("Accept", "text/event-stream"), ("Cache-Control", "no-cache")]
        headers += [parse_header(Template(h).fill(**values)) for h in self.headers]
        if self.user_headers:
            headers.append(parse_header(self.user_headers[i % len(self.user_headers)]))
        if last_event_id is not None:
            headers.append(("Last-Event-ID", last_event_id))
        return endpoint, request_head("GET", endpoint, headers, None)


@dataclass(slots=True)
class Accounting:
    """How events count, from the moment publishing starts (picklable, sent to the workers)."""

    mode: str = BROADCAST
    t0_ns: int = 0  # scheduled time of seq 0
    interval_ns: float = 0.0  # between scheduled publishes; 0: no schedule (no corrected latency)
    per: int = 1  # events per scheduled publish (a batch)
    targets: bytes = b""  # array('i'): seq -> subscriber index, cyclic (targeted mode)
    limit: int = 0  # seqs at or above are not ours (0: no limit)


@dataclass(slots=True)
class Tally:
    """The counters of one :class:`Receivers` (merged across processes by the caller)."""

    started: bool = False
    acct: Accounting = field(default_factory=Accounting)
    targets: array[int] = field(default_factory=lambda: array("i"))
    counts: array[int] = field(default_factory=lambda: array("i"))  # per seq: (first) arrivals
    latency: array[int] = field(default_factory=lambda: array("q", bytes(8 * stats.BUCKETS)))
    corrected: array[int] = field(default_factory=lambda: array("q", bytes(8 * stats.BUCKETS)))
    lat_sum: int = 0
    lat_max: int = 0
    cor_sum: int = 0
    cor_max: int = 0
    received: int = 0
    duplicated: int = 0
    misrouted: int = 0
    other: int = 0  # frames without a seq (connection.established, heartbeats, other types)
    comments: int = 0
    pre: int = 0  # ours but outside the measured window, or another run's
    last_ns: int = 0
    run_digits: bytes = b""

    def start(self, acct: Accounting) -> None:
        self.acct = acct
        self.targets = array("i")
        self.targets.frombytes(acct.targets)
        if acct.limit <= PRESIZE:
            self.counts = array("i", bytes(4 * acct.limit))  # else it grows as events come
        self.started = True

    def grow(self, seq: int) -> None:
        self.counts.extend(array("i", bytes(4 * (seq + 4096 - len(self.counts)))))

    def report(self) -> dict[str, Any]:
        return {
            "counts": self.counts.tobytes(),
            "latency": (self.latency.tobytes(), self.lat_sum, self.lat_max),
            "corrected": (self.corrected.tobytes(), self.cor_sum, self.cor_max),
            "received": self.received,
            "duplicated": self.duplicated,
            "misrouted": self.misrouted,
            "other": self.other,
            "comments": self.comments,
            "pre": self.pre,
            "last_ns": self.last_ns,
        }


class Subscriber(asyncio.Protocol):
    """One SSE stream. The read path is the load generator's hot loop: keep it lean."""

    __slots__ = (
        "_body",
        "_chunk_left",
        "_crlf",
        "_fast",
        "_head",
        "_raw",
        "_ready_on_head",
        "chunked",
        "closed",
        "complete_at",
        "connect_us",
        "content_type",
        "done",
        "error",
        "floor",
        "got",
        "idx",
        "last_id",
        "ready",
        "request",
        "seen",
        "seqs",
        "started",
        "status",
        "tally",
        "track",
        "transport",
        "want",
    )

    def __init__(self, idx: int, request: bytes, tally: Tally, ready_on_head: bool, track: bool) -> None:
        loop = asyncio.get_running_loop()
        self.idx = idx
        self.request = request
        self.tally = tally
        self.track = track  # resume mode: keep every seq and the last id
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.started = time.perf_counter()
        self.connect_us = 0
        self.status = 0
        self.content_type = ""
        self.error: str | None = None
        self.closed = False
        self.chunked = False
        self._head: bytes | None = b""  # None once the answer's head is read
        self._raw = b""
        self._chunk_left = 0
        self._crlf: bool | None = None
        # Chunked with LF line ends: data_received tries its short path first. (Set after the first
        # line end, by when a frame has marked the stream ready or a partial one is pending.)
        self._fast = False
        self._body = b""
        self.seen = bytearray()
        self.seqs: list[int] = []  # resume mode: every seq, in arrival order
        self.last_id: str | None = None
        # resume mode: complete_at is the time the want-th event with a seq >= floor arrived
        self.floor = self.got = 0
        self.want = 0
        self.complete_at = 0.0
        self._ready_on_head = ready_on_head

    # --- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.error is None and not self.ready.done():
            self.error = describe(exc) if exc else "closed before the stream started"
        elif self.error is None:
            self.error = describe(exc) if exc else "closed by the server"
        self._mark_ready(False)
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self._mark_ready(False)
        self._end()

    def close(self) -> None:
        if self.error is None:
            self.error = CLOSED_BY_US
        self._end()

    def _end(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows
        elif not self.done.done():
            self.closed = True
            self.done.set_result(None)

    def _mark_ready(self, ok: bool) -> None:
        if not self.ready.done():
            self.connect_us = int((time.perf_counter() - self.started) * 1e6)
            self.ready.set_result(ok)

    @property
    def alive(self) -> bool:
        return self.status == 200 and not self.closed

    # --- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._fast and not self._body and not self._raw and not self._chunk_left:
            # The usual read of a chunked stream: one whole chunk holding whole frames.
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0 and data.endswith(b"\n\n\r\n"):
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = -1
                if eol + size + 4 == len(data):
                    frames = data[eol + 2 : -2].split(b"\n\n")
                    frames.pop()
                    self._frames(frames)
                    return
        if self._head is not None:
            data = self._read_head(data)
            if not data:
                return
        if self.chunked:
            data = self._dechunk(data)
            if not data:
                return
        crlf = self._crlf
        if crlf is None:  # how this stream ends its lines, decided once at its first line end
            if b"\r" in data:
                crlf = self._crlf = True
            elif b"\n" in data:
                self._crlf = False
                self._fast = self.chunked
            else:
                crlf = True
        body = self._body + data if self._body else data
        if crlf:
            # Frames end at a blank line however lines end (CRLF, LF or CR); a CR at the very end
            # may be the first half of a CRLF, so it waits for the next read.
            held = body.endswith(b"\r")
            if held:
                body = body[:-1]
            body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            frames = body.split(b"\n\n")
            self._body = frames.pop() + (b"\r" if held else b"")
        else:
            frames = body.split(b"\n\n")
            self._body = frames.pop()
        if frames:
            if not self.ready.done():
                self._mark_ready(True)
            self._frames(frames)

    def _read_head(self, data: bytes) -> bytes:
        assert self._head is not None
        buf = self._head + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self.fail("response head too long")
            self._head = buf
            return b""
        self._head = None
        head, rest = buf[:end], buf[end + 4 :]
        lines = head.split(b"\r\n")
        try:
            self.status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self.fail("not an HTTP answer")
            return b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"content-type":
                self.content_type = value.strip().decode("latin-1")
        if self.status != 200:
            code = _ERROR_CODE.search(rest)
            self.fail(f"HTTP {self.status}" + (f" {code.group(1).decode()}" if code else ""))
            return b""
        if self._ready_on_head:
            self._mark_ready(True)
        return rest

    def _dechunk(self, data: bytes) -> bytes:
        """The payload in ``data`` (RFC 9112 chunked coding; extensions and trailers ignored)."""
        if not self._raw and not self._chunk_left:
            # The usual read: exactly one whole chunk (a server writes an event as one).
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0:
                try:
                    end = eol + 2 + int(data[:eol], 16)
                except ValueError:
                    end = 0
                if end + 2 == len(data) and end > eol + 2:
                    return data[eol + 2 : end]
        if self._raw:
            data, self._raw = self._raw + data, b""
        out = []
        pos, n = 0, len(data)
        left = self._chunk_left  # > 0: chunk bytes to come; < 0: CRLF bytes to skip; 0: a size line
        while pos < n:
            if left > 0:
                end = min(n, pos + left)
                out.append(data[pos:end])
                left -= end - pos
                pos = end
                if not left:
                    left = -2
            elif left < 0:
                skip = min(-left, n - pos)
                pos += skip
                left += skip
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self._raw = data[pos:]
                    if len(self._raw) > 1024:
                        self.fail("malformed chunked encoding")
                    break
                try:
                    left = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self.fail("malformed chunked encoding")
                    return b""
                if left == 0:
                    self.fail("the server ended the stream")
                    break
                pos = eol + 2
        self._chunk_left = left
        return out[0] if len(out) == 1 else b"".join(out)

    def _frames(self, frames: Iterable[bytes]) -> None:
        t = self.tally
        acct = t.acct
        for f in frames:
            if not f:
                continue
            if f[0] == 58 and b"\n" not in f:  # ':' a comment alone (a heartbeat)
                t.comments += 1
                continue
            if self.track:
                self._note_id(f)
            m = _USUAL.search(f)
            if m is not None:  # the default bodies' layout: one regex instead of three searches
                seq = int(m.group(2))
                ts = int(m.group(1))
                ours = m.group(3) == t.run_digits
            else:
                j = f.find(b'"seq":')
                m = _NUM.match(f, j + 6) if j >= 0 else None
                if m is None:
                    t.other += 1
                    continue
                seq = int(m.group(1))
                j = f.find(b'"run":')
                r = _NUM.match(f, j + 6) if j >= 0 else None
                ours = j < 0 or (r is not None and r.group(1) == t.run_digits)
                j = f.find(b'"ts":')
                m = _NUM.match(f, j + 5) if j >= 0 else None
                ts = int(m.group(1)) if m is not None else -1
            if self.track:
                self.seqs.append(seq)
                if seq >= self.floor:
                    self.got += 1
                    if self.got == self.want:
                        self.complete_at = time.perf_counter()
            if not t.started or (acct.limit and seq >= acct.limit) or not ours:
                t.pre += 1  # before the measured window, or an earlier run's (a reused channel)
                continue
            if ts < 0:
                t.other += 1
                continue
            now = time.time_ns()
            # stats.bucket(), inlined: this runs once per event
            us = (now - ts) // 1000
            if us > _MAX_US:
                us = _MAX_US  # a nonsense ts must not index past the histogram
            t.lat_sum += us
            if us > t.lat_max:
                t.lat_max = us
            if us < _EXACT:
                t.latency[us if us > 0 else 0] += 1
            else:
                e = us.bit_length() - _SUB_SHIFT
                t.latency[(e << _SUB_BITS) + (us >> e)] += 1
            if acct.interval_ns:
                us = (now - acct.t0_ns - int((seq // acct.per) * acct.interval_ns)) // 1000
                if us > _MAX_US:
                    us = _MAX_US
                t.cor_sum += us
                if us > t.cor_max:
                    t.cor_max = us
                if us < _EXACT:
                    t.corrected[us if us > 0 else 0] += 1
                else:
                    e = us.bit_length() - _SUB_SHIFT
                    t.corrected[(e << _SUB_BITS) + (us >> e)] += 1
            counts = t.counts
            if seq >= len(counts):
                t.grow(seq)
            if acct.mode == BROADCAST:
                seen = self.seen
                if seq >= len(seen):
                    seen.extend(bytes(seq + 1024 - len(seen)))
                if seen[seq]:
                    t.duplicated += 1
                else:
                    seen[seq] = 1
                    counts[seq] += 1
            else:
                counts[seq] += 1
                targets = t.targets
                if targets and targets[seq % len(targets)] != self.idx:
                    t.misrouted += 1
            t.received += 1
            t.last_ns = now

    def _note_id(self, frame: bytes) -> None:
        for line in frame.split(b"\n"):
            if line.startswith(b"id:"):
                value = line[3:]
                self.last_id = (value[1:] if value.startswith(b" ") else value).decode("utf-8", "replace")
