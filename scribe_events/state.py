"""State every instance must agree on: stream tickets, the push mode, bans, idempotency claims.

:class:`MemoryState` keeps it in this process (one instance); :class:`RedisState` keeps it in Redis,
so a ticket minted on one instance is redeemed on another, and a ban or push-mode change made on one
holds on all (each instance also caches push mode and bans, refreshed by control messages).
"""

from __future__ import annotations

import abc
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scribe_events.auth import Principal
from scribe_events.constants import RedisKeys
from scribe_events.exceptions import BrokerUnavailable, InvalidToken, RateLimited

MAX_TICKETS = 100_000
# An Idempotency-Key claim lives this long unless its holder renews it (every third of it) while
# it stores the request: an instance that dies holding one blocks a retry elsewhere only briefly.
IDEMPOTENCY_CLAIM_S = 3.0


@dataclass(slots=True)
class PushModeState:
    mode: Literal["sse", "polling"] = "sse"
    sse_percent: int = 100


@dataclass(frozen=True, slots=True)
class Ban:
    target: str  # "user:<id>" or "ip:<address>"
    reason: str
    until_ms: int | None  # None: until lifted

    def active(self, now_ms: int) -> bool:
        return self.until_ms is None or self.until_ms > now_ms


class SharedState(abc.ABC):
    async def close(self) -> None:  # noqa: B027 - nothing to close by default
        pass

    async def ping(self) -> bool:
        return True

    @abc.abstractmethod
    async def issue_ticket(self, principal: Principal, ttl_s: int, *, per_user: int = 100) -> str:
        """A single-use ticket for ``principal``; 429 when the user holds ``per_user`` unredeemed."""

    @abc.abstractmethod
    async def redeem_ticket(self, ticket: str) -> Principal:
        """The ticket's principal, once; 401 if unknown, expired or used."""

    @abc.abstractmethod
    async def load_push_mode(self) -> PushModeState: ...

    @abc.abstractmethod
    async def save_push_mode(self, state: PushModeState) -> None: ...

    @abc.abstractmethod
    async def load_bans(self) -> dict[str, Ban]: ...

    @abc.abstractmethod
    async def save_ban(self, ban: Ban) -> None: ...

    @abc.abstractmethod
    async def delete_ban(self, target: str) -> bool: ...

    @abc.abstractmethod
    async def claim(self, owner: str, key: str) -> bool:
        """Claim an Idempotency-Key across instances while its request is stored (False: taken)."""

    @abc.abstractmethod
    async def release(self, owner: str, key: str) -> None: ...

    async def renew(self, owner: str, key: str) -> None:  # noqa: B027 - in-process claims need none
        """Keep a claim alive while its request is being stored."""


class MemoryState(SharedState):
    def __init__(self) -> None:
        self._tickets: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._tickets_of: dict[str, int] = {}  # unredeemed tickets per user
        self._push = PushModeState()
        self._bans: dict[str, Ban] = {}
        self._claims: set[tuple[str, str]] = set()

    async def issue_ticket(self, principal: Principal, ttl_s: int, *, per_user: int = 100) -> str:
        now = time.monotonic()
        while self._tickets:  # they expire in the order they were issued (one ttl for all)
            oldest, (expires, _) = next(iter(self._tickets.items()))
            if expires >= now:
                break
            self._forget(oldest)
        if self._tickets_of.get(principal.user_id, 0) >= per_user:
            raise RateLimited(
                f"this user holds {per_user} unused tickets",
                retry_after_s=ttl_s,
                code="too_many_tickets",
                reason="tickets_per_user",
            )
        if len(self._tickets) >= MAX_TICKETS:
            raise RateLimited(
                "too many outstanding tickets", retry_after_s=ttl_s, code="too_many_tickets", reason="tickets"
            )
        ticket = secrets.token_urlsafe(32)
        self._tickets[ticket] = (now + ttl_s, principal)
        self._tickets_of[principal.user_id] = self._tickets_of.get(principal.user_id, 0) + 1
        return ticket

    def _forget(self, ticket: str) -> tuple[float, Principal] | None:
        entry = self._tickets.pop(ticket, None)
        if entry is not None:
            user = entry[1].user_id
            left = self._tickets_of.get(user, 1) - 1
            if left > 0:
                self._tickets_of[user] = left
            else:
                self._tickets_of.pop(user, None)
        return entry

    async def redeem_ticket(self, ticket: str) -> Principal:
        entry = self._forget(ticket)
        if entry is None or entry[0] < time.monotonic():
            raise InvalidToken("the ticket is unknown, expired or already used", reason="invalid_ticket")
        return entry[1]

    async def load_push_mode(self) -> PushModeState:
        return PushModeState(self._push.mode, self._push.sse_percent)

    async def save_push_mode(self, state: PushModeState) -> None:
        self._push = state

    async def load_bans(self) -> dict[str, Ban]:
        return dict(self._bans)

    async def save_ban(self, ban: Ban) -> None:
        self._bans[ban.target] = ban

    async def delete_ban(self, target: str) -> bool:
        return self._bans.pop(target, None) is not None

    async def claim(self, owner: str, key: str) -> bool:
        if (owner, key) in self._claims:
            return False
        self._claims.add((owner, key))
        return True

    async def release(self, owner: str, key: str) -> None:
        self._claims.discard((owner, key))


