"""Every auth failure the contract lists, on the stream and on the API; tickets."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest

from scribe_events.auth import mint_token
from tests.conftest import MakeServer
from tests.harness import SECRET, ThreadServer

INVALID = 'Bearer error="invalid_token"'


def _expired() -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    claims = jwt.utils.base64url_encode(f'{{"sub":"alice","exp":{now + 60}}}'.encode()).decode()
    return {
        "alg_none": f"{header}.{claims}.",
        "bad_signature": mint_token("another-secret-" + "y" * 40, "alice"),
        "expired": _expired(),
        "algorithm_not_configured": jwt.encode({"sub": "alice", "exp": now + 60}, SECRET, algorithm="HS512"),
        "no_sub": jwt.encode({"exp": now + 60}, SECRET, algorithm="HS256"),
        "no_exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
        "garbage": "not.a.jwt",
    }


def test_stream_without_token_is_401_with_bearer_challenge(server: ThreadServer) -> None:
    with server.stream() as s:
        assert s.status == 401
        assert s.headers["www-authenticate"] == "Bearer"
        assert s.headers["content-type"] == "application/json"
        assert s.error_body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("case", sorted(_bad_tokens()))
def test_stream_rejects_bad_token(server: ThreadServer, case: str) -> None:
    with server.stream(token=_bad_tokens()[case]) as s:
        assert s.status == 401, case
        assert s.headers["www-authenticate"] == INVALID
        assert s.error_body["error"]["code"] == "invalid_token"
        assert s.error_body["error"]["message"]


@pytest.mark.parametrize("case", ["expired", "bad_signature", "alg_none"])
def test_api_rejects_bad_token(server: ThreadServer, case: str) -> None:
    r = httpx.post(
        server.url + "/api/v1/events",
        json={"type": "custom.x", "broadcast": True},
        headers={"Authorization": f"Bearer {_bad_tokens()[case]}"},
    )
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == INVALID
    assert r.json()["error"]["code"] == "invalid_token"


def test_audience_and_issuer_are_checked_when_configured(make_server: MakeServer) -> None:
    server = make_server(jwt_audience="scribe", jwt_issuer="https://auth.example")
    good = mint_token(SECRET, "alice", audience="scribe", issuer="https://auth.example")
    wrong_aud = mint_token(SECRET, "alice", audience="other", issuer="https://auth.example")
    wrong_iss = mint_token(SECRET, "alice", audience="scribe", issuer="https://evil.example")
    missing = mint_token(SECRET, "alice")
    with server.stream(token=good) as s:
        assert s.status == 200
    for token in (wrong_aud, wrong_iss, missing):
        with server.stream(token=token) as s:
            assert s.status == 401
            assert s.error_body["error"]["code"] == "invalid_token"


def test_token_in_query_string_is_refused(server: ThreadServer) -> None:
    with server.stream(path=f"/api/v1/events/stream?token={server.token('alice')}") as s:
        assert s.status == 400
        assert s.error_body["error"]["code"] == "token_in_query"


def test_token_bound_to_session_cannot_open_another(server: ThreadServer) -> None:
    token = server.token("alice", session_id="s1")
    with server.stream(token=token, path="/api/v1/events/stream?session_id=s2") as s:
        assert s.status == 403
        assert s.error_body["error"]["code"] == "session_mismatch"


def test_publish_needs_publisher_role(server: ThreadServer) -> None:
    r = httpx.post(
        server.url + "/api/v1/events",
        json={"type": "custom.x", "broadcast": True},
        headers={"Authorization": f"Bearer {server.token('alice')}"},
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "missing_role"


def _ticket(server: ThreadServer, user: str) -> str:
    r = httpx.post(
        server.url + "/api/v1/events/tickets", headers={"Authorization": f"Bearer {server.token(user)}"}
    )
    assert r.status_code == 200
    assert r.json()["expires_in"] == 30
    return str(r.json()["ticket"])


def test_ticket_opens_the_stream_once(server: ThreadServer) -> None:
    ticket = _ticket(server, "alice")
    with server.stream(path=f"/api/v1/events/stream?ticket={ticket}") as s:
        assert s.status == 200
        s.read_count(1, event="connection.established")
        server.publish_ok({"type": "custom.for-alice", "user_id": "alice"})
        assert [m.event for m in s.read_count(1)] == ["custom.for-alice"]
    with server.stream(path=f"/api/v1/events/stream?ticket={ticket}") as again:
        assert again.status == 401
        assert again.headers["www-authenticate"] == INVALID
        assert again.error_body["error"]["code"] == "invalid_token"


def test_ticket_expires(make_server: MakeServer) -> None:
    server = make_server(ticket_ttl_s=1)
    ticket = _ticket_ttl(server)
    time.sleep(1.2)
    with server.stream(path=f"/api/v1/events/stream?ticket={ticket}") as s:
        assert s.status == 401


def _ticket_ttl(server: ThreadServer) -> str:
    r = httpx.post(
        server.url + "/api/v1/events/tickets", headers={"Authorization": f"Bearer {server.token('a')}"}
    )
    return str(r.json()["ticket"])


def test_unknown_ticket_is_401(server: ThreadServer) -> None:
    with server.stream(path="/api/v1/events/stream?ticket=nope") as s:
        assert s.status == 401
        assert s.error_body["error"]["code"] == "invalid_token"


def test_rs256_public_key_verifies_and_hs256_is_then_refused(make_server: MakeServer) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    server = make_server(jwt_secret=None, jwt_public_key=public_pem, jwt_algorithms=["RS256"])
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, private, algorithm="RS256")
    with server.stream(token=good) as s:
        assert s.status == 200
    # With only RS256 configured, an HS256 token is refused whatever its secret.
    forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "x" * 64, algorithm="HS256")
    with server.stream(token=forged) as s:
        assert s.status == 401 and s.error_body["error"]["code"] == "invalid_token"
