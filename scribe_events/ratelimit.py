"""Rate limits (R8.5): per user and per address, on opening streams, minting tickets, polling and
publishing; past one, 429 ``rate_limited`` with ``Retry-After``.

Counted in a sliding window: in Redis when configured, with the ``limits`` library (the engine
under slowapi; slowapi's own limiter calls its storage synchronously, which would block the event
loop on Redis), so a limit holds across instances; else in this process (:class:`LocalWindows`).
Publishing is counted by each instance also with Redis (``LOCAL_KINDS``). End users are limited by
default; a publisher is a trusted service whose default sits far above the throughput targets;
admins have their own limit; the per-address defaults let a whole office behind one NAT in. A
limiter that cannot reach Redis lets requests through (logged, counted): it protects the service,
it must not take it down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis
from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from scribe_events.auth import Principal
from scribe_events.config import Settings
from scribe_events.exceptions import RateLimited

log = logging.getLogger("scribe_events.ratelimit")
T = TypeVar("T")

KINDS = ("streams", "tickets", "polling", "publish")
# Counted by each instance even with Redis: a publisher is a trusted service whose limit only
# stops a runaway one, and a Redis round trip per publish cost a fifth of the publish path.
LOCAL_KINDS = frozenset({"publish"})
LOG_EVERY_S = 60.0
CHECK_TIMEOUT_S = 0.1  # one count in Redis; slower than this, the request is let through
PAUSE_AFTER_FAILURE_S = 5.0  # and the limits are not counted at all for this long


def parse_limit(value: str) -> RateLimitItem | None:
    """``"60/minute"``, ``"5 per second"``; ``""`` or ``"none"``: no limit. ValueError otherwise."""
    if value.strip().lower() in ("", "none", "off"):
        return None
    try:
        return parse(value)
    except ValueError:
        raise ValueError(f"not a rate limit: {value!r} (e.g. '60/minute')") from None


class LocalWindows:
    """The sliding-window counter of ``limits`` (the same weighting of the previous window), for
    counts kept in this process: plain dict work with no await, no lock and no expiry task, which
    in ``limits``' MemoryStorage cost a tenth of a publish request. Old windows are swept as new
    ones open, so idle keys do not pile up."""

    SWEEP_EVERY = 10_000  # new windows between sweeps

    def __init__(self) -> None:
        # key -> [window number, its count, the previous window's count, the window's length]
        self._windows: dict[tuple[str, ...], list[float]] = {}
        self._opened = 0

    def _counts(
        self, item: RateLimitItem, key: tuple[str, ...], now: float
    ) -> tuple[list[float], float, float]:
        """The key's window (made current), the previous window's count and how far into this one."""
        expiry = item.get_expiry()
        number, into = divmod(now, expiry)
        window = self._windows.get(key)
        if window is None or window[0] < number - 1:
            window = [number, 0, 0, expiry]
            self._opened += 1
            if self._opened % self.SWEEP_EVERY == 0:
                self._sweep(now)
            self._windows[key] = window
        elif window[0] == number - 1:
            window[:] = [number, 0, window[1], expiry]
        return window, window[2] * (expiry - into) / expiry, into

    def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        key = (item.key_for(*identifiers),)
        window, previous, _ = self._counts(item, key, time.time())
        if math.floor(previous + window[1]) + 1 > item.amount:
            return False
        window[1] += 1
        return True

    def reset_in(self, item: RateLimitItem, *identifiers: str) -> float:
        """Seconds until one more request is allowed (as ``limits``' window stats)."""
        expiry = item.get_expiry()
        window, _, into = self._counts(item, (item.key_for(*identifiers),), time.time())
        previous_count, current_count = window[2], window[1]
        soonest = math.inf
        if previous_count:
            soonest = (expiry - into) % (expiry / previous_count)
        if current_count:
            soonest = min(soonest, (2 * expiry - into) % expiry)
        return 0.0 if soonest == math.inf else soonest

    def _sweep(self, now: float) -> None:
        for key, (number, _, _, expiry) in list(self._windows.items()):
            if now >= (number + 2) * expiry:  # no longer even the previous window: it counts nothing
                del self._windows[key]


class RateLimits:
    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None) -> None:
        """``redis``: the instance's command pool, which the counts share (no pool of their own)."""
        self.enabled = settings.rate_limits
        self._own_pool = False
        self._storage: RedisStorage | None = None
        if settings.redis_url:
            self._own_pool = redis is None
            options: dict[str, Any] = {} if redis is None else {"connection_pool": redis.connection_pool}
            self._storage = RedisStorage(
                _storage_uri(settings.redis_url),
                implementation="redispy",
                key_prefix=f"{settings.redis_prefix}ratelimit",
                **options,
            )
        # Shared counts in Redis (through ``limits``), else this process's own.
        self._limiter = None if self._storage is None else SlidingWindowCounterRateLimiter(self._storage)
        self._local = LocalWindows()  # used when there is no Redis
        s = settings
        self._user = {
            "streams": parse_limit(s.rate_limit_streams_per_user),
            "tickets": parse_limit(s.rate_limit_tickets_per_user),
            "polling": parse_limit(s.rate_limit_polling_per_user),
            "publish": parse_limit(s.rate_limit_publish_per_user),
        }
        self._ip = {
            "streams": parse_limit(s.rate_limit_streams_per_ip),
            "tickets": parse_limit(s.rate_limit_tickets_per_ip),
            "polling": parse_limit(s.rate_limit_polling_per_ip),
            "publish": parse_limit(s.rate_limit_publish_per_ip),
        }
        self._admin = parse_limit(s.rate_limit_admin)
        # The auto_ban_failures-th failure in the window is the one that is not "allowed".
        self._failures = (
            parse(f"{s.auto_ban_failures - 1} per {s.auto_ban_window_s} second")
            if s.auto_ban_failures > 1
            else None
        )
        self.ban_on_first = s.auto_ban_failures == 1
        self.unavailable: Counter[str] = Counter()  # checks let through because the storage failed
        self._logged_at = -LOG_EVERY_S
        self._paused_until = 0.0  # a storage that failed is not asked again until then
        self._late: set[asyncio.Task[Any]] = set()  # calls that outlived their time, left to finish

    async def check(self, kind: str, principal: Principal, ip: str | None) -> None:
        """Count one request of ``kind``; 429 past the caller's limit."""
        local = self._limiter is None or kind in LOCAL_KINDS
        if not self.enabled or (not local and time.monotonic() < self._paused_until):
            return
        # (who, key, limit, the setting that sets it: also the metric's reason)
        if principal.is_admin:
            checks = [("admin", principal.user_id, self._admin, "rate_limit_admin")]
        else:
            checks = [("user", principal.user_id, self._user[kind], f"rate_limit_{kind}_per_user")]
            if ip:
                checks.append(("ip", ip, self._ip[kind], f"rate_limit_{kind}_per_ip"))
        for scope, key, item, setting in checks:
            if item is None:
                continue
            if local or self._limiter is None:
                if self._local.hit(item, kind, scope, key):
                    continue
                reset_in = self._local.reset_in(item, kind, scope, key)
            else:
                try:
                    if await self._bounded(self._limiter.hit(item, kind, scope, key)):
                        continue
                    stats = await self._bounded(self._limiter.get_window_stats(item, kind, scope, key))
                except Exception as exc:  # Redis away or hung: let it through, and stop asking a while
                    self._storage_failed(exc)
                    return
                reset_in = stats.reset_time - time.time()
            retry = max(1, math.ceil(reset_in))
            who = {"user": "this user", "ip": "this address", "admin": "this admin"}[scope]
            raise RateLimited(
                f"{who} made more than {item} {_what(kind)} requests; retry in {retry} s",
                retry_after_s=retry,
                reason=setting,
            )

    async def failed_authentication(self, ip: str) -> bool:
        """Count one failed authentication from ``ip``; True once it has earned a ban."""
        if self.ban_on_first:
            return True
        if self._failures is None or time.monotonic() < self._paused_until:
            return False
        if self._limiter is None:
            return not self._local.hit(self._failures, "auth-failures", ip)
        try:
            return not await self._bounded(self._limiter.hit(self._failures, "auth-failures", ip))
        except Exception as exc:
            self._storage_failed(exc)
            return False

    async def _bounded(self, call: Coroutine[Any, Any, T]) -> T:
        """``call``'s answer within CHECK_TIMEOUT_S, else TimeoutError. A late call is left to
        finish (never cancelled: a Redis command or connect cut off half-way can leave its socket
        behind) and its outcome is dropped."""
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=CHECK_TIMEOUT_S)
        if task in done:
            return task.result()
        self._late.add(task)
        task.add_done_callback(self._forget_late)
        raise TimeoutError(f"the rate-limit storage did not answer within {CHECK_TIMEOUT_S} s")

    def _forget_late(self, task: asyncio.Task[Any]) -> None:
        self._late.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late failure is not "never retrieved"

    async def close(self) -> None:
        """Close the Redis connections the limiter opened itself (none in memory or when shared)."""
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        if client is not None and self._own_pool:
            await client.aclose()

    def _storage_failed(self, exc: Exception) -> None:
        self.unavailable[type(exc).__name__] += 1
        now = time.monotonic()
        self._paused_until = now + PAUSE_AFTER_FAILURE_S
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.error(
                "rate limits cannot be counted (%s: %s); letting requests through", type(exc).__name__, exc
            )


def _storage_uri(redis_url: str) -> str:
    """limits' name for a redis-py URL (``unix://`` would otherwise be taken for Valkey)."""
    if redis_url.startswith("unix://"):
        return "async+redis+unix://" + redis_url.removeprefix("unix://")
    return "async+" + redis_url


def _what(kind: str) -> str:
    return {"streams": "stream", "tickets": "ticket", "polling": "polling", "publish": "publish"}[kind]
