"""Shared run-time controls: the push mode (R6.6) and bans (R8.5), the same on every instance.

A change is saved in the shared state (Redis when configured) and announced as a control message
through the broker; every instance (this one included) applies it to its own cache and its own
connections: clients are told their new push mode with ``system.push-mode``; a banned user's or
address's streams are closed.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any, Literal

from scribe_events.auth import Principal
from scribe_events.broker import Broker
from scribe_events.config import Settings
from scribe_events.events import Event, dumps
from scribe_events.exceptions import Forbidden
from scribe_events.hub import Hub
from scribe_events.state import Ban, PushModeState, SharedState

log = logging.getLogger("scribe_events.control")

Mode = Literal["sse", "polling"]


def mode_for(state: PushModeState, user_id: str) -> Mode:
    """All on SSE, all polling, or ``sse_percent`` of users (stable per user) on SSE."""
    if state.mode == "polling":
        return "polling"
    if state.sse_percent >= 100:
        return "sse"
    return "sse" if zlib.crc32(user_id.encode()) % 100 < state.sse_percent else "polling"


def ban_target(user_id: str | None, ip: str | None) -> str:
    if (user_id is None) == (ip is None):
        raise ValueError("name a user or an ip")
    return f"user:{user_id}" if user_id is not None else f"ip:{ip}"


class Control:
    def __init__(self, settings: Settings, state: SharedState, broker: Broker, hub: Hub) -> None:
        self.settings = settings
        self.state = state
        self.broker = broker
        self.hub = hub
        self.push = PushModeState()
        self.bans: dict[str, Ban] = {}
        broker.on_control = self.on_message
        broker.on_subscribed = self.reload

    async def start(self) -> None:
        await self.reload()

    async def reload(self) -> None:
        """Read push mode and bans from the shared state (at start, and after a lost subscription)."""
        push, bans = await self.state.load_push_mode(), await self.state.load_bans()
        changed_mode = push != self.push
        self.push, self.bans = push, bans
        for ban in bans.values():
            self._close_banned(ban)
        if changed_mode:
            self._announce_push_mode()

    # -- push mode ---------------------------------------------------------------------------------

    def mode_for(self, user_id: str) -> Mode:
        return mode_for(self.push, user_id)

    async def set_push_mode(self, mode: Mode, sse_percent: int) -> None:
        state = PushModeState(mode, sse_percent)
        await self.state.save_push_mode(state)
        await self.broker.publish_control({"kind": "push-mode", "mode": mode, "sse_percent": sse_percent})

    # -- bans --------------------------------------------------------------------------------------

    async def ban(self, target: str, reason: str, ttl_s: int | None) -> Ban:
        ban = Ban(target, reason, None if ttl_s is None else int((time.time() + ttl_s) * 1000))
        self.bans[target] = ban  # in force here at once (the control message tells the others)
        try:
            await self.state.save_ban(ban)
        except BaseException:
            self.bans.pop(target, None)
            raise
        await self.broker.publish_control(
            {"kind": "ban", "target": ban.target, "reason": ban.reason, "until_ms": ban.until_ms}
        )
        return ban

    async def unban(self, target: str) -> bool:
        removed = await self.state.delete_ban(target)
        await self.broker.publish_control({"kind": "unban", "target": target})
        return removed

    def active_bans(self) -> list[Ban]:
        now = int(time.time() * 1000)
        return [b for b in self.bans.values() if b.active(now)]

    def banned(self, *, ip: str) -> bool:
        ban = self.bans.get(f"ip:{ip}")
        return ban is not None and ban.active(int(time.time() * 1000))

    def check(self, principal: Principal | None, remote: str | None) -> None:
        """Refuse a banned user or address (403 ``banned``). Admins pass, so a ban can always be lifted."""
        if not self.bans or (principal is not None and principal.is_admin):
            return
        now = int(time.time() * 1000)
        for target in (
            f"user:{principal.user_id}" if principal else None,
            f"ip:{remote}" if remote else None,
        ):
            ban = self.bans.get(target) if target else None
            if ban is not None and ban.active(now):
                raise Forbidden(f"banned: {ban.reason}" if ban.reason else "banned", code="banned")

    # -- control messages, applied on every instance -----------------------------------------------

    async def on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "push-mode":
            self.push = PushModeState(message["mode"], int(message["sse_percent"]))
            self._announce_push_mode()
        elif kind == "ban":
            ban = Ban(message["target"], message.get("reason", ""), message.get("until_ms"))
            self.bans[ban.target] = ban
            self._close_banned(ban)
        elif kind == "unban":
            self.bans.pop(message["target"], None)

    def _announce_push_mode(self) -> None:
        deliveries = [
            Event(
                "system.push-mode",
                dumps({"mode": self.mode_for(u), "poll_interval_s": self.settings.poll_interval_s}),
                user_id=u,
                persist=False,
            ).delivery()
            for u in self.hub.users()
        ]
        if deliveries:
            self.hub.dispatch(deliveries)

    def _close_banned(self, ban: Ban) -> None:
        if not ban.active(int(time.time() * 1000)):
            return
        kind, _, value = ban.target.partition(":")
        if kind == "user":
            doomed = self.hub.of_user(value)
        else:
            doomed = [c for c in self.hub.connections.values() if c.ip == value]
        for conn in doomed:
            if conn.is_admin:
                continue  # admins are never refused (check), so their streams stay too
            log.warning("closing connection %s of banned %s", conn.id, ban.target)
            self.hub.cut(conn, "banned")
