"""The broker interface: committed events in, deliveries out to this instance's hub.

A broker keeps one subscription per instance (never one per connection). ``publish`` takes events in
commit order and must hand them to every instance's sink in that same order; each instance builds the
wire bytes of an event once (:meth:`~scribe_events.events.Event.delivery`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

from scribe_events.events import Delivery, Event

DeliverySink = Callable[[Sequence[Delivery]], None]


class Broker(abc.ABC):
    name: str = "broker"

    @abc.abstractmethod
    async def start(self, sink: DeliverySink) -> None:
        """Begin delivering published events to ``sink`` (the local hub)."""

    @abc.abstractmethod
    async def publish(self, events: Sequence[Event]) -> None:
        """Send events (ids already assigned) to every instance, in order."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return True
