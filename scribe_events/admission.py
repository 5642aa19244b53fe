"""The one way in: every request that acts for a user comes through :class:`Admission`.

The stream, polling, tickets, the client config, publishing and the admin routes all call it, so
they cannot differ in how they check a caller: the token (or a single-use ticket), bans, the
session a request names and the caps on open streams.
"""

from __future__ import annotations

import logging
import re

from scribe_events.auth import Principal, TokenVerifier, bearer_token
from scribe_events.config import Settings
from scribe_events.control import Control
from scribe_events.exceptions import BadRequest, Forbidden, InvalidToken, RateLimited
from scribe_events.hub import Hub
from scribe_events.ids import ID_RULE, is_text_id
from scribe_events.proxies import TrustedProxies
from scribe_events.ratelimit import RateLimits
from scribe_events.state import SharedState

log = logging.getLogger("scribe_events.admission")

_TICKET = re.compile(r"[A-Za-z0-9_-]{16,128}")


class Admission:
    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        state: SharedState,
        control: Control,
        hub: Hub,
        limits: RateLimits | None = None,
    ) -> None:
        self.limits = limits or RateLimits(settings)
        self.auto_bans = 0
        self._banning: set[str] = set()
        # A proxy's own address is never banned automatically: it would shut out everyone behind it.
        self.never_ban = TrustedProxies(settings.trusted_proxies)
        self.settings = settings
        self.verifier = verifier
        self.state = state
        self.control = control
        self.hub = hub

    async def caller(
        self, authorization: str | None, remote_ip: str | None, *, ticket: str | None = None
    ) -> Principal:
        """Who is calling (a Bearer token, or a ticket where ``ticket`` is given), unless banned."""
        if ticket:
            if not _TICKET.fullmatch(ticket):
                raise InvalidToken("the ticket is unknown, expired or already used", reason="invalid_ticket")
            principal = await self.state.redeem_ticket(ticket)
        else:
            try:
                principal = self.verifier.verify(bearer_token(authorization))
            except InvalidToken as exc:
                if exc.reason == "invalid_token" and remote_ip:  # forged or garbled, not merely old
                    await self._failed(remote_ip)
                raise
        self.control.check(principal, remote_ip)
        return principal

    async def _failed(self, ip: str) -> None:
        """One more failed authentication from ``ip``: past auto_ban_failures it is banned."""
        if self.settings.auto_ban_failures == 0 or ip in self.never_ban or self.control.banned(ip=ip):
            return  # off, a proxy, or banned already (counting on would only ban it again)
        if not await self.limits.failed_authentication(ip):
            return
        if ip in self._banning or self.control.banned(ip=ip):  # again: another may have meanwhile
            return
        self._banning.add(ip)  # concurrent failures of one address make one ban
        try:
            await self._ban(ip)
        finally:
            self._banning.discard(ip)

    async def _ban(self, ip: str) -> None:
        s = self.settings
        reason = f"automatic: {s.auto_ban_failures} failed authentications within {s.auto_ban_window_s} s"
        try:
            await self.control.ban(f"ip:{ip}", reason, s.auto_ban_s)
        except Exception as exc:  # the ban could not be stored: the failure is still answered 401
            log.error("could not ban %s automatically: %s", ip, exc)
            return
        self.auto_bans += 1
        log.warning("banned %s for %d s: %s", ip, s.auto_ban_s, reason)

    async def limit(self, kind: str, principal: Principal, remote_ip: str | None) -> None:
        """Count a request of ``kind`` (streams, tickets, polling, publish): 429 past a rate limit."""
        await self.limits.check(kind, principal, remote_ip)

    @staticmethod
    def session(principal: Principal, requested: str | None) -> str | None:
        """The session a request acts in: the one it names, else the token's. A session is always
        the caller's own; a token bound to a session cannot name another (403)."""
        session_id = requested or principal.session_id
        if session_id is not None and not is_text_id(session_id):
            raise BadRequest(f"session_id must be {ID_RULE}", code="invalid_session_id")
        if principal.session_id is not None and session_id != principal.session_id:
            raise Forbidden("the token is bound to another session", code="session_mismatch")
        return session_id

    def stream_room(self, principal: Principal, remote_ip: str | None) -> None:
        """Refuse one more stream for a user or an address that holds its share (429). Admins pass."""
        if principal.is_admin:
            return
        s, hub = self.settings, self.hub
        if hub.count_user(principal.user_id) >= s.max_streams_per_user:
            raise RateLimited(
                f"this user has {s.max_streams_per_user} streams open on this server; close one first",
                retry_after_s=max(1, round(s.heartbeat_s)),
                code="too_many_streams",
                reason="streams_per_user",
            )
        if remote_ip and hub.count_ip(remote_ip) >= s.max_streams_per_ip:
            raise RateLimited(
                f"this address has {s.max_streams_per_ip} streams open on this server",
                retry_after_s=max(1, round(s.heartbeat_s)),
                code="too_many_streams",
                reason="streams_per_ip",
            )
