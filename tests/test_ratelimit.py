"""Rate limits (R8.5): per user and per address on streams, tickets, polling and publishing, with
their own limits for publishers and admins; 429 ``rate_limited`` with ``Retry-After`` past one."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from scribe_events.auth import Principal
from scribe_events.exceptions import RateLimited
from scribe_events.ratelimit import RateLimits
from tests.conftest import MakeServer
from tests.harness import ThreadServer
from tests.test_metrics import value


def _bearer(server: ThreadServer, user: str, **kw: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(user, **kw)}"}  # type: ignore[arg-type]


def _stream_status(server: ThreadServer, user: str) -> tuple[int, dict[str, str], dict[str, object] | None]:
    with server.stream(user) as s:
        return s.status, s.headers, s.error_body


def _ticket(server: ThreadServer, user: str) -> httpx.Response:
    return httpx.post(server.url + "/api/v1/events/tickets", headers=_bearer(server, user))


def _poll(server: ThreadServer, user: str) -> httpx.Response:
    return httpx.get(server.url + "/api/v1/events", headers=_bearer(server, user))


def _refused(status: int, headers: dict[str, str], body: dict[str, object] | None) -> None:
    assert status == 429, (status, body)
    assert body is not None and body["error"]["code"] == "rate_limited"  # type: ignore[index]
    assert "retry in" in body["error"]["message"]  # type: ignore[index]
    assert 1 <= int(headers["retry-after"]) <= 60


def test_opening_streams_is_limited_per_user(make_server: MakeServer) -> None:
    server = make_server(rate_limit_streams_per_user="3/minute")
    assert [_stream_status(server, "alice")[0] for _ in range(3)] == [200, 200, 200]
    _refused(*_stream_status(server, "alice"))
    assert _stream_status(server, "bob")[0] == 200  # another user is not held back
    limited = 'scribe_events_requests_rate_limited_total{limit="rate_limit_streams_per_user"}'
    assert value(server, limited) == 1


@pytest.mark.parametrize("kind", ["tickets", "polling"])
def test_tickets_and_polling_are_limited_per_user(make_server: MakeServer, kind: str) -> None:
    server = make_server(**{f"rate_limit_{kind}_per_user": "2/minute"})
    call = _ticket if kind == "tickets" else _poll
    assert [call(server, "alice").status_code for _ in range(2)] == [200, 200]
    refused = call(server, "alice")
    _refused(refused.status_code, dict(refused.headers), refused.json())
    assert call(server, "bob").status_code == 200


def test_an_address_is_limited_across_its_users(make_server: MakeServer) -> None:
    server = make_server(rate_limit_polling_per_ip="4/minute")
    statuses = [_poll(server, f"user{i}").status_code for i in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    assert value(server, 'scribe_events_requests_rate_limited_total{limit="rate_limit_polling_per_ip"}') == 1


def test_publishers_and_admins_have_their_own_limits(make_server: MakeServer) -> None:
    server = make_server(
        rate_limit_publish_per_user="3/minute",
        rate_limit_streams_per_ip="2/minute",  # not applied to admins
        rate_limit_publish_per_ip="5/minute",  # above the publisher's own
        rate_limit_streams_per_user="1/minute",
        rate_limit_admin="4/minute",
    )
    body = {"type": "custom.x", "user_id": "u"}
    assert [server.publish(body).status_code for _ in range(3)] == [202, 202, 202]
    refused = server.publish(body)
    _refused(refused.status_code, dict(refused.headers), refused.json())
    admin = server.token("root", roles=["admin"])
    opened = []
    for _ in range(5):
        with server.stream(token=admin) as s:
            opened.append(s.status)
    assert opened == [200, 200, 200, 200, 429]  # past the users' 1/minute and the address's 2


def test_the_defaults_let_a_burst_of_streams_from_one_address_in() -> None:
    from scribe_events.config import Settings

    limits = RateLimits(Settings(redis_url=None))

    async def run() -> int:
        ok = 0
        for i in range(10_000):  # the benchmarks hold 10,000 streams from 127.0.0.1
            try:
                await limits.check("streams", Principal(f"u{i}", None, frozenset(), None), "127.0.0.1")
                ok += 1
            except Exception:
                break
        return ok

    assert asyncio.run(run()) == 10_000


def test_a_limiter_without_its_redis_lets_requests_through() -> None:
    from scribe_events.config import Settings

    limits = RateLimits(Settings(redis_url="redis://127.0.0.1:1/0", rate_limit_polling_per_user="1/minute"))

    async def run() -> int:
        who = Principal("alice", None, frozenset(), None)
        for _ in range(3):
            await limits.check("polling", who, "127.0.0.1")  # never raises: Redis is not there
        await limits.close()
        return sum(limits.unavailable.values())

    assert asyncio.run(run()) == 1  # the first failure pauses counting (no Redis call per request)


def test_a_hung_redis_costs_a_request_a_tenth_of_a_second_at_most() -> None:
    """Regression (review): a Redis that accepts and never answers held every request 10 s."""
    import socket
    import time

    from scribe_events.config import Settings

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    port = silent.getsockname()[1]
    limits = RateLimits(Settings(redis_url=f"redis://127.0.0.1:{port}/0"))

    async def run() -> list[float]:
        who = Principal("alice", None, frozenset(), None)
        took = []
        for _ in range(3):
            started = time.monotonic()
            await limits.check("publish", who, "127.0.0.1")
            took.append(time.monotonic() - started)
        await limits.close()
        return took

    try:
        took = asyncio.run(run())
    finally:
        silent.close()
    assert took[0] < 0.5 and max(took[1:]) < 0.01  # then paused: not asked at all


def test_limits_can_be_switched_off(make_server: MakeServer) -> None:
    server = make_server(rate_limits=False, rate_limit_polling_per_user="1/minute")
    assert [_poll(server, "alice").status_code for _ in range(3)] == [200, 200, 200]


# -- automatic bans ----------------------------------------------------------------------------------


def _bad_token_poll(server: ThreadServer, **headers: str) -> int:
    h = {"Authorization": "Bearer forged.token.here", **headers}
    return httpx.get(server.url + "/api/v1/events", headers=h).status_code


def test_the_sixth_failed_authentication_in_a_minute_bans_the_address(
    make_server: MakeServer, tmp_path: object
) -> None:
    from tests.harness import SECRET, cli

    server = make_server(trusted_proxies=["127.0.0.1"], auto_ban_failures=6)  # the address: X-Forwarded-For
    attacker = {"X-Forwarded-For": "203.0.113.66"}
    assert [_bad_token_poll(server, **attacker) for _ in range(6)] == [401] * 6
    assert _bad_token_poll(server, **attacker) == 401  # banned already: not banned again
    good = {**_bearer(server, "alice"), **attacker}
    refused = httpx.get(server.url + "/api/v1/events", headers=good)  # even with a good token now
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "banned"
    assert "automatic" in refused.json()["error"]["message"]
    assert (
        httpx.get(
            server.url + "/api/v1/events", headers={**good, "X-Forwarded-For": "198.51.100.1"}
        ).status_code
        == 200
    )
    assert value(server, "scribe_events_auto_bans_total") == 1  # once
    env = {"SCRIBE_EVENTS_URL": server.url, "SCRIBE_EVENTS_JWT_SECRET": SECRET}
    listed = cli("ban", "list", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    [ban] = [b for b in json.loads(listed.stdout)["bans"] if b.get("ip") == "203.0.113.66"]
    assert "automatic: 6 failed authentications within 60 s" in ban["reason"] and ban["until"]
    lifted = cli("ban", "remove", "--ip", "203.0.113.66", cwd=tmp_path, env=env)
    assert lifted.returncode == 0, lifted.stderr
    assert httpx.get(server.url + "/api/v1/events", headers=good).status_code == 200


def test_expired_tokens_and_the_proxy_itself_are_not_banned(make_server: MakeServer) -> None:
    server = make_server(trusted_proxies=["127.0.0.1"], auto_ban_failures=2)
    expired = {
        "Authorization": f"Bearer {server.token('alice', ttl_s=-60)}",
        "X-Forwarded-For": "203.0.113.7",
    }
    for _ in range(5):  # an honest client with an old token: 401, never a ban
        assert httpx.get(server.url + "/api/v1/events", headers=expired).status_code == 401
    for _ in range(5):  # no forwarded address: the failures come from the proxy, which is not banned
        assert _bad_token_poll(server) == 401
    assert value(server, "scribe_events_auto_bans_total") == 0
    assert httpx.get(server.url + "/api/v1/events", headers=_bearer(server, "bob")).status_code == 200


def test_publishing_is_limited_per_address_too(make_server: MakeServer) -> None:
    server = make_server(rate_limit_publish_per_ip="2/minute")
    other = {"Authorization": f"Bearer {server.token('worker-2', roles=['publisher'])}"}
    body = {"type": "custom.x", "user_id": "u"}
    assert server.publish(body).status_code == 202
    assert server.publish(body, headers=other).status_code == 202  # another publisher, same address
    refused = server.publish(body)
    _refused(refused.status_code, dict(refused.headers), refused.json())
    limited = 'scribe_events_requests_rate_limited_total{limit="rate_limit_publish_per_ip"}'
    assert value(server, limited) == 1


def test_a_burst_of_forged_tokens_from_one_address_makes_one_ban(make_server: MakeServer) -> None:
    """Regression (review): concurrent failures each saw no ban yet and banned again (195 for 200)."""
    from concurrent.futures import ThreadPoolExecutor

    server = make_server(trusted_proxies=["127.0.0.1"], auto_ban_failures=2)
    forged = {"Authorization": "Bearer forged.token.x", "X-Forwarded-For": "203.0.113.77"}

    def once(_: int) -> int:
        return httpx.get(server.url + "/api/v1/events", headers=forged).status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(once, range(60)))
    assert set(statuses) == {401}
    assert value(server, "scribe_events_auto_bans_total") == 1


def test_publishing_is_counted_by_the_instance_also_with_redis(redis_prefix: str) -> None:
    """A publish never costs a Redis round trip (a trusted service's limit only stops a runaway one);
    the other kinds are still counted in Redis, for every instance at once."""
    import redis as redis_sync

    from scribe_events.config import Settings
    from tests.conftest import REDIS_URL

    settings = Settings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        rate_limit_publish_per_user="2/minute",
        rate_limit_polling_per_user="5/minute",
    )
    limits = RateLimits(settings)
    publisher = Principal("svc", None, frozenset({"publisher"}), None)
    reader = Principal("alice", None, frozenset(), None)

    async def run() -> list[bool]:
        allowed = []
        for _ in range(3):
            try:
                await limits.check("publish", publisher, "10.0.0.1")
                allowed.append(True)
            except RateLimited:
                allowed.append(False)
        await limits.check("polling", reader, "10.0.0.2")
        await limits.close()
        return allowed

    assert asyncio.run(run()) == [True, True, False]
    client = redis_sync.Redis.from_url(REDIS_URL)
    keys = [k.decode() for k in client.scan_iter(match=redis_prefix + "*")]
    client.close()
    assert keys and all("publish" not in k for k in keys) and any("polling" in k for k in keys), keys