def _principal_json(p: Principal) -> str:
    return json.dumps({"sub": p.user_id, "sid": p.session_id, "roles": sorted(p.roles), "exp": p.expires_at})


class RedisState(SharedState):
    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(
                f"Redis is unavailable ({what}): {exc}", code="redis_unavailable"
            ) from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def issue_ticket(self, principal: Principal, ttl_s: int, *, per_user: int = 100) -> str:
        # A per-user count of tickets issued in the last ttl (not decremented on redemption: a
        # user may mint per_user tickets per ttl window).
        counter = self.keys.tickets_of(principal.user_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(counter, 0, ex=ttl_s, nx=True)
            pipe.incr(counter)
            _, issued = await self._call("ticket", pipe.execute())
        if int(issued) > per_user:
            raise RateLimited(
                f"this user was issued {per_user} tickets in {ttl_s} s",
                retry_after_s=ttl_s,
                code="too_many_tickets",
                reason="tickets_per_user",
            )
        ticket = secrets.token_urlsafe(32)
        await self._call(
            "ticket", self.client.set(self.keys.ticket(ticket), _principal_json(principal), ex=ttl_s)
        )
        return ticket

    async def redeem_ticket(self, ticket: str) -> Principal:
        raw = await self._call("ticket", self.client.getdel(self.keys.ticket(ticket)))
        if raw is None:
            raise InvalidToken("the ticket is unknown, expired or already used", reason="invalid_ticket")
        data = json.loads(raw)
        return Principal(data["sub"], data["sid"], frozenset(data["roles"]), data.get("exp"))

    async def load_push_mode(self) -> PushModeState:
        raw = await self._call("push mode", self.client.get(self.keys.push_mode))
        return PushModeState(**json.loads(raw)) if raw else PushModeState()

    async def save_push_mode(self, state: PushModeState) -> None:
        await self._call("push mode", self.client.set(self.keys.push_mode, json.dumps(asdict(state))))

    async def load_bans(self) -> dict[str, Ban]:
        raw = await self._call("bans", self.client.hgetall(self.keys.bans))
        return {k.decode(): Ban(**json.loads(v)) for k, v in raw.items()}

    async def save_ban(self, ban: Ban) -> None:
        await self._call("bans", self.client.hset(self.keys.bans, ban.target, json.dumps(asdict(ban))))

    async def delete_ban(self, target: str) -> bool:
        return bool(await self._call("bans", self.client.hdel(self.keys.bans, target)))

    async def claim(self, owner: str, key: str) -> bool:
        done = await self._call(
            "idempotency",
            self.client.set(
                self.keys.idempotency(owner, key), b"1", nx=True, px=int(IDEMPOTENCY_CLAIM_S * 1000)
            ),
        )
        return bool(done)

    async def renew(self, owner: str, key: str) -> None:
        await self._call(
            "idempotency",
            self.client.pexpire(self.keys.idempotency(owner, key), int(IDEMPOTENCY_CLAIM_S * 1000)),
        )

    async def release(self, owner: str, key: str) -> None:
        await self._call("idempotency", self.client.delete(self.keys.idempotency(owner, key)))
