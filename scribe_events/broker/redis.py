"""Redis broker: every instance publishes to, and subscribes to, one channel.

Why one channel and not one per user: the stream's ids must rise strictly on every connection, and
a client's ``Last-Event-ID`` must never pass an event it has not had. One channel gives each
instance the events in exactly the order they were published (the publisher holds the store's
publish lock from COMMIT through PUBLISH, so that order is id order). Per-user channels, or sharded
channels spread over a Redis Cluster, would let a broadcast overtake a user's event on the way to
an instance. The cost, that every instance decodes every event once, is measured in the benchmarks
(README); at our scale it is small next to delivering them.

Every message is tagged with the identity of the store it came from (see ``EventStore.identity``):
two deployments that share one Redis with the same key prefix would otherwise take each other's
events and ids for their own. A foreign message is ignored, counted and logged, and
``/health/ready`` reports it.

If the subscription drops (Redis restarts, the network blips), the instance keeps its streams fed
from the store (it polls for stored events after the last one it dispatched, every 250 ms) while it
re-subscribes with backoff; once subscribed again it catches up from the store the same way before
going on with live messages. Every stream gets every event once and in order: the hub skips what a
connection already has, so overlap is harmless.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scribe_events.broker.base import Broker, DeliverySink
from scribe_events.constants import RedisKeys
from scribe_events.events import Delivery, Event, SkipHook, envelope_time_ms, sendable, skipped
from scribe_events.store import Page
from scribe_events.tasks import cancel, supervise

log = logging.getLogger("scribe_events.broker.redis")

CatchUp = Callable[[int], Awaitable[Page]]

_MAX_BACKOFF_S = 5.0
STORE_POLL_S = 0.25  # while Redis is away


FOREIGN_LOG_EVERY_S = 60.0
IN_FLIGHT_MAX = 1000


def _row(e: Event) -> list[Any]:
    row: list[Any] = [
        e.wire_id,
        None if e.resend else e.id,
        e.type,
        e.user_id,
        e.session_id,
        e.broadcast,
        e.envelope(),
    ]
    if e.for_task or e.task_id is not None or e.novel_id is not None:
        row += [list(e.readers or ()) if e.for_task else None, e.task_id, e.novel_id]
    return row


def _dumps(rows: Any) -> bytes:
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode()


def encode(events: Sequence[Event], origin: int = 0, on_skip: SkipHook | None = None) -> bytes:
    """One message per batch, tagged with its store's identity: ``<origin>:<JSON rows>``, each row
    the routing and the finished envelope of one event. An event that cannot be encoded is
    skipped (and reported), never the whole batch."""
    try:
        body = _dumps([_row(e) for e in events])
    except ValueError:
        rows = []
        for e in events:
            try:
                _dumps(row := _row(e))
            except ValueError as exc:
                skipped(e, exc, on_skip)
                continue
            rows.append(row)
        body = _dumps(rows)
    return b"%d:%b" % (origin, body)


def _token(payload: bytes) -> tuple[int, int]:
    return len(payload), zlib.crc32(payload)


def decode(payload: bytes) -> tuple[int, list[Delivery]]:
    """The origin and the deliveries of a message; a row that cannot be framed is skipped."""
    origin, _, body = payload.partition(b":")
    deliveries = []
    for row in json.loads(body):
        try:
            deliveries.append(Delivery.build(*row, time_ms=envelope_time_ms(row[6])))
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            log.error("a broker message holds an event that cannot be sent; skipped: %s", exc)
    return int(origin), deliveries


class RedisBroker(Broker):
    name = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        client: aioredis.Redis,
        keys: RedisKeys,
        *,
        catch_up: CatchUp,
        last_seq: int = 0,
        origin: int = 0,
    ) -> None:
        """``client`` is the instance's command pool (shared, closed by its owner); the
        subscription gets a connection of its own, without a read timeout. ``origin`` is the
        store's identity, which tags every message."""
        super().__init__()
        self.origin = origin
        self._foreign_logged_at = -FOREIGN_LOG_EVERY_S
        self.keys = keys
        self.client = client
        self._listener_client = aioredis.from_url(url, socket_connect_timeout=2, health_check_interval=5)
        self._catch_up = catch_up
        self.last_seq = last_seq
        self._sink: DeliverySink | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.up = False
        # This instance's own messages on their way, oldest first: (a token of the payload, sent at),
        # to time the round trip when each comes back (the channel keeps their order).
        self._in_flight: collections.deque[tuple[tuple[int, int], float]] = collections.deque(
            maxlen=IN_FLIGHT_MAX
        )

    async def start(self, sink: DeliverySink) -> None:
        self._sink = sink
        self._task = supervise(self._listen, "scribe-redis-listener")
        try:
            await asyncio.wait_for(self._subscribed.wait(), 5)
        except TimeoutError:
            log.error("Redis is not reachable; serving local connections and retrying")

    async def publish(self, events: Sequence[Event]) -> None:
        payload = encode(events, self.origin, self.on_unsendable)
        self._in_flight.append((_token(payload), time.monotonic()))
        await self.client.publish(self.keys.events, payload)

    def _came_back(self, payload: bytes) -> None:
        """Time the round trip of one of this instance's own messages. Ours come back in order, so
        the ones before it that have not come back never will (lost in a Redis blip): forgotten."""
        in_flight = self._in_flight
        if not in_flight:
            return
        token = _token(payload)
        for i, (sent, at) in enumerate(in_flight):
            if sent == token:
                for _ in range(i + 1):
                    in_flight.popleft()
                self.round_trip.observe(time.monotonic() - at)
                return
        # Another instance's message: nothing of ours to time.

    async def publish_control(self, message: dict[str, Any]) -> None:
        await self.client.publish(self.keys.control, json.dumps({**message, "origin": self.origin}))

    def _foreign(self, origin: Any) -> bool:
        """True (counted, logged once a minute) for a message of another deployment."""
        if origin == self.origin:
            return False
        self.foreign += 1
        now = time.monotonic()
        if now - self._foreign_logged_at >= FOREIGN_LOG_EVERY_S:
            self._foreign_logged_at = now
            log.error(
                "ignoring broker messages from another deployment (store %s, ours %s) on the Redis prefix "
                "%r: %d so far. Give each deployment its own SCRIBE_EVENTS_REDIS_PREFIX.",
                origin,
                self.origin,
                self.keys.prefix,
                self.foreign,
            )
        return True

    async def ready(self) -> bool:
        return self.up

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None
        await self._listener_client.aclose()

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            pubsub = self._listener_client.pubsub()
            try:
                await pubsub.subscribe(self.keys.events, self.keys.control)
                self._in_flight.clear()  # what was sent while away will not come back
                if not self.up and self._subscribed.is_set():
                    self.reconnects += 1
                    log.warning(
                        "Redis subscription is back; catching up from the store after id %d", self.last_seq
                    )
                await self._catch_up_from_store()
                if self.on_subscribed is not None:
                    await self.on_subscribed()  # reload shared state changes missed while away
                self.up = True
                self._subscribed.set()
                delay = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        await self._on_message(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis, the store during catch-up, a bad message: retry, never stop
                if self.up or not isinstance(exc, RedisError | OSError):
                    log.error(
                        "lost the Redis subscription (%s: %s); serving from the store, retrying with backoff",
                        type(exc).__name__,
                        exc,
                    )
                self.up = False
                await self._serve_from_store(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _serve_from_store(self, seconds: float) -> None:
        """While Redis is away, local streams still get every stored event, in order, a little
        later: poll the store (the publishers' events are all committed there)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while True:
            try:
                await self._catch_up_from_store()
            except Exception as exc:  # the store may be down too; keep retrying Redis
                log.warning("could not read the store while Redis is away: %s", exc)
            left = until - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(STORE_POLL_S, left))

    async def _catch_up_from_store(self) -> None:
        while True:
            page = await self._catch_up(self.last_seq)
            self._dispatch(sendable(page, self.on_unsendable))
            self.last_seq = max(self.last_seq, page.through)  # unreadable rows included
            if not page.full:
                return

    async def _on_message(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        try:
            if channel == self.keys.events:
                self._came_back(message["data"])
                origin, deliveries = decode(message["data"])
                if not self._foreign(origin):
                    self._dispatch(deliveries)
            elif channel == self.keys.control and self.on_control is not None:
                control = json.loads(message["data"])
                if not self._foreign(control.pop("origin", None)):
                    await self.on_control(control)
        except Exception:  # one bad message must not cost the subscription
            log.exception("a broker message on %r could not be handled; skipped", channel)

    def _dispatch(self, deliveries: list[Delivery]) -> None:
        fresh = []
        for d in deliveries:
            if d.seq is not None:
                if d.seq <= self.last_seq:
                    continue  # already dispatched here (the relay or a catch-up sent it before)
                self.last_seq = d.seq
            fresh.append(d)
        if fresh and self._sink is not None:
            try:
                self._sink(fresh)
            except Exception:  # the hub does not raise for a connection's sake; this is a bug
                log.exception("dispatching %d event(s) failed", len(fresh))
