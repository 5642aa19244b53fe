"""The client's address behind trusted proxies: believed from a trusted peer only, used by bans,
stream caps and the connection list; a forged header from anyone else changes nothing."""

from __future__ import annotations

import httpx
import pytest

from scribe_events.proxies import TrustedProxies
from tests.conftest import MakeServer
from tests.harness import ThreadServer


def _admin(server: ThreadServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token('root', roles=['admin'])}"}


def _ban_ip(server: ThreadServer, ip: str) -> None:
    r = httpx.post(
        server.url + "/api/v1/admin/bans", json={"ip": ip, "reason": "test"}, headers=_admin(server)
    )
    assert r.status_code == 201, r.text


def _remotes(server: ThreadServer) -> list[str]:
    body = httpx.get(server.url + "/api/v1/admin/connections", headers=_admin(server)).json()
    return sorted(c["remote"].rsplit(":", 1)[0] for c in body["connections"])


def test_a_forged_forwarded_for_from_an_untrusted_peer_changes_nothing(make_server: MakeServer) -> None:
    server = make_server(max_streams_per_ip=1, trusted_proxies=["10.0.0.0/8"])  # not our 127.0.0.1
    _ban_ip(server, "203.0.113.9")
    forged = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
    with server.stream("alice", headers=forged) as s:
        assert s.status == 200  # the ban on the forged address does not apply
        s.read_count(1, event="connection.established")
        assert _remotes(server) == ["127.0.0.1"]
        other = {"X-Forwarded-For": "198.51.100.7"}
        with server.stream("bob", headers=other) as second:  # still 127.0.0.1: the address cap holds
            assert second.status == 429 and second.error_body["error"]["code"] == "too_many_streams"


def test_behind_a_trusted_proxy_bans_and_caps_use_the_client_address(make_server: MakeServer) -> None:
    server = make_server(max_streams_per_ip=1, trusted_proxies=["127.0.0.1"])
    _ban_ip(server, "203.0.113.9")
    with server.stream("alice", headers={"X-Forwarded-For": "203.0.113.9"}) as banned:
        assert banned.status == 403 and banned.error_body["error"]["code"] == "banned"
    # A client's own claim is not believed: the proxy appended what it saw, on the right.
    with server.stream("bob", headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}) as bob:
        assert bob.status == 200
        bob.read_count(1, event="connection.established")
        with server.stream("carol", headers={"X-Forwarded-For": "2001:db8::17"}) as carol:
            assert carol.status == 200
            carol.read_count(1, event="connection.established")
            assert _remotes(server) == ["198.51.100.7", "2001:db8::17"]
            with server.stream("dave", headers={"X-Forwarded-For": "198.51.100.7"}) as dave:
                assert dave.status == 429  # one stream per address: bob's
    polled = httpx.get(
        server.url + "/api/v1/events",
        headers={"Authorization": f"Bearer {server.token('erin')}", "X-Forwarded-For": "203.0.113.9"},
    )
    assert polled.status_code == 403  # the ban holds on every route


@pytest.mark.parametrize(
    ("header", "headers", "client"),
    [
        ("x-forwarded-for", {"x-forwarded-for": "203.0.113.9"}, "203.0.113.9"),
        ("x-forwarded-for", {"x-forwarded-for": "6.6.6.6, 203.0.113.9, 10.1.2.3"}, "203.0.113.9"),  # 2 hops
        ("x-forwarded-for", {"x-forwarded-for": "203.0.113.9:4000"}, "203.0.113.9"),
        ("x-forwarded-for", {"x-forwarded-for": "garbage, 203.0.113.9"}, "203.0.113.9"),
        ("x-forwarded-for", {"x-forwarded-for": "203.0.113.9, garbage"}, None),  # the proxy's own: unreadable
        ("x-forwarded-for", {"x-forwarded-for": "::ffff:203.0.113.9"}, "203.0.113.9"),  # IPv4-mapped
        ("forwarded", {"forwarded": 'for="[2001:db8::17]:4711";proto=https, for=10.0.0.5'}, "2001:db8::17"),
        ("forwarded", {"forwarded": "for=unknown"}, None),
        # The header the proxy does not write is never believed: a client could send it through.
        ("x-forwarded-for", {"forwarded": "for=192.0.2.1", "x-forwarded-for": "203.0.113.9"}, "203.0.113.9"),
        ("x-forwarded-for", {"forwarded": "for=192.0.2.1"}, None),
        ("forwarded", {"x-forwarded-for": "192.0.2.1"}, None),
        ("x-forwarded-for", {}, None),
    ],
)
def test_the_client_is_the_rightmost_untrusted_hop(
    header: str, headers: dict[str, str], client: str | None
) -> None:
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"], header)
    scope = {"client": ("127.0.0.1", 5555), "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    assert proxies.client(scope) == (None if client is None else (client, 0))
    assert proxies.client({**scope, "client": ("198.51.100.1", 5555)}) is None  # untrusted peer
    assert proxies.trusted("::ffff:127.0.0.1")  # a dual-stack socket's view of the proxy


def test_a_bad_trusted_proxy_setting_is_refused() -> None:
    from pydantic import ValidationError

    from scribe_events.config import Settings

    with pytest.raises(ValidationError, match="not an IP address or network"):
        Settings(trusted_proxies=["10.0.0.0/8", "proxy.example"])


def test_a_forged_forwarded_header_through_the_proxy_bans_nobody(make_server: MakeServer) -> None:
    """Regression (review): the proxy writes X-Forwarded-For and passes a client's own Forwarded
    header on; believing that one let any client ban any address."""
    server = make_server(trusted_proxies=["127.0.0.1"], auto_ban_failures=2)
    forged = {
        "Authorization": "Bearer forged.token.x",
        "Forwarded": "for=203.0.113.9",
        "X-Forwarded-For": "198.51.100.3",
    }
    for _ in range(3):
        assert httpx.get(server.url + "/api/v1/events", headers=forged).status_code == 401
    bans = httpx.get(server.url + "/api/v1/admin/bans", headers=_admin(server)).json()["bans"]
    assert [b["ip"] for b in bans] == ["198.51.100.3"]  # the sender's address, not the victim's
