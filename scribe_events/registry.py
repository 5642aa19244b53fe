"""The connection registry (R2.1): who is connected, where, since when.

Without Redis it is this instance's hub. With Redis, each connection is a hash
``conn:<id>`` (user, session, instance, remote address, user agent, connected_at, last_seen) whose
TTL is renewed on every heartbeat, plus its id in sorted sets per user, per session, per instance
and for all. Lookups read one index (O(connections of that user or session)) and the hashes of its
members; members whose hash has expired — an instance died without cleaning up — are skipped and
removed on the way. Writes are queued by the hub's (synchronous) hooks and sent in pipelines by
one background task, so the hub never waits on Redis.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scribe_events.constants import RedisKeys
from scribe_events.hub import Connection, Hub
from scribe_events.tasks import cancel, supervise

log = logging.getLogger("scribe_events.registry")


def describe(conn: Connection, instance: str) -> dict[str, Any]:
    return {
        "connection_id": conn.id,
        "user_id": conn.user_id,
        "session_id": conn.session_id,
        "instance": instance,
        "remote": conn.remote,
        "user_agent": conn.user_agent,
        "connected_at": round(conn.connected_at, 3),
        "last_seen": round(time.time(), 3),
    }


def _matches(
    entry: dict[str, Any], user_id: str | None, session_id: str | None, instance: str | None
) -> bool:
    return (
        (user_id is None or entry["user_id"] == user_id)
        and (session_id is None or entry["session_id"] == session_id)
        and (instance is None or entry["instance"] == instance)
    )


class Registry(abc.ABC):
    def start(self) -> None:  # noqa: B027 - nothing to start by default
        pass

    async def close(self) -> None:  # noqa: B027
        pass

    @abc.abstractmethod
    async def list(
        self, *, user_id: str | None = None, session_id: str | None = None, instance: str | None = None
    ) -> list[dict[str, Any]]: ...


class LocalRegistry(Registry):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def list(
        self, *, user_id: str | None = None, session_id: str | None = None, instance: str | None = None
    ) -> list[dict[str, Any]]:
        entries = [describe(c, self.hub.instance) for c in self.hub.connections.values()]
        return [e for e in entries if _matches(e, user_id, session_id, instance)]


class RedisRegistry(Registry):
    def __init__(
        self, client: aioredis.Redis, keys: RedisKeys, hub: Hub | None, *, ttl_s: float, refresh_s: float
    ) -> None:
        self.client = client
        self.keys = keys
        self.hub = hub
        self.ttl_ms = int(ttl_s * 1000)
        self.refresh_s = refresh_s
        self._ops: deque[tuple[str, Connection]] = deque(maxlen=100_000)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._resync = False
        if hub is not None:
            hub.on_add.append(lambda c: self._queue("add", c))
            hub.on_remove.append(lambda c: self._queue("remove", c))

    def _queue(self, op: str, conn: Connection) -> None:
        self._ops.append((op, conn))
        self._wake.set()

    def start(self) -> None:
        self._task = supervise(self._run, "scribe-registry")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None
        if self.hub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._flush()  # what is left (removals at shutdown)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.refresh_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_refresh - loop.time()))
            self._wake.clear()
            try:
                await self._flush()
                if loop.time() >= next_refresh:
                    next_refresh = loop.time() + self.refresh_s
                    await self._refresh()
            except (RedisError, OSError) as exc:
                if not self._resync:
                    log.error("registry writes to Redis failed: %s; will re-register everything", exc)
                self._resync = True
                await asyncio.sleep(1)

    def _add(self, pipe: Any, conn: Connection, instance: str) -> None:
        entry = {k: ("" if v is None else str(v)) for k, v in describe(conn, instance).items()}
        key = self.keys.connection(conn.id)
        pipe.hset(key, mapping=entry)
        pipe.pexpire(key, self.ttl_ms)
        score = conn.connected_at
        pipe.zadd(self.keys.all_connections, {conn.id: score})
        pipe.zadd(self.keys.user_connections(conn.user_id), {conn.id: score})
        pipe.zadd(self.keys.instance_connections(instance), {conn.id: score})
        if conn.session_id is not None:
            pipe.zadd(self.keys.session_connections(conn.user_id, conn.session_id), {conn.id: score})

    def _remove(self, pipe: Any, conn: Connection, instance: str) -> None:
        pipe.delete(self.keys.connection(conn.id))
        pipe.zrem(self.keys.all_connections, conn.id)
        pipe.zrem(self.keys.user_connections(conn.user_id), conn.id)
        pipe.zrem(self.keys.instance_connections(instance), conn.id)
        if conn.session_id is not None:
            pipe.zrem(self.keys.session_connections(conn.user_id, conn.session_id), conn.id)

    async def _flush(self) -> None:
        assert self.hub is not None
        ops = list(self._ops)
        self._ops.clear()  # taken before any await: what is queued meanwhile waits for the next round
        try:
            if self._resync:
                await self._refresh()  # re-registers every live connection, which covers the ops
                self._resync = False
                return
            if ops:
                async with self.client.pipeline(transaction=False) as pipe:
                    for op, conn in ops:
                        (self._add if op == "add" else self._remove)(pipe, conn, self.hub.instance)
                    await pipe.execute()
        except BaseException:
            self._resync = True  # the next round re-registers everything from the hub
            raise

    async def _refresh(self) -> None:
        """Re-register every local connection: its whole hash (so an expired one comes back
        complete), a fresh TTL and last_seen, and its index entries."""
        assert self.hub is not None
        async with self.client.pipeline(transaction=False) as pipe:
            for conn in list(self.hub.connections.values()):
                self._add(pipe, conn, self.hub.instance)
            await pipe.execute()

    async def list(
        self, *, user_id: str | None = None, session_id: str | None = None, instance: str | None = None
    ) -> list[dict[str, Any]]:
        if user_id is not None and session_id is not None:
            index = self.keys.session_connections(user_id, session_id)
        elif user_id is not None:
            index = self.keys.user_connections(user_id)
        elif instance is not None:
            index = self.keys.instance_connections(instance)
        else:
            index = self.keys.all_connections
        ids = [m.decode() for m in await self.client.zrange(index, 0, -1)]  # type: ignore[union-attr]
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.hgetall(self.keys.connection(cid))
            found = await pipe.execute()
        entries, gone = [], []
        for cid, raw in zip(ids, found, strict=True):
            entry: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()} if raw else {}
            if "connected_at" not in entry:
                gone.append(cid)  # expired: its instance died without cleaning up
                continue
            entry["session_id"] = entry.get("session_id") or None
            entry["connected_at"] = float(entry["connected_at"])
            entry["last_seen"] = float(entry["last_seen"])
            if _matches(entry, user_id, session_id, instance):
                entries.append(entry)
        if gone:
            await self.client.zrem(index, *gone)
        return entries
