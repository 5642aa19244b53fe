"""Fan-out between instances. Picked from settings: in-process by default, Redis when configured."""

from __future__ import annotations

import redis.asyncio as aioredis

from scribe_events.broker.base import Broker, ControlHook, DeliverySink
from scribe_events.broker.memory import MemoryBroker
from scribe_events.config import Settings
from scribe_events.constants import RedisKeys
from scribe_events.store import EventStore, Page

__all__ = ["Broker", "ControlHook", "DeliverySink", "MemoryBroker", "make_broker"]

CATCH_UP_PAGE = 1000


def make_broker(
    settings: Settings,
    store: EventStore | None = None,
    *,
    last_seq: int = 0,
    redis: aioredis.Redis | None = None,
    origin: int = 0,
) -> Broker:
    """The in-process broker, or with ``SCRIBE_EVENTS_REDIS_URL`` the Redis one (on ``redis``, the
    instance's command pool)."""
    if not settings.redis_url:
        return MemoryBroker()
    assert redis is not None, "the Redis broker needs the instance's Redis client"
    from scribe_events.broker.redis import RedisBroker

    async def catch_up(after: int) -> Page:
        if store is None:
            return Page([], through=after, full=False)
        return await store.read_all(after=after, limit=CATCH_UP_PAGE)

    return RedisBroker(
        settings.redis_url,
        redis,
        RedisKeys(settings.redis_prefix),
        catch_up=catch_up,
        last_seq=last_seq,
        origin=origin,
    )
