"""What waits for one slow connection: deliveries held while its socket's write buffer is full.

A connection writes straight to its socket while the socket takes data (the hub's fast path). Once
its write buffer is past the high-water mark, further deliveries wait here, in order, bounded in
bytes; the hub writes them out as the socket drains. Two things are better than first in, first out:
- a ``system.error`` is written at once (ahead of everything held here, without an ``id:`` line)
  and stays in line too, so it also comes in order with its id (clients de-duplicate);
- a newer ``task.progress-updated`` of a task replaces the held older one (which is dropped; the
  newer one takes its place at the end, so ids still rise).
"""

from __future__ import annotations

from scribe_events.events import Delivery
from scribe_events.metrics import count_family
from scribe_events.vocabulary import TASK_UPDATED


class Backlog:
    __slots__ = ("_next", "_progress", "bytes", "items", "replaced")

    def __init__(self) -> None:
        self.items: dict[int, Delivery] = {}  # in order (dicts keep insertion order)
        self.bytes = 0
        self.replaced = 0  # progress updates dropped for a newer one of their task
        self._next = 0
        self._progress: dict[str, int] = {}  # task id -> its held update

    def __len__(self) -> int:
        return len(self.items)

    def add(self, d: Delivery) -> None:
        if d.type == TASK_UPDATED and d.task_id is not None:
            older = self._progress.get(d.task_id)
            if older is not None and (gone := self.items.pop(older, None)) is not None:
                self.bytes -= len(gone.chunk)
                self.replaced += 1
            self._progress[d.task_id] = self._next
        self.items[self._next] = d
        self._next += 1
        self.bytes += len(d.chunk)

    def take(self, budget: int, families: dict[str, int] | None = None) -> list[bytes]:
        """The chunks of the oldest deliveries, until they hold ``budget`` bytes (at least one);
        ``families`` counts them by type family (see metrics.py)."""
        items = self.items
        chunks: list[bytes] = []
        taken = 0
        while items and (not chunks or taken < budget):
            key = next(iter(items))
            d = items.pop(key)
            if d.type == TASK_UPDATED and d.task_id is not None and self._progress.get(d.task_id) == key:
                del self._progress[d.task_id]
            chunks.append(d.chunk)
            taken += len(d.chunk)
            if families is not None:
                count_family(families, d.type)
        self.bytes -= taken
        return chunks
