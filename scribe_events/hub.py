"""The hub: this instance's live connections, routing of deliveries to them, and the shared heartbeat.

The hot path is :meth:`Hub.dispatch`: for one :class:`~scribe_events.events.Delivery` it picks the
target connections through an index (all, by user, or by user and session), skips those whose type
filter refuses it, and writes the event's pre-built chunk to each socket. There is no per-connection
task or timer on that path, and no queue while the socket takes data: its write buffer is the queue.
Once a socket's buffer is past ``max_buffer`` bytes, further deliveries wait in the connection's
:class:`~scribe_events.backlog.Backlog` (where a ``system.error`` jumps the line and a newer
progress update replaces an older one), written out as the socket drains (:meth:`Hub.drain`,
called when the transport resumes writing). A client whose backlog passes ``max_queue`` bytes is
cut off: it resumes with Last-Event-ID, so nothing is lost, and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from scribe_events import sse
from scribe_events.backlog import Backlog
from scribe_events.events import Delivery, TypeFilter, dumps, now_ms, rfc3339
from scribe_events.metrics import Histogram, count_family
from scribe_events.tasks import cancel, supervise

log = logging.getLogger("scribe_events.hub")

EMPTY: frozenset[Connection] = frozenset()
# Live events held for one connection while it replays; past this it is cut off as slow.
MAX_PENDING = 10_000
# Sent at once even to a stream that is still replaying (without an id: line, see Delivery).
URGENT_TYPE = "system.error"
# The last frame of a stream the server ends to restart: when to come back (see Hub.close).
CLOSING_TYPE = "connection.closing"


class Sink(Protocol):
    """What a connection writes to: an asyncio transport, or :class:`~scribe_events.web.sinks.AsgiSink`."""

    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Connection:
    """One open stream. ``pending`` is a list while the stream replays, ``None`` once it is live."""

    __slots__ = (
        "backlog",
        "backlog_from",
        "batch",
        "batch_from",
        "batch_room",
        "buffer_size",
        "closed_reason",
        "connected_at",
        "expires_at",
        "id",
        "is_admin",
        "last_seq",
        "live_from",
        "pending",
        "remote",
        "session_id",
        "sink",
        "types",
        "user_agent",
        "user_id",
        "write",
    )

    def __init__(
        self,
        id: str,
        user_id: str,
        session_id: str | None,
        sink: Sink,
        *,
        types: TypeFilter | None = None,
        remote: str = "",
        user_agent: str = "",
        replaying: bool = False,
        expires_at: float | None = None,
        is_admin: bool = False,
    ) -> None:
        self.id = id
        self.user_id = user_id
        self.session_id = session_id
        self.types = types
        self.sink = sink
        self.write: Callable[[bytes], Any] = sink.write
        self.buffer_size: Callable[[], int] = sink.get_write_buffer_size
        self.pending: list[Delivery] | None = [] if replaying else None
        # Deliveries waiting while the socket's write buffer is full (None: write straight to it).
        self.backlog: Backlog | None = None
        # The newest stored event written to this stream: a live delivery at or below it is a
        # duplicate (an outbox re-publish, or the replay seam) and is skipped.
        self.last_seq = 0
        # The newest stored event dispatched when the stream was registered: what came after it is
        # owed live (and recorded as failed if the stream is cut before it got it); what came
        # before it is a backlog the client asked to replay.
        self.live_from = 0
        # While the socket has a backlog: the last stored event written before it began (-1: none).
        self.backlog_from = -1
        # During one dispatch of several events: this connection's chunks, written as one at its end
        # (one write per connection per batch), and its last stored event before the batch.
        self.batch: list[bytes] | None = None
        self.batch_from = 0
        self.batch_room = 0  # bytes the batch may still take before the high-water mark
        self.connected_at = time.time()
        self.remote = remote
        self.user_agent = user_agent
        self.closed_reason: str | None = None
        self.expires_at = expires_at  # the token's exp (epoch seconds): the stream ends then
        self.is_admin = is_admin

    @property
    def ip(self) -> str:
        return remote_ip(self.remote)

    @property
    def flushed_seq(self) -> int:
        """The last stored event known to have left the write buffer. If the connection is cut,
        the events after it are the ones recorded as failed deliveries."""
        return self.backlog_from if self.backlog_from >= 0 else self.last_seq


def remote_ip(remote: str) -> str:
    """The address part of ``host:port`` (IPv6 addresses hold colons themselves)."""
    return remote.rsplit(":", 1)[0] if remote else ""


FailureHook = Callable[[Connection, str], None]


class Hub:
    """Local connections of this instance, indexed for routing."""

    def __init__(
        self, *, instance: str, heartbeat_s: float, max_buffer: int, max_queue: int = 1024 * 1024
    ) -> None:
        self.instance = instance
        self.heartbeat_s = heartbeat_s
        self.max_buffer = max_buffer
        self.max_queue = max_queue
        self.connections: dict[str, Connection] = {}
        self._by_user: dict[str, set[Connection]] = {}
        self._by_session: dict[tuple[str, str], set[Connection]] = {}
        self._per_ip: dict[str, int] = {}
        self.on_cut: list[FailureHook] = []
        self.on_add: list[Callable[[Connection], None]] = []
        self.on_remove: list[Callable[[Connection], None]] = []
        # Counted in plain numbers, read when metrics are scraped (see metrics.py).
        self.delivered = 0  # events written to live streams
        self.delivered_by: dict[str, int] = {}  # the same, by type family
        self.latency = Histogram()  # publish to write, once per event written here
        self.opened = 0
        self.closed: Counter[str] = Counter()  # by reason
        self.cut_off = 0
        self.cut_by: Counter[str] = Counter()  # by reason
        self.replays = 0
        self.replayed = 0  # events written by replays
        self.replaced = 0  # progress updates dropped from a backlog for a newer one
        self.last_seq = 0  # the newest stored event dispatched
        self._heartbeat: asyncio.Task[None] | None = None
        self.closing = False

    # -- membership ------------------------------------------------------------------------------

    def add(self, conn: Connection, *, from_seq: int | None = None) -> None:
        """Register a connection; ``from_seq`` is where a resuming one replays from."""
        conn.last_seq = self.last_seq if from_seq is None else from_seq
        conn.live_from = self.last_seq
        self.connections[conn.id] = conn
        self.opened += 1
        ip = conn.ip
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        _run_hooks(self.on_add, conn)
        self._by_user.setdefault(conn.user_id, set()).add(conn)
        if conn.session_id is not None:
            self._by_session.setdefault((conn.user_id, conn.session_id), set()).add(conn)
        log.info(
            "connection %s opened user=%s session=%s remote=%s",
            conn.id,
            conn.user_id,
            conn.session_id,
            conn.remote,
        )

    def remove(self, conn: Connection, reason: str) -> None:
        """Forget a connection (idempotent) and log why it ended."""
        if self.connections.pop(conn.id, None) is None:
            return
        conn.closed_reason = conn.closed_reason or reason
        self.closed[conn.closed_reason] += 1
        _run_hooks(self.on_remove, conn)
        _discard(self._by_user, conn.user_id, conn)
        if conn.session_id is not None:
            _discard(self._by_session, (conn.user_id, conn.session_id), conn)
        ip = conn.ip
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)
        log.info(
            "connection %s closed user=%s reason=%s age=%.1fs",
            conn.id,
            conn.user_id,
            conn.closed_reason,
            time.time() - conn.connected_at,
        )

    def __len__(self) -> int:
        return len(self.connections)

    def users(self) -> list[str]:
        return list(self._by_user)

    def of_user(self, user_id: str) -> list[Connection]:
        return list(self._by_user.get(user_id, EMPTY))

    def count_user(self, user_id: str) -> int:
        return len(self._by_user.get(user_id, EMPTY))

    def count_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    # -- the hot path ----------------------------------------------------------------------------

    def dispatch(self, deliveries: Sequence[Delivery]) -> None:
        """Write each delivery to every local connection that should receive it.

        A batch of several events is written with one write per connection (its chunks joined),
        a lone event straight away: the socket write is most of what delivery costs.

        Never raises for one connection's sake: whatever goes wrong with one (a write error, a
        full buffer, a bug) is noted and that connection is cut *after* the loop, so the indexes
        are never changed while they are being iterated and the rest of the batch goes out.
        """
        limit = self.max_buffer
        troubled: list[tuple[Connection, str]] | None = None
        coalesce = len(deliveries) > 1
        touched: list[Connection] = []
        try:
            troubled = self._deliver(deliveries, coalesce, touched, limit)
        finally:
            troubled = self._flush_batches(touched, limit, troubled)
        if troubled:
            self._cut_all(troubled)

    def _deliver(
        self, deliveries: Sequence[Delivery], coalesce: bool, touched: list[Connection], limit: int
    ) -> list[tuple[Connection, str]] | None:
        """dispatch's loop; the connections it batched for are in ``touched``."""
        troubled: list[tuple[Connection, str]] | None = None
        delivered = 0
        by_family = self.delivered_by
        now = 0
        for d in deliveries:
            if d.broadcast:
                targets: Iterable[Connection] = self.connections.values()
            elif d.readers is not None:
                targets = self._of_readers(d.readers)
            elif d.session_id is not None:
                targets = self._by_session.get((d.user_id, d.session_id), EMPTY)  # type: ignore[arg-type]
            else:
                targets = self._by_user.get(d.user_id, EMPTY)  # type: ignore[arg-type]
            chunk = d.chunk
            type_ = d.type
            seq = d.seq
            before = delivered
            for c in targets:
                try:
                    if c.types is not None and not c.types(type_):
                        continue
                    if c.pending is not None:
                        c.pending.append(d)
                        problem = None
                        if type_ == URGENT_TYPE:  # never delayed behind a replay
                            problem = self._write(c, (d.overtaking_chunk(),))
                        if problem is None and len(c.pending) > MAX_PENDING:
                            problem = "slow_client"
                        if problem is not None:
                            troubled = troubled or []
                            troubled.append((c, problem))
                        continue
                    if seq is not None and seq <= c.last_seq:
                        continue  # already sent (relayed again, or covered by its replay)
                    if c.backlog is not None:
                        if (problem := self._hold(c, d)) is not None:
                            troubled = troubled or []
                            troubled.append((c, problem))
                        continue
                    batch = c.batch
                    if batch is not None:
                        batch.append(chunk)
                        c.batch_room -= len(chunk)
                        if c.batch_room < 0:  # past the high-water mark: out now, as a lone one would
                            c.batch = None
                            c.write(b"".join(batch))
                            self._after_write(c, c.batch_from, limit)
                    elif coalesce and (room := limit - c.buffer_size() - len(chunk)) >= 0:
                        c.batch = [chunk]
                        c.batch_from = c.last_seq
                        c.batch_room = room
                        touched.append(c)
                    else:
                        c.write(chunk)
                        self._after_write(c, c.last_seq, limit)
                    if seq is not None:
                        c.last_seq = seq
                except Exception:  # a transport that is already closing, or worse
                    troubled = troubled or []
                    troubled.append((c, "write_error"))
                    continue
                delivered += 1
            if delivered != before:  # per event, not per connection
                count_family(by_family, type_, delivered - before)
                if d.time_ms:
                    now = now or now_ms()
                    self.latency.observe(max(0, now - d.time_ms) / 1000)
            if seq is not None and seq > self.last_seq:
                self.last_seq = seq
        self.delivered += delivered
        return troubled

    def _flush_batches(
        self, touched: list[Connection], limit: int, troubled: list[tuple[Connection, str]] | None
    ) -> list[tuple[Connection, str]] | None:
        """The batch's chunks, one write per connection (also when the loop failed half-way)."""
        for c in touched:
            chunks, c.batch = c.batch, None
            if chunks is None:
                continue  # written already (it reached the high-water mark)
            try:
                c.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                self._after_write(c, c.batch_from, limit)
            except Exception:
                if c.backlog_from < 0:
                    c.backlog_from = c.batch_from  # none of the batch is known to have left
                troubled = troubled or []
                troubled.append((c, "write_error"))
        return troubled

    @staticmethod
    def _after_write(c: Connection, written_before: int, limit: int) -> None:
        """After a write: note where a backlog would begin, and start one past the high-water mark."""
        if c.buffer_size():
            if c.backlog_from < 0:
                c.backlog_from = written_before
            if c.buffer_size() > limit:
                c.backlog = Backlog()  # what comes next waits until the socket drains
        elif c.backlog_from >= 0:
            c.backlog_from = -1

    def _hold(self, conn: Connection, d: Delivery) -> str | None:
        """Queue a delivery for a connection whose socket is full; why it must be cut, or None."""
        backlog = conn.backlog
        assert backlog is not None
        if d.type == URGENT_TYPE:  # jumps the line: written now, ahead of what waits
            conn.write(d.overtaking_chunk())
        replaced = backlog.replaced
        backlog.add(d)
        self.replaced += backlog.replaced - replaced
        if d.seq is not None:
            conn.last_seq = d.seq
        return "slow_client" if backlog.bytes > self.max_queue else None

    def drain(self, conn: Connection) -> None:
        """The socket takes data again: write what waits, up to the high-water mark. Never raises."""
        backlog = conn.backlog
        if backlog is None or conn.id not in self.connections:
            return
        try:
            # Until the buffer is past the high-water mark again (the transport then pauses, and
            # says when it resumes: the transport's high-water mark is max_buffer, see stream.py).
            while backlog and (room := self.max_buffer - conn.buffer_size()) >= 0:
                chunks = backlog.take(room + 1, self.delivered_by)
                conn.write(b"".join(chunks))
                self.delivered += len(chunks)
            if not backlog:
                conn.backlog = None
        except Exception:
            self.cut(conn, "write_error")

    def _of_readers(self, readers: tuple[str, ...]) -> list[Connection]:
        """Every connection of a task's readers (a task's event ignores sessions)."""
        by_user = self._by_user
        return [c for u in readers for c in by_user.get(u, EMPTY)]

    def _cut_all(self, troubled: Iterable[tuple[Connection, str]]) -> None:
        for c, reason in troubled:
            self.cut(c, reason)

    def cut(self, conn: Connection, reason: str) -> None:
        """Drop a connection now: buffered bytes are discarded, the client resumes from its last id."""
        if conn.id not in self.connections:
            return
        if reason == "write_error" and _closing(conn):
            self.remove(conn, "client_closed")  # the client left first: an ordinary disconnect
            return
        conn.closed_reason = reason
        self.cut_off += 1
        self.cut_by[reason] += 1
        log.warning(
            "connection %s cut off user=%s reason=%s buffered=%d",
            conn.id,
            conn.user_id,
            reason,
            _safe_size(conn),
        )
        _run_hooks(self.on_cut, conn, reason)
        self.remove(conn, reason)
        with contextlib.suppress(Exception):
            conn.sink.abort()

    def _write(self, conn: Connection, chunks: Iterable[bytes], seq: int | None = None) -> str | None:
        """Write chunks to one connection; the reason it must be cut, or None. Changes no index."""
        try:
            for chunk in chunks:
                conn.write(chunk)
            size = conn.buffer_size()
        except Exception:
            return "write_error"
        if size and conn.backlog_from < 0:
            conn.backlog_from = conn.last_seq
        elif not size:
            conn.backlog_from = -1
        if seq is not None:
            conn.last_seq = max(conn.last_seq, seq)
        return "slow_client" if size > self.max_buffer + self.max_queue else None

    def write_direct(self, conn: Connection, chunks: Iterable[bytes], seq: int | None = None) -> bool:
        """Write chunks to one connection outside :meth:`dispatch` (greeting, replay, heartbeat).

        ``seq`` is the newest stored event among them. Returns False if the connection was cut.
        """
        problem = self._write(conn, chunks, seq)
        if problem is not None:
            self.cut(conn, problem)
            return False
        return True

    def flush_pending(self, conn: Connection, limit: int) -> bool:
        """End a replay step by step: write up to ``limit`` of the deliveries parked meanwhile
        (skipping what the replay already sent). Returns True once none are left and the
        connection is live; the caller paces the steps by the socket (see ``stream._replay``)."""
        pending = conn.pending
        if pending is None:
            return True
        if not pending:
            conn.pending = None  # live from here: dispatch writes to it directly
            return True
        step, conn.pending = pending[:limit], pending[limit:]
        top = conn.last_seq
        chunks = []
        for d in step:
            if d.seq is not None:
                if d.seq <= top:
                    continue
                top = d.seq
            chunks.append(d.chunk)
            count_family(self.delivered_by, d.type)
        if chunks:
            self.delivered += len(chunks)
            self.write_direct(conn, chunks, top)
        return False

    # -- heartbeat and shutdown ------------------------------------------------------------------

    def start(self) -> None:
        self._heartbeat = supervise(self._beat, "scribe-heartbeat")

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.heartbeat_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += self.heartbeat_s
            self.heartbeat()

    def heartbeat(self) -> None:
        """One shared tick: the same heartbeat chunk goes to every live connection; streams whose
        token has expired end (their clients resume with a fresh ticket and miss nothing)."""
        chunk = sse.chunk(sse.frame(dumps({"server_time": rfc3339(now_ms())}), event="heartbeat"))
        now = time.time()
        expired, troubled = [], []
        for c in self.connections.values():
            if c.expires_at is not None and c.expires_at <= now:
                expired.append(c)
            elif (
                c.pending is None and c.backlog is None and (problem := self._write(c, (chunk,))) is not None
            ):
                troubled.append((c, problem))
            elif c.backlog is not None and _safe_size(c) < self.max_buffer // 2:
                self.drain(c)  # in case the transport never said it resumed (a sink without flow control)
        self._cut_all(troubled)
        for c in expired:
            self.end(c, "token_expired")

    def end(self, conn: Connection, reason: str) -> None:
        """End a stream cleanly: the chunked body's end, then close (unsent bytes still go out)."""
        conn.closed_reason = reason
        with contextlib.suppress(Exception):
            conn.write(sse.CHUNK_END)
        with contextlib.suppress(Exception):
            conn.sink.close()
        self.remove(conn, reason)

    async def close(self, spread_ms: int = 0) -> None:
        """Graceful end: stop the heartbeat, tell every stream when to come back, finish its chunked
        body, close the socket. With ``spread_ms`` each stream is told a random delay in
        ``[0, spread_ms]`` (``retry:`` and a ``connection.closing`` event), so their clients come
        back spread over that window instead of all at once."""
        self.closing = True
        await cancel(self._heartbeat)
        self._heartbeat = None
        for conn in list(self.connections.values()):
            if spread_ms > 0:
                after = random.randint(0, spread_ms)
                notice = dumps({"reason": "shutdown", "reconnect_after_ms": after})
                with contextlib.suppress(Exception):
                    conn.write(sse.chunk(sse.frame(notice, event=CLOSING_TYPE, retry=after)))
            self.end(conn, "shutdown")


def _run_hooks(hooks: Iterable[Callable[..., None]], *args: Any) -> None:
    """Tell every hook; one that fails is logged and never stops the others, or the hub."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception:
            log.exception("a connection hook failed (%s)", getattr(hook, "__qualname__", hook))


def _discard(index: dict[Any, set[Connection]], key: Any, conn: Connection) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(conn)
        if not members:
            del index[key]


def _closing(conn: Connection) -> bool:
    try:
        return bool(conn.sink.is_closing())
    except Exception:
        return True


def _safe_size(conn: Connection) -> int:
    try:
        return conn.buffer_size()
    except Exception:
        return -1
