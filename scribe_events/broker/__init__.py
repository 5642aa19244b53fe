"""Fan-out between instances. Picked from settings: in-process by default, Redis when configured."""

from __future__ import annotations

from scribe_events.broker.base import Broker, DeliverySink
from scribe_events.broker.memory import MemoryBroker
from scribe_events.config import Settings

__all__ = ["Broker", "DeliverySink", "MemoryBroker", "make_broker"]


def make_broker(settings: Settings) -> Broker:
    if settings.redis_url:
        raise NotImplementedError(
            "the Redis broker is not part of this version; unset SCRIBE_EVENTS_REDIS_URL"
        )
    return MemoryBroker(settings.instance_id)
