"""In-process broker: one instance, so publishing is a direct call into the local hub."""

from __future__ import annotations

from collections.abc import Sequence

from scribe_events.broker.base import Broker, DeliverySink
from scribe_events.events import Event, sendable


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._sink: DeliverySink | None = None

    async def start(self, sink: DeliverySink) -> None:
        self._sink = sink

    async def publish(self, events: Sequence[Event]) -> None:
        if self._sink is not None:
            self._sink(sendable(events, self.on_unsendable))

    async def close(self) -> None:
        self._sink = None
