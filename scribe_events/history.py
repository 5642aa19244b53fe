"""The rolling history of metric snapshots that ``scribe-events report`` reads (no Prometheus needed).

Every instance saves one snapshot per ``history_interval_s`` (see :mod:`scribe_events.monitor`):
``{"instance", "at", "metrics": {sample key: value}}``, zlib-compressed JSON. With Redis it goes to
one sorted set per instance (score: the time), so any instance can answer for all of them; without,
to the store's ``metric_snapshots`` table. Both forget what is older than ``history_keep_s``.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scribe_events.constants import RedisKeys
from scribe_events.exceptions import ServiceUnavailable
from scribe_events.store import EventStore

Snapshot = dict[str, Any]
T = TypeVar("T")
# Snapshots one answer holds per instance at most; a longer window is thinned evenly (counters and
# histograms are cumulative, so rates over the window stay exact; gauges lose detail).
MAX_POINTS = 720


def pack(snapshot: Snapshot) -> bytes:
    return zlib.compress(json.dumps(snapshot, separators=(",", ":")).encode(), 6)


def unpack(data: bytes) -> Snapshot | None:
    """A snapshot, or None for one that cannot be read (it is skipped, never fatal)."""
    try:
        value = json.loads(zlib.decompress(data))
    except (zlib.error, ValueError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("metrics"), dict) else None


def _unpack_all(raw: dict[str, list[bytes]]) -> dict[str, list[Snapshot]]:
    """Thinned first, then decompressed (off the event loop: a day of snapshots takes a while)."""
    out = {}
    for name, blobs in raw.items():
        points = [s for s in map(unpack, thin(blobs)) if s is not None]
        if points:
            out[name] = points
    return out


def thin(points: list[T], limit: int = MAX_POINTS) -> list[T]:
    """At most ``limit`` of ``points``, evenly spread, the first and the last always kept."""
    if len(points) <= limit:
        return points
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


class History(Protocol):
    async def save(self, snapshot: Snapshot) -> None: ...
    async def read(self, *, since: float, instance: str | None = None) -> dict[str, list[Snapshot]]: ...


class StoreHistory:
    """In the store (one instance, or several without Redis)."""

    def __init__(self, store: EventStore, keep_s: float) -> None:
        self.store = store
        self.keep_ms = int(keep_s * 1000)

    async def save(self, snapshot: Snapshot) -> None:
        at_ms = int(snapshot["at"] * 1000)
        await self.store.save_snapshot(snapshot["instance"], at_ms, pack(snapshot), keep_ms=self.keep_ms)

    async def read(self, *, since: float, instance: str | None = None) -> dict[str, list[Snapshot]]:
        rows = await self.store.snapshots(since_ms=int(since * 1000), instance=instance)
        raw: dict[str, list[bytes]] = {}
        for name, _, data in rows:
            raw.setdefault(name, []).append(data)
        return await asyncio.to_thread(_unpack_all, raw)


class RedisHistory:
    """In Redis: ``<prefix>history:<instance>`` sorted sets, and ``<prefix>history`` naming them."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, keep_s: float) -> None:
        self.client = client
        self.keys = keys
        self.keep_s = keep_s

    async def save(self, snapshot: Snapshot) -> None:
        at = float(snapshot["at"])
        key = self.keys.history(snapshot["instance"])
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {pack(snapshot): at})
                pipe.zremrangebyscore(key, "-inf", at - self.keep_s)
                pipe.expire(key, int(self.keep_s) + 60)
                pipe.zadd(self.keys.history_instances, {snapshot["instance"]: at})
                pipe.zremrangebyscore(self.keys.history_instances, "-inf", at - self.keep_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(f"Redis could not keep a metric snapshot: {exc}") from exc

    async def read(self, *, since: float, instance: str | None = None) -> dict[str, list[Snapshot]]:
        try:
            if instance is None:
                found: list[Any] = await self.client.zrangebyscore(self.keys.history_instances, since, "+inf")
                names = [n.decode() for n in found]
            else:
                names = [instance]
            raw: dict[str, list[bytes]] = {}
            for name in names:
                blobs: list[Any] = await self.client.zrangebyscore(self.keys.history(name), since, "+inf")
                if blobs:
                    raw[name] = blobs
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(f"Redis could not read the metric history: {exc}") from exc
        return await asyncio.to_thread(_unpack_all, raw)
