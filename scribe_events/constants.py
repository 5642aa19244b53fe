"""Every Redis key and channel name, in one place. All start with ``SCRIBE_EVENTS_REDIS_PREFIX``.
Also the one way a command connection to Redis is made."""

from __future__ import annotations

import redis.asyncio as aioredis

REDIS_POOL_MAX = 50


def redis_client(url: str, max_connections: int = REDIS_POOL_MAX) -> aioredis.Redis:
    """A command connection pool (short timeouts: a request never hangs on a lost Redis), bounded:
    past ``max_connections`` commands in flight, the next waits for a connection (at most 5 s),
    so a burst of requests cannot open sockets without end."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5, socket_connect_timeout=2, socket_timeout=5
    )
    return aioredis.Redis.from_pool(pool)


def pool_size(client: aioredis.Redis | None) -> int:
    """Open connections in a client's pool now, idle and in use. (The pool also keeps the objects of
    connections it closed, after an error or a disconnect; counting those told of sockets that were
    not there, and the fault suite's fd check then saw a leak when the pool reopened them.)"""
    pool = getattr(client, "connection_pool", None)
    held = [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]
    return sum(1 for c in held if getattr(c, "is_connected", False))


class RedisKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.events = f"{prefix}events"  # the one channel every instance subscribes to (total order)
        self.control = f"{prefix}control"  # push-mode changes, bans: every instance acts on its own
        self.push_mode = f"{prefix}push-mode"
        self.bans = f"{prefix}bans"  # hash: "user:<id>" | "ip:<addr>" -> JSON {reason, until}
        self.all_connections = f"{prefix}conns"  # sorted set: connection id, score = expiry (ms)
        self.history_instances = f"{prefix}history"  # sorted set: instance, score = last snapshot

    def history(self, instance: str) -> str:
        return f"{self.prefix}history:{instance}"  # sorted set: snapshots, score = their time

    def ticket(self, ticket: str) -> str:
        return f"{self.prefix}ticket:{ticket}"

    def tickets_of(self, user_id: str) -> str:
        return f"{self.prefix}tickets-of:{user_id}"  # counter of tickets issued, expires with them

    def connection(self, connection_id: str) -> str:
        return f"{self.prefix}conn:{connection_id}"  # hash of the connection's fields, with a TTL

    def user_connections(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}"  # sorted set: connection ids, score = expiry (ms)

    def session_connections(self, user_id: str, session_id: str) -> str:
        return f"{self.prefix}session:{user_id}:{session_id}"

    def instance_connections(self, instance: str) -> str:
        return f"{self.prefix}instance:{instance}"

    def idempotency(self, owner: str, key: str) -> str:
        return f"{self.prefix}idem:{owner}:{key}"
