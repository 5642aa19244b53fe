"""What a run talks to: scribe-events' own endpoints with tokens minted here, or another SSE server
described by URL, header and body templates (Nchan, a plain FastAPI baseline...)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from scribe_events.auth import ROLE_PUBLISHER, mint_token
from scribe_events.config import Settings
from scribe_events.loadgen.errors import BadInput, LoadgenError
from scribe_events.loadgen.publisher import Publisher, PublishSpec
from scribe_events.loadgen.receiver import READY_FRAME, READY_HEADERS, SubscriberSpec

STREAM_PATH = "/api/v1/events/stream"
PUBLISH_PATH = "/api/v1/events"
_DATA = '"data":{"ts":{ts},"seq":{seq},"run":{run}}'
BROADCAST_BODY = '{"type":"bench.tick","broadcast":true,' + _DATA + "}"
TARGETED_BODY = '{"type":"bench.tick","user_id":"{user}",' + _DATA + "}"
GENERIC_BODY = '{"ts":{ts},"seq":{seq},"run":{run}}'  # ssebench's default
PUBLISHER_USER = "bench-publisher"


@dataclass(frozen=True, slots=True)
class Target:
    """How to reach the server. ``sub_url``/``pub_url`` unset: scribe-events at ``settings.url``."""

    settings: Settings
    sub_url: str | None = None
    sub_headers: tuple[str, ...] = ()
    pub_url: str | None = None
    pub_body: str | None = None
    pub_headers: tuple[str, ...] = ()
    token: str | None = None  # the publisher's; unset: SCRIBE_EVENTS_TOKEN, else minted here
    ready: str | None = None  # READY_FRAME or READY_HEADERS; unset: frame for scribe-events


def specs(
    target: Target,
    *,
    users: int,
    default_body: str,
    ttl_s: int,
    connections: int = 32,
    subscribing: bool = True,
    publishing: bool = True,
) -> tuple[SubscriberSpec, PublishSpec]:
    """The subscribers' and the publisher's specs; every template is filled once here, so a mistake
    is one clear error now rather than a failure in a worker process."""
    settings = target.settings
    base = settings.url.rstrip("/")
    if subscribing and target.pub_url is not None and target.sub_url is None:
        raise BadInput("--pub-url is for another server: give its --sub-url too")
    if publishing and target.sub_url is not None and target.pub_url is None:
        raise BadInput("with --sub-url (another server), say where to publish: --pub-url")
    body = target.pub_body or (default_body if target.pub_url is None else GENERIC_BODY)
    if subscribing and publishing and not all(f in body for f in ("{seq}", "{ts}")):
        raise BadInput("--pub-body must hold {seq} and {ts}: the receivers know an event by them")
    user_headers: tuple[str, ...] = ()
    if subscribing and target.sub_url is None:
        # One token per user, not per subscriber: minting is the slow part of setting up.
        secret = _secret(settings, "the subscribers' tokens")
        user_headers = tuple(
            f"Authorization: Bearer {_mint(settings, secret, f'u{j}', ttl_s)}" for j in range(users)
        )
    pub_headers = list(target.pub_headers)
    if publishing and target.pub_url is None:
        bearer = target.token or settings.token
        if bearer is None:
            bearer = _mint(
                settings, _secret(settings, "a publisher token"), PUBLISHER_USER, ttl_s, ROLE_PUBLISHER
            )
        pub_headers.append(f"Authorization: Bearer {bearer}")
    run = secrets.randbelow(1 << 40) + 1
    ready = target.ready or (READY_FRAME if target.sub_url is None else READY_HEADERS)
    sub = SubscriberSpec(
        url=target.sub_url or base + STREAM_PATH,
        headers=target.sub_headers,
        user_headers=user_headers,
        users=users,
        run=run,
        ready=ready,
    )
    pub = PublishSpec(
        url=target.pub_url or base + PUBLISH_PATH,
        body=body,
        headers=tuple(pub_headers),
        users=users,
        run=run,
        connections=connections,
    )
    if subscribing:
        sub.request(0)
    if publishing:
        Publisher(pub).request(pub.body)
    return sub, pub


def _secret(settings: Settings, what: str) -> str:
    secret = settings.signing_secret()
    if secret is None:
        raise LoadgenError(
            f"no secret to mint {what}: set SCRIBE_EVENTS_JWT_SECRET (the server's) or run where its "
            f"secret file is ({settings.jwt_secret_file}); or pass --token / --sub-url and --sub-header"
        )
    return secret


def _mint(settings: Settings, secret: str, user: str, ttl_s: int, *roles: str) -> str:
    return mint_token(
        secret, user, roles=roles, ttl_s=ttl_s, audience=settings.jwt_audience, issuer=settings.jwt_issuer
    )
