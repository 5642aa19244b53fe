"""Store benchmarks (``scribe-events bench store``): events/s stored by the group-commit publisher,
for a lone publisher (latency of one event at a time) and under concurrent load."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from scribe_events.broker.base import Broker, DeliverySink
from scribe_events.events import Event
from scribe_events.publisher import Publisher
from scribe_events.store.sql import SQLEventStore


class NullBroker(Broker):
    """Takes events and drops them: isolates the store's share of publishing."""

    name = "null"

    async def start(self, sink: DeliverySink) -> None:
        pass

    async def publish(self, events: Sequence[Event]) -> None:
        pass

    async def close(self) -> None:
        pass


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _lone(publisher: Publisher, n: int) -> dict[str, float]:
    latencies = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        await publisher.submit([Event("bench.lone", f'{{"i":{i}}}', user_id="u")])
        latencies.append((time.perf_counter() - t) * 1000)
    took = time.perf_counter() - start
    return {
        "events": n,
        "events_per_s": n / took,
        "p50_ms": statistics.median(latencies),
        "p99_ms": _percentile(latencies, 0.99),
    }


async def _loaded(publisher: Publisher, n: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    per_task = max(1, n // concurrency)

    async def worker(w: int) -> None:
        for i in range(per_task):
            t = time.perf_counter()
            await publisher.submit([Event("bench.load", f'{{"w":{w},"i":{i}}}', user_id=f"u{w}")])
            latencies.append((time.perf_counter() - t) * 1000)

    start = time.perf_counter()
    batches_before = publisher.batches
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    took = time.perf_counter() - start
    total = per_task * concurrency
    batches = publisher.batches - batches_before
    return {
        "events": total,
        "concurrency": concurrency,
        "events_per_s": total / took,
        "p50_ms": statistics.median(latencies),
        "p99_ms": _percentile(latencies, 0.99),
        "events_per_batch": total / max(1, batches),
    }


async def store_bench(
    database_url: str | None, *, lone: int = 500, events: int = 20_000, concurrency: int = 200
) -> dict[str, Any]:
    """Run both measurements on a throw-away database (a temp SQLite file, or a temp PostgreSQL schema)."""
    tmp = tempfile.TemporaryDirectory()
    schema = None
    if database_url is None:
        database_url = f"sqlite+aiosqlite:///{Path(tmp.name) / 'bench.db'}"
    elif database_url.startswith("postgresql"):
        schema = "bench_" + secrets.token_hex(6)
    store = SQLEventStore(database_url, schema=schema, auto_migrate=True)
    await store.start()
    publisher = Publisher(store, NullBroker(), queue_max=max(10_000, concurrency * 2), batch_max=1000)
    await publisher.start()
    try:
        return {
            "store": store.describe(),
            "lone": await _lone(publisher, lone),
            "loaded": await _loaded(publisher, events, concurrency),
        }
    finally:
        await publisher.close()
        if schema is not None and store.engine is not None:
            async with store.engine.begin() as conn:
                await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await store.close()
        tmp.cleanup()
