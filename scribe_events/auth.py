"""Identity: JWT verification (PyJWT), dev tokens, and single-use stream tickets for browsers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from scribe_events.config import Settings
from scribe_events.exceptions import Forbidden, InvalidToken, Unauthorized
from scribe_events.ids import is_text_id

ROLE_PUBLISHER = "publisher"
ROLE_ADMIN = "admin"
ROLES = (ROLE_PUBLISHER, ROLE_ADMIN)
VERIFIED_CACHE = 4096  # tokens remembered as verified (see TokenVerifier.verify), of at most
VERIFIED_TOKEN_CHARS = 2048  # characters each: at most 8 MiB


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``sub`` is the user id; ``sid`` the session the token is bound to, if any."""

    user_id: str
    session_id: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    expires_at: float | None = None  # the token's exp (epoch seconds)

    @property
    def is_admin(self) -> bool:
        return ROLE_ADMIN in self.roles

    def require(self, *roles: str) -> None:
        if not self.roles.intersection(roles):
            raise Forbidden(f"this needs the role {' or '.join(roles)}", code="missing_role")


class TokenVerifier:
    """Checks bearer tokens against the configured key, algorithms, audience and issuer."""

    def __init__(self, settings: Settings, *, create_secret: bool = False) -> None:
        algorithms = [a for a in settings.jwt_algorithms if a.lower() != "none"]
        if not algorithms:
            raise ValueError("SCRIBE_EVENTS_JWT_ALGORITHMS names no usable algorithm")
        self.algorithms = algorithms
        key: Any
        if settings.jwt_public_key:
            key = settings.jwt_public_key
        else:
            key = settings.signing_secret(create=create_secret)
            if key is None:
                raise ValueError(
                    "no JWT secret: set SCRIBE_EVENTS_JWT_SECRET or run `scribe-events serve` once"
                )
        self.key = key
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self._verified: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        """The token's principal. A token that verified is remembered (bounded, until its ``exp``):
        a publisher or a user's tabs send the same one again and again, and HMAC over the claims
        and their JSON cost more than the rest of a publish request."""
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at is not None and int(known.expires_at) > time.time():  # as PyJWT
                return known
            del self._verified[token]  # expired: the full check below says so
        principal = self._verify(token)
        if principal.expires_at is not None and len(token) <= VERIFIED_TOKEN_CHARS:
            if len(self._verified) >= VERIFIED_CACHE:
                del self._verified[next(iter(self._verified))]  # the oldest
            self._verified[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["sub", "exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("the token has expired", reason="expired_token") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("the token is not meant for this audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken("the token has the wrong issuer") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise InvalidToken("the token's algorithm is not accepted") from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("the token's signature does not verify") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token lacks the claim '{exc.claim}'") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("the token is malformed") from exc
        return principal_from_claims(claims)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    sub, sid, roles = claims.get("sub"), claims.get("sid"), claims.get("roles", [])
    if not is_text_id(sub):
        raise InvalidToken("the token's 'sub' must be 1-200 characters without control characters")
    if sid is not None and not is_text_id(sid):
        raise InvalidToken("the token's 'sid' must be 1-200 characters without control characters")
    if not isinstance(roles, list) or len(roles) > 20 or not all(isinstance(r, str) for r in roles):
        raise InvalidToken("the token's 'roles' must be a list of strings")
    exp = claims.get("exp")
    return Principal(str(sub), sid, frozenset(roles), float(exp) if isinstance(exp, int | float) else None)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer …`` header, or 401."""
    if not authorization:
        raise Unauthorized("send 'Authorization: Bearer <token>'", reason="missing_token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def mint_token(
    secret: str,
    user_id: str,
    *,
    session_id: str | None = None,
    roles: list[str] | tuple[str, ...] = (),
    ttl_s: int = 3600,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A signed token for ``user_id``: for development, tests and the CLI's own use."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if session_id:
        claims["sid"] = session_id
    if roles:
        claims["roles"] = list(roles)
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)
