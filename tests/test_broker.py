"""The Redis broker in this process against the real Redis: order, de-duplication, routing fields,
foreign deployments, bad messages, and catching up from the store while Redis is away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from scribe_events.broker import make_broker
from scribe_events.broker.memory import MemoryBroker
from scribe_events.broker.redis import RedisBroker, decode, encode
from scribe_events.config import Settings
from scribe_events.constants import RedisKeys, redis_client
from scribe_events.events import Delivery, Event
from scribe_events.store.sql import SQLEventStore
from tests.conftest import REDIS_URL


def _ev(n: int, *, id: int | None = None, **kw: Any) -> Event:
    e = Event("custom.n", json.dumps({"n": n}), user_id=kw.pop("user_id", "u"), id=id, **kw)
    return e


class Sink:
    def __init__(self) -> None:
        self.got: list[Delivery] = []

    def __call__(self, deliveries: Any) -> None:
        self.got.extend(deliveries)

    def seqs(self) -> list[int | None]:
        return [d.seq for d in self.got]


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def _brokers(
    prefix: str,
    body: Callable[..., Awaitable[None]],
    *,
    origins: tuple[int, ...] = (7, 7),
    catch_up: Any = None,
) -> None:
    client = redis_client(REDIS_URL)
    keys = RedisKeys(prefix)
    brokers, sinks = [], []

    async def nothing(after: int) -> Any:
        from scribe_events.store import Page

        return Page([], through=after, full=False)

    try:
        for origin in origins:
            b = RedisBroker(REDIS_URL, client, keys, catch_up=catch_up or nothing, origin=origin)
            sink = Sink()
            await b.start(sink)
            brokers.append(b)
            sinks.append(sink)
        await body(brokers, sinks, client, keys)
    finally:
        for b in brokers:
            await b.close()
        await client.aclose()


def test_broker_delivers_in_order_to_every_instance_once_with_routing_fields(redis_prefix: str) -> None:
    async def body(brokers: list[RedisBroker], sinks: list[Sink], *_: Any) -> None:
        one, two = brokers
        task = Event("custom.t", "{}", id=3, task_id="t1", for_task=True, readers=("alice", "bob"))
        novel = Event("custom.c", "{}", id=4, user_id="u", novel_id="n1")
        first = _ev(1, id=1)
        await one.publish([first, _ev(2, id=2), task, novel])
        await one.publish([_ev(2, id=2)])  # published again (a relay): dropped by every instance
        progress = Event("task.progress-updated", "{}", user_id="u", id=6, task_id="t9")  # for a user
        await one.publish([_ev(2, id=2), progress])  # a duplicate first: what follows still goes
        live = _ev(9)  # live-only: no seq, always through
        await one.publish([live, _ev(5, id=5)])  # 5 is below 6, already dispatched: dropped
        await one.publish([_ev(7, id=7)])
        for sink in sinks:
            await _until(lambda s=sink: len(s.got) >= 7)
        await asyncio.sleep(0.1)
        for sink in sinks:
            assert sink.seqs() == [1, 2, 3, 4, 6, None, 7]
            assert sink.got[2].readers == ("alice", "bob") and sink.got[2].task_id == "t1"
            assert sink.got[3].readers is None and sink.got[3].novel_id == "n1"
            assert sink.got[4].task_id == "t9" and sink.got[4].readers is None  # throttling needs it
            assert sink.got[0].chunk == first.delivery().chunk  # the same bytes as made here
            assert b"id: 1\n" in sink.got[0].chunk and b"id:" not in sink.got[5].chunk
        assert one.last_seq == two.last_seq == 7
        assert await one.ready() and await two.ready()

    asyncio.run(_brokers(redis_prefix, body))


def test_broker_ignores_another_deployments_messages_and_counts_them(redis_prefix: str) -> None:
    async def body(brokers: list[RedisBroker], sinks: list[Sink], *_: Any) -> None:
        ours, theirs = brokers
        controls: list[dict[str, Any]] = []

        async def on_control(message: dict[str, Any]) -> None:
            controls.append(message)

        ours.on_control = on_control
        await theirs.publish([_ev(1, id=1)])
        await theirs.publish_control({"kind": "ban"})
        await ours.publish([_ev(2, id=2)])
        await ours.publish_control({"kind": "push-mode", "mode": "sse"})
        await _until(lambda: len(sinks[0].got) >= 1 and len(controls) >= 1)
        await asyncio.sleep(0.1)
        assert sinks[0].seqs() == [2] and ours.foreign == 2
        assert controls == [{"kind": "push-mode", "mode": "sse"}]  # origin stripped
        assert sinks[1].seqs() == [1] and theirs.foreign == 1

    asyncio.run(_brokers(redis_prefix, body, origins=(7, 8)))


def test_broker_skips_a_bad_message_and_an_unencodable_event_and_goes_on(redis_prefix: str) -> None:
    async def body(
        brokers: list[RedisBroker], sinks: list[Sink], client: aioredis.Redis, keys: RedisKeys
    ) -> None:
        (one,) = brokers
        skipped: list[Event] = []
        one.on_unsendable = lambda e, exc: skipped.append(e)
        await client.publish(keys.events, b"7:not json")
        await client.publish(keys.events, b'7:[["1", 1, "custom.x"]]')  # a row that cannot be framed
        bad = Event("custom.bad", '{"s": "\\ud800"}', user_id="u", id=2)
        bad.data_json = '{"s": "\ud800"}'  # a lone surrogate: cannot be encoded to UTF-8
        await one.publish([bad, _ev(3, id=3)])
        await _until(lambda: len(sinks[0].got) >= 1)
        assert sinks[0].seqs() == [3] and skipped == [bad]
        await one.publish([_ev(4, id=4)])
        await _until(lambda: len(sinks[0].got) >= 2)
        assert sinks[0].seqs() == [3, 4]

    asyncio.run(_brokers(redis_prefix, body, origins=(7,)))


def test_broker_catches_up_from_the_store_when_its_subscription_comes_back(
    redis_prefix: str, tmp_path: Path
) -> None:
    async def run() -> None:
        store = SQLEventStore(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
        await store.start()

        async def catch_up(after: int) -> Any:
            return await store.read_all(after=after, limit=2)  # small pages: several are read

        async def body(brokers: list[RedisBroker], sinks: list[Sink], client: aioredis.Redis, _: Any) -> None:
            (one,) = brokers
            assert one.reconnects == 0
            stored = [_ev(n) for n in range(5)]
            await store.append(stored)  # committed, never published (as if Redis had failed)
            sync = redis.Redis.from_url(REDIS_URL)
            try:
                sync.client_kill_filter(_type="pubsub")  # the subscription drops
            finally:
                sync.close()
            await _until(lambda: len(sinks[0].got) >= 5, timeout=10)
            assert sinks[0].seqs() == [e.id for e in stored]
            await _until(lambda: one.up)
            assert one.reconnects == 1
            await one.publish([stored[-1]])  # also arriving on the channel now: not again
            more = _ev(9)
            await store.append([more])
            await one.publish([more])
            await _until(lambda: len(sinks[0].got) >= 6)
            await asyncio.sleep(0.1)
            assert sinks[0].seqs() == [e.id for e in stored] + [more.id]
            sync = redis.Redis.from_url(REDIS_URL)
            try:
                sync.client_kill_filter(_type="pubsub")  # and again: counted again
            finally:
                sync.close()
            await _until(lambda: one.reconnects == 2 and one.up, timeout=10)

        try:
            await _brokers(redis_prefix, body, origins=(7,), catch_up=catch_up)
        finally:
            await store.close()

    asyncio.run(run())


def test_broker_serves_from_the_store_while_redis_is_away(tmp_path: Path) -> None:
    async def run() -> None:
        store = SQLEventStore(f"sqlite+aiosqlite:///{tmp_path / 'away.db'}")
        await store.start()
        client = redis_client("redis://127.0.0.1:1/0")  # nothing listens there

        async def catch_up(after: int) -> Any:
            return await store.read_all(after=after, limit=100)

        broker = RedisBroker("redis://127.0.0.1:1/0", client, RedisKeys("away:"), catch_up=catch_up)
        sink = Sink()
        try:
            await asyncio.wait_for(broker.start(sink), 10)
            assert not await broker.ready()
            events = [_ev(n) for n in range(3)]
            await store.append(events)
            await _until(lambda: len(sink.got) >= 3, timeout=5)
            assert sink.seqs() == [e.id for e in events]
            with pytest.raises((redis.RedisError, OSError)):
                await broker.publish([_ev(4, id=99)])
        finally:
            await broker.close()
            await client.aclose()
            await store.close()

    asyncio.run(run())


def test_encode_and_decode_keep_order_routing_and_skip_only_the_bad_row() -> None:
    events = [
        _ev(1, id=1),
        Event("custom.t", "{}", id=2, task_id="t", for_task=True, readers=("a",)),
        _ev(3),
    ]
    origin, deliveries = decode(encode(events, origin=42))
    assert origin == 42
    assert [d.seq for d in deliveries] == [1, 2, None] and deliveries[1].readers == ("a",)
    assert [d.chunk for d in deliveries] == [e.delivery().chunk for e in events]
    resent = _ev(4, id=4)
    resent.resend = True
    ((d,),) = [decode(encode([resent]))[1]]
    assert d.seq is None and b"id:" not in d.chunk  # a resend never moves Last-Event-ID


def test_memory_broker_and_the_broker_factory() -> None:
    async def run() -> None:
        broker = MemoryBroker()
        sink = Sink()
        unsendable: list[Event] = []
        broker.on_unsendable = lambda e, exc: unsendable.append(e)
        await broker.publish([_ev(0, id=1)])  # before start: nowhere to go, no error
        await broker.start(sink)
        bad = Event("custom.x\n", "{}", user_id="u", id=5)  # a type that cannot be framed
        await broker.publish([_ev(1, id=2), bad, _ev(2)])
        assert sink.seqs() == [2, None] and unsendable == [bad]  # skipped, reported, the rest sent
        await broker.close()
        await broker.publish([_ev(3, id=3)])
        assert sink.seqs() == [2, None]

    asyncio.run(run())
    assert isinstance(make_broker(Settings(jwt_secret="x" * 40)), MemoryBroker)
    settings = Settings(jwt_secret="x" * 40, redis_url=REDIS_URL)
    client = redis_client(REDIS_URL)
    assert isinstance(make_broker(settings, None, redis=client), RedisBroker)
    with pytest.raises(AssertionError):
        make_broker(settings)  # the Redis broker shares the instance's Redis client
    asyncio.run(client.aclose())
    assert not MemoryBroker.shared and RedisBroker.shared
