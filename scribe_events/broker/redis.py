"""Redis broker: every instance publishes to, and subscribes to, one channel.

Why one channel and not one per user: the stream's ids must rise strictly on every connection, and
a client's ``Last-Event-ID`` must never pass an event it has not had. One channel gives each
instance the events in exactly the order they were published (the publisher holds the store's
publish lock from COMMIT through PUBLISH, so that order is id order). Per-user channels, or sharded
channels spread over a Redis Cluster, would let a broadcast overtake a user's event on the way to
an instance. The cost, that every instance decodes every event once, is measured in the benchmarks
(README); at our scale it is small next to delivering them.

If the subscription drops (Redis restarts, the network blips), the instance keeps its streams fed
from the store (it polls for stored events after the last one it dispatched, every 250 ms) while it
re-subscribes with backoff; once subscribed again it catches up from the store the same way before
going on with live messages. Every stream gets every event once and in order: the hub skips what a
connection already has, so overlap is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scribe_events.broker.base import Broker, DeliverySink
from scribe_events.constants import RedisKeys
from scribe_events.events import Delivery, Event
from scribe_events.tasks import cancel, spawn

log = logging.getLogger("scribe_events.broker.redis")

CatchUp = Callable[[int], Awaitable[list[Event]]]

_MAX_BACKOFF_S = 5.0
STORE_POLL_S = 0.25  # while Redis is away


def encode(events: Sequence[Event]) -> bytes:
    """One message per batch: routing and the finished envelope of each event."""
    return json.dumps(
        [
            [
                e.wire_id,
                None if e.resend else e.id,
                e.type,
                e.user_id,
                e.session_id,
                e.broadcast,
                e.envelope(),
            ]
            for e in events
        ],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def decode(payload: bytes) -> list[Delivery]:
    return [Delivery.build(*row) for row in json.loads(payload)]


class RedisBroker(Broker):
    name = "redis"
    shared = True

    def __init__(
        self, url: str, client: aioredis.Redis, keys: RedisKeys, *, catch_up: CatchUp, last_seq: int = 0
    ) -> None:
        """``client`` is the instance's command pool (shared, closed by its owner); the
        subscription gets a connection of its own, without a read timeout."""
        super().__init__()
        self.keys = keys
        self.client = client
        self._listener_client = aioredis.from_url(url, socket_connect_timeout=2, health_check_interval=5)
        self._catch_up = catch_up
        self.last_seq = last_seq
        self._sink: DeliverySink | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.up = False
        self.reconnects = 0

    async def start(self, sink: DeliverySink) -> None:
        self._sink = sink
        self._task = spawn(self._listen(), "scribe-redis-listener")
        try:
            await asyncio.wait_for(self._subscribed.wait(), 5)
        except TimeoutError:
            log.error("Redis is not reachable; serving local connections and retrying")

    async def publish(self, events: Sequence[Event]) -> None:
        await self.client.publish(self.keys.events, encode(events))

    async def publish_control(self, message: dict[str, Any]) -> None:
        await self.client.publish(self.keys.control, json.dumps(message))

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
            events = await self._catch_up(self.last_seq)
            if not events:
                return
            self._dispatch([e.delivery() for e in events])

    async def _on_message(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        if channel == self.keys.events:
            self._dispatch(decode(message["data"]))
        elif channel == self.keys.control and self.on_control is not None:
            try:
                await self.on_control(json.loads(message["data"]))
            except Exception:
                log.exception("a control message failed")

    def _dispatch(self, deliveries: list[Delivery]) -> None:
        fresh = []
        for d in deliveries:
            if d.seq is not None:
                if d.seq <= self.last_seq:
                    continue  # already dispatched here (the relay or a catch-up sent it before)
                self.last_seq = d.seq
            fresh.append(d)
        if fresh and self._sink is not None:
            self._sink(fresh)
