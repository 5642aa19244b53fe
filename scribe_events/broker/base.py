"""The broker interface: committed events in, deliveries out to every instance's hub.

A broker keeps one subscription per instance (never one per connection). ``publish`` takes events
in commit order and must hand them to every instance's sink in that same order; each instance builds
the wire bytes of an event once. Control messages (push mode, bans) reach every instance too.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from scribe_events.events import Delivery, Event, SkipHook
from scribe_events.metrics import Histogram

DeliverySink = Callable[[Sequence[Delivery]], None]
ControlHook = Callable[[dict[str, Any]], Awaitable[None]]


class Broker(abc.ABC):
    name: str = "broker"
    # True when other instances share it: publishing must then be ordered across instances.
    shared: bool = False

    def __init__(self) -> None:
        self.on_control: ControlHook | None = None
        # Called after every (re)subscription: state changes may have been missed meanwhile.
        self.on_subscribed: Callable[[], Awaitable[None]] | None = None
        # Told of every event that cannot be framed (skipped, so it never stops the others).
        self.on_unsendable: SkipHook | None = None
        # Messages from another deployment sharing the broker (ignored).
        self.foreign = 0
        self.up = True  # the subscription (an in-process broker is always up)
        self.reconnects = 0
        # Handing a batch to the broker until it comes back to this instance (Redis).
        self.round_trip = Histogram()

    @abc.abstractmethod
    async def start(self, sink: DeliverySink) -> None:
        """Begin delivering published events to ``sink`` (the local hub)."""

    @abc.abstractmethod
    async def publish(self, events: Sequence[Event]) -> None:
        """Send events (ids already assigned) to every instance, in order."""

    async def publish_control(self, message: dict[str, Any]) -> None:
        """Tell every instance (this one included) about a change of shared state."""
        if self.on_control is not None:
            await self.on_control(message)

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return True
