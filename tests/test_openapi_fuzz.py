"""Schemathesis against the service's own OpenAPI document, on a real uvicorn server.

How it is built:

- The schema is the document ``GET /openapi.json`` serves, generated at import by the same
  ``FastAPI.openapi()`` (pytest needs the operations at collection time, and schemathesis' lazy
  ``pytest.from_fixture`` loader breaks under pytest 9: it writes the removed ``Node._nodeid``).
  ``test_openapi_served_document_is_the_one_fuzzed`` checks the running server serves exactly it.
- One module-scoped server (``tests.harness.ThreadServer``: uvicorn, our protocol, uvloop) takes
  every request. Each case is sent as one of ``IDENTITIES`` (anonymous, garbage, expired, user,
  session-bound user, publisher, admin), picked by a stable hash of the case: schemathesis refuses
  ``@schema.given`` next to schema examples.
- Checks (``CHECKS``): no 5xx, except a 503 the operation documents with a retry-later code; the
  documented response schema, content type and headers; every error body is the contract's
  ``{"error": {"code", "message"}}``; a 200 stream greets with ``connection.established``. Every
  request times out after ``REQUEST_TIMEOUT_S``, so a hang fails.
- ``GET /api/v1/events/stream`` never ends for a valid token. Schemathesis fuzzes it with a short
  read (``max-stream-events = 1``: the read stops after the first event, the greeting), and a
  hypothesis test drives what the document leaves out (``Last-Event-ID``, ``Origin``, tickets,
  tokens in the query) over a raw socket, reading the head and the greeting only, then closing.
- ``PINNED`` replays known defects as exact requests, so the default run always tries them.
- The default run is derandomized (the same cases every time); the ``slow`` tests (``make fuzz``)
  draw fresh random cases, many more of them.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)

from scribe_events.auth import mint_token
from scribe_events.client import SSEParser
from scribe_events.exceptions import ScribeEventsError, ValidationFailed
from scribe_events.vocabulary import parse_publish
from scribe_events.web.app import create_app
from scribe_events.web.publish import parse_body
from tests.conftest import MakeServer
from tests.harness import SECRET, RawStream, ThreadServer

REQUEST_TIMEOUT_S = 5.0
FAST_EXAMPLES = 40  # per operation, on top of schemathesis' examples and coverage cases
SLOW_EXAMPLES = 1000
STREAM = "/api/v1/events/stream"
RETRY_LATER = {"store_unavailable", "not_ready"}

# --- identities -----------------------------------------------------------------------------------


def _bearer(user: str, **kw: Any) -> str:
    return "Bearer " + mint_token(SECRET, user, **kw)


IDENTITIES: dict[str, str | None] = {
    "anonymous": None,
    "garbage": "Bearer not.a.jwt",
    "expired": _bearer("fz-expired", ttl_s=-10),
    "user": _bearer("fz-user"),
    "session-user": _bearer("fz-user", session_id="fz-session"),
    "publisher": _bearer("fz-publisher", roles=["publisher"]),
    "admin": _bearer("fz-admin", roles=["admin"]),
}
NAMES = sorted(IDENTITIES)
TICKET_USER = _bearer("fz-ticket-user")
_WHO: dict[int, str] = {}  # id(case) -> the identity it was sent as, for failure messages


def _stable(value: Any) -> Any:
    """``value`` with schemathesis' NOT_SET (whose repr is an address) as None."""
    return None if type(value).__name__ == "NotSet" else value


def identity_for(case: schemathesis.Case) -> str:
    """An identity picked by a stable hash of the case as generated (its Authorization included)."""
    headers = {k.lower(): v for k, v in (case.headers or {}).items()}
    key = [case.method, case.path, _stable(case.query), _stable(case.body), headers, case.media_type]
    digest = zlib.crc32(json.dumps(key, sort_keys=True, default=repr).encode("utf-8", "surrogatepass"))
    return NAMES[digest % len(NAMES)]


def authorize(case: schemathesis.Case) -> str:
    """Send the case as its identity. ``garbage`` keeps whatever Authorization schemathesis made up."""
    who = identity_for(case)
    _WHO[id(case)] = who
    headers = dict(case.headers or {})
    generated = [k for k in headers if k.lower() == "authorization"]
    if who != "garbage" or not generated:
        for k in generated:
            del headers[k]
        if IDENTITIES[who] is not None:
            headers["Authorization"] = IDENTITIES[who]
    case.headers = headers
    return who


# --- the schema -----------------------------------------------------------------------------------

# No tracebacks from the server thread: Python 3.11 formats one with ast.parse, whose recursion counter
# is shared by all threads, so a 500's traceback logged while pytest formats the failure (ast.parse
# again) crashes pytest with "SystemError: AST constructor recursion depth mismatch". The failing
# request is in every failure message; replay it against `make serve` to see the server's traceback.
QUIET = {"log_level": "critical"}
SETTINGS = ThreadServer(Path("unused.db"), **QUIET).settings()  # the test server's settings (nothing opened)
DOC: dict[str, Any] = create_app(SETTINGS).api.openapi()


def _config(**generation: Any) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "request-timeout": REQUEST_TIMEOUT_S,
            "max-stream-events": 1,
            "output": {"sanitization": {"enabled": False}},  # show the exact request to reproduce
            "generation": {"database": "none", **generation},
        }
    )


schema = schemathesis.openapi.from_dict(DOC, config=_config(deterministic=True))
schema_slow = schemathesis.openapi.from_dict(DOC, config=_config())


def _header(response: schemathesis.Response, name: str) -> str:
    for k, values in response.headers.items():
        if k.lower() == name:
            return values[0] if values else ""
    return ""


def _request_line(case: schemathesis.Case, response: schemathesis.Response) -> str:
    req = response.request
    body = req.body.decode("utf-8", "replace") if isinstance(req.body, bytes) else req.body
    return f"{req.method} {req.url} as {_WHO.get(id(case), '?')}, body {body!r}"


def no_server_error(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """No 5xx at all, except a 503 the operation documents, answered with a retry-later code."""
    status = response.status_code
    if status < 500:
        return
    code = None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        code = json.loads(response.content)["error"]["code"]
    documented = str(status) in case.operation.responses.status_codes
    assert status == 503 and documented and code in RETRY_LATER, (
        f"{status} ({code}) {response.content[:300]!r} for {_request_line(case, response)}"
    )


def error_body_follows_contract(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every error is ``{"error": {"code": str, "message": str}}`` (the API's description says so)."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return
    assert _header(response, "content-type").startswith("application/json"), _request_line(case, response)
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"].get("code"), str) and isinstance(body["error"].get("message"), str), body


def stream_greets_first(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A 200 event stream sends ``connection.established`` (JSON) first, within the request timeout."""
    if response.status_code != 200 or not _header(response, "content-type").startswith("text/event-stream"):
        return
    messages = SSEParser().feed(response.content.decode("utf-8"))
    assert messages, f"no event within {REQUEST_TIMEOUT_S}s: {_request_line(case, response)}"
    assert messages[0].event == "connection.established", messages[0]
    hello = messages[0].json()
    assert {"connection_id", "server_time", "instance", "heartbeat_interval_s", "resumed_from"} <= set(hello)


CHECKS: list[Callable[..., Any]] = [
    no_server_error,
    error_body_follows_contract,
    stream_greets_first,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
]


# --- the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """One server for the module, with a few events stored so polls, replays and resends find some."""
    server = ThreadServer(tmp_path_factory.mktemp("fuzz") / "events.db", **QUIET).start()
    try:
        for body in (
            {"type": "custom.fuzz", "user_id": "fz-user", "data": {"n": 1}},
            {"type": "custom.fuzz", "user_id": "fz-user", "session_id": "fz-session", "data": {"n": 2}},
            {
                "type": "system.notification",
                "broadcast": True,
                "data": {"level": "info", "title": "t", "message": "m"},
            },
            {
                "type": "task.progress-updated",
                "user_id": "fz-user",
                "data": {"task_id": "t1", "progress": 50},
            },
        ):
            server.publish_ok(body)
        yield server
    finally:
        server.stop()


def test_openapi_served_document_is_the_one_fuzzed(api: ThreadServer) -> None:
    """The real server serves the document the fuzz tests were generated from, every operation of it."""
    served = httpx.get(api.url + "/openapi.json", timeout=REQUEST_TIMEOUT_S).json()
    assert served == DOC
    fuzzed = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    documented = {(m.upper(), p) for p, ops in DOC["paths"].items() for m in ops}
    assert fuzzed == documented and len(fuzzed) >= 16


@settings(max_examples=FAST_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@schema.parametrize()
def test_api_fuzz_no_server_error_or_schema_violation(case: schemathesis.Case, api: ThreadServer) -> None:
    """Every operation, every identity: no 5xx, nothing off its documented schema, no hang."""
    authorize(case)
    case.call_and_validate(base_url=api.url, checks=CHECKS)


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=SLOW_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@schema_slow.parametrize()
def test_api_fuzz_no_server_error_or_schema_violation_long(
    case: schemathesis.Case, api: ThreadServer
) -> None:
    """The same, with many more random cases per operation (make fuzz)."""
    authorize(case)
    case.call_and_validate(base_url=api.url, checks=CHECKS)


# --- the stream over a raw socket -------------------------------------------------------------------

_ANY = st.characters(codec=None, exclude_categories=())
_SPECIAL = ["", " ", "\n", "\r\n", "\x00", "\ud800", "0", "1", "-1", "99999999999999999999", "L1", "*", "a,b"]
# Mostly plausible values (so many requests reach the 200 and the replay), some wild ones.
_PLAUSIBLE = ["fz-session", "task.*", "custom.*,system.*", "custom.fuzz", "0", "1", "2", "3", ""]
query_values = st.sampled_from(_PLAUSIBLE) | st.sampled_from(_SPECIAL) | st.text(_ANY, max_size=30)
# Header values as a raw socket can send them: visible ASCII, space, tab and obs-text, no CR/LF/NUL.
header_values = st.sampled_from(["0", "1", "2", "-1", "L1", "99999999999999999999", " 1", "\t"]) | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)
_QUERY_KEYS = ["session_id", "types", "types", "last_event_id", "last_event_id", "x", "ticket", "token"]
stream_requests = st.fixed_dictionaries(
    {
        "who": st.sampled_from([*NAMES, "ticket"]),
        "query": st.dictionaries(st.sampled_from(_QUERY_KEYS), query_values, max_size=3),
        "headers": st.fixed_dictionaries(
            {},
            optional={
                "Last-Event-ID": header_values,
                "Origin": st.sampled_from(["http://evil.example", "null"]) | header_values,
                "Accept": st.sampled_from(["*/*", "application/json", "text/event-stream"]),
                "User-Agent": header_values,
            },
        ),
    }
)


def _check_stream_request(api: ThreadServer, request: dict[str, Any]) -> None:
    query = dict(request["query"])
    headers = dict(request["headers"])
    token = IDENTITIES.get(request["who"])
    if request["who"] == "ticket":  # a user of its own: the fuzzing above may use up fz-user's tickets
        r = httpx.post(api.url + "/api/v1/events/tickets", headers={"Authorization": TICKET_USER})
        assert r.status_code == 200, r.text
        query["ticket"] = r.json()["ticket"]
    elif token is not None:
        headers["Authorization"] = token
    qs = "&".join(
        f"{urllib.parse.quote(k)}={urllib.parse.quote(v, safe='', errors='surrogatepass')}"
        for k, v in query.items()
    )
    path = STREAM + ("?" + qs if qs else "")
    repro = f"GET {path} headers={headers!r}"
    with RawStream(api.port, path, headers, timeout=REQUEST_TIMEOUT_S) as stream:
        event(f"{request['who']}: {stream.status}")
        assert stream.status < 500, f"{stream.status} {stream.error_body} for {repro}"
        if stream.status == 200:
            assert stream.headers["content-type"].startswith("text/event-stream"), repro
            [hello] = stream.read_count(1, event="connection.established")
            assert hello.json()["connection_id"], repro
            return
        error = stream.error_body
        assert isinstance(error, dict) and set(error) == {"error"}, f"{error} for {repro}"
        assert isinstance(error["error"]["code"], str) and isinstance(error["error"]["message"], str), repro
        unauthenticated = request["who"] in ("anonymous", "garbage", "expired") and not query.get("ticket")
        if unauthenticated and "token" not in query:
            assert stream.status == 401, f"{stream.status} {error} for {repro}"


@settings(
    max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(request=stream_requests)
@example(request={"who": "ticket", "query": {}, "headers": {"Last-Event-ID": "0"}})
@example(
    request={"who": "session-user", "query": {"session_id": "fz-session", "types": "custom.*"}, "headers": {}}
)
@example(
    request={"who": "user", "query": {"last_event_id": "0"}, "headers": {"Origin": "http://evil.example"}}
)
def test_stream_fuzz_raw_socket_no_server_error_or_hang(api: ThreadServer, request: dict[str, Any]) -> None:
    """Any query and headers on the stream: a clean 4xx or a 200 that greets at once; never 5xx or silence."""
    _check_stream_request(api, request)


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(request=stream_requests)
def test_stream_fuzz_raw_socket_no_server_error_or_hang_long(
    api: ThreadServer, request: dict[str, Any]
) -> None:
    """The same, with many more random requests (make fuzz)."""
    _check_stream_request(api, request)


# --- pinned requests: known defects, replayed exactly -----------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@dataclass(frozen=True)
class Pinned:
    """One exact request and the statuses a correct server may answer it with."""

    method: str
    path: str
    who: str
    ok: tuple[int, ...]
    content: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)


_GLOBS = ",".join(f"custom.g{i}.*" for i in range(1200))
PINNED = [
    pytest.param(Pinned("POST", "/api/v1/events", "publisher", (422,), b'{"type": "custom.x\\n", "user_id": "u"}'), id="type-with-trailing-newline"),
    pytest.param(Pinned("POST", "/api/v1/events", "publisher", (422,), b'{"type": "custom.x", "user_id": "\\ud800"}'), id="user-id-lone-surrogate"),
    pytest.param(Pinned("POST", "/api/v1/events", "publisher", (422,), b'{"type": "custom.x", "user_id": "u", "session_id": "\\udfff"}'), id="session-id-lone-surrogate"),
    pytest.param(Pinned("POST", "/api/v1/events", "publisher", (422,), b'{"type": "custom.x", "user_id": "u\\n"}'), id="user-id-trailing-newline"),
    *(
        pytest.param(
            Pinned("POST", "/api/v1/events", "publisher", (202, 400, 422), f'{{"type": "custom.x", "user_id": "u", "data": {{"a": {_nested(d)}}}}}'.encode()),
            id=f"data-nested-{d}",
        )
        for d in (900, 950, 965, 1000, 100_000)
    ),
    pytest.param(Pinned("POST", "/api/v1/admin/events/purge", "admin", (200, 422), b'{"older_than_days": 1e300}'), id="purge-1e300-days"),
    pytest.param(Pinned("POST", "/api/v1/admin/events/purge", "admin", (200, 422), b'{"older_than_days": 1e6, "dry_run": true}'), id="purge-1e6-days"),
    pytest.param(Pinned("POST", "/api/v1/admin/events/purge", "admin", (413,), b'{"older_than_days": 1, "pad": "' + b"x" * (1024 * 1024 + 1) + b'"}'), id="admin-body-over-1mib"),
    pytest.param(Pinned("PUT", "/api/v1/admin/push-mode", "admin", (413,), b'{"mode": "sse", "pad": "' + b"x" * (1024 * 1024 + 1) + b'"}'), id="push-mode-body-over-1mib"),
    pytest.param(Pinned("POST", "/api/v1/events", "publisher", (413,), b'{"type": "custom.x", "user_id": "u", "data": {"pad": "' + b"x" * (1024 * 1024 + 1) + b'"}}'), id="publish-body-over-1mib"),
    pytest.param(Pinned("GET", "/api/v1/events", "user", (400, 422), params={"after": "0", "types": _GLOBS}), id="poll-1200-globs"),
    pytest.param(Pinned("GET", STREAM, "user", (400, 422), params={"types": _GLOBS}), id="stream-1200-globs"),
    pytest.param(Pinned("GET", STREAM, "user", (400,), params={"session_id": "s\n"}), id="stream-session-trailing-newline"),
    pytest.param(Pinned("GET", "/api/v1/admin/events/failed", "admin", (200, 400, 422), params={"event_id": str(2**63)}), id="failed-event-id-2-63"),
    pytest.param(Pinned("GET", "/api/v1/admin/events/failed", "admin", (200, 400, 422), params={"event_id": str(-(2**63) - 1)}), id="failed-event-id-below-int64"),
    pytest.param(Pinned("POST", "/api/v1/admin/events/resend", "admin", (200, 422), b'{"event_ids": [9223372036854775808]}'), id="resend-event-id-2-63"),
]  # fmt: skip


def send(server: ThreadServer, pinned: Pinned) -> tuple[int, Any]:
    """Send ``pinned``; the status and the decoded JSON body (the stream: the error, or the greeting)."""
    headers = {"Authorization": IDENTITIES[pinned.who] or ""}
    if pinned.path == STREAM:
        query = urllib.parse.urlencode(pinned.params)
        with RawStream(server.port, f"{STREAM}?{query}", headers, timeout=REQUEST_TIMEOUT_S) as stream:
            if stream.status != 200:
                return stream.status, stream.error_body
            return 200, stream.read_count(1, event="connection.established")[0].json()
    if pinned.content is not None:
        headers["Content-Type"] = "application/json"
    r = httpx.request(
        pinned.method,
        server.url + pinned.path,
        content=pinned.content,
        params=pinned.params,
        headers=headers,
        timeout=REQUEST_TIMEOUT_S,
    )
    return r.status_code, r.json()


@pytest.mark.parametrize("pinned", PINNED)
def test_api_pinned_requests_are_answered_cleanly(api: ThreadServer, pinned: Pinned) -> None:
    """Requests that once broke the service get their documented answer, never a 5xx."""
    status, body = send(api, pinned)
    assert status in pinned.ok, f"{status} {json.dumps(body)[:300]}"
    if status >= 400:
        assert set(body) == {"error"}, body


@pytest.mark.parametrize("ttl_s", [10**14, 2**63, 10**30])
def test_api_ban_with_huge_ttl_keeps_bans_listable(make_server: MakeServer, ttl_s: int) -> None:
    """A ban with an absurd ttl_s is refused (422) or stored; either way GET /api/v1/admin/bans still works."""
    server = make_server(**QUIET)  # its own server: a stored bad ban would spoil the others' ban listings
    admin = {"Authorization": IDENTITIES["admin"] or ""}
    r = httpx.post(
        server.url + "/api/v1/admin/bans", json={"user_id": "fz-banned", "ttl_s": ttl_s}, headers=admin
    )
    assert r.status_code in (201, 422), r.text
    listed = httpx.get(server.url + "/api/v1/admin/bans", headers=admin)
    assert listed.status_code == 200, listed.text
    assert isinstance(listed.json()["bans"], list)


# --- what the document says about requests ----------------------------------------------------------


def _operation(method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = DOC["paths"][path][method.lower()]
    return op


def _body_schema(method: str, path: str) -> dict[str, Any]:
    body: dict[str, Any] = _operation(method, path)["requestBody"]
    assert body.get("required") is True
    schema_: dict[str, Any] = body["content"]["application/json"]["schema"]
    return {**schema_, "components": DOC.get("components", {})}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/events"),
        ("PUT", "/api/v1/admin/push-mode"),
        ("POST", "/api/v1/admin/events/resend"),
        ("POST", "/api/v1/admin/events/purge"),
        ("POST", "/api/v1/admin/bans"),
    ],
)
def test_openapi_documents_every_request_body(method: str, path: str) -> None:
    """Every operation that reads a body documents it as required JSON with a schema."""
    assert _body_schema(method, path)


ACCEPTED_PUBLISH_BODIES: list[Any] = [
    {"type": "custom.a", "user_id": "u"},
    {
        "type": "custom.a",
        "user_id": "u",
        "session_id": "s",
        "data": {"x": [1, {"y": None}]},
        "persist": False,
    },
    {
        "type": "content.novel-created",
        "broadcast": True,
        "data": {"novel_id": "n", "title": "t"},
        "sensitive": False,
    },
    {"events": [{"type": "custom.a", "user_id": "u"}, {"type": "custom.b", "broadcast": True}]},
    {"type": "task.progress-updated", "task_id": "t", "data": {"task_id": "t", "progress": 5}},
]
# Bodies the validator refuses every time, for a reason a JSON schema can say.
REFUSED_PUBLISH_BODIES: list[Any] = [
    {"type": "custom.a", "user_id": "u", "group": "g"},  # unknown field
    {"type": "nodots", "user_id": "u"},  # not a dotted type name
    {"type": "custom.a", "user_id": ""},  # empty id
    {"type": "custom.a", "user_id": "u" * 201},  # id over 200 characters
    {"events": []},  # an empty batch
    {"events": [{"type": "custom.a", "user_id": "u"}] * 1001},  # over max_batch_events
]


def _validator_accepts(body: Any) -> bool:
    try:
        parse_body(json.dumps(body).encode(), SETTINGS.max_event_bytes, SETTINGS.max_batch_events)
    except ScribeEventsError:
        return False
    return True


def test_openapi_publish_body_admits_what_the_validator_accepts() -> None:
    """The documented publish body (openapi_extra) admits every body the validator accepts."""
    validator = jsonschema_rs.validator_for(_body_schema("POST", "/api/v1/events"))
    for body in ACCEPTED_PUBLISH_BODIES:
        assert _validator_accepts(body), body
        assert validator.is_valid(body), body
    # Every documented field is one the validator knows (given a value of its documented type).
    samples = {"string": "x", "boolean": False, "object": {}}
    event_schema = _body_schema("POST", "/api/v1/events")["oneOf"][0]
    for name, prop in event_schema["properties"].items():
        body = {"type": "custom.a", "user_id": "u", name: samples[prop["type"]]}
        if name == "type":
            continue
        try:
            parse_publish(body, max_event_bytes=SETTINGS.max_event_bytes)
        except ValidationFailed as exc:
            assert not (exc.field == name and exc.code == "validation_error"), f"{name}: {exc.message}"


@pytest.mark.parametrize("body", REFUSED_PUBLISH_BODIES, ids=lambda b: json.dumps(b)[:60])
def test_openapi_publish_body_refuses_what_the_validator_refuses(body: Any) -> None:
    """What the validator always refuses, the documented schema refuses too (so clients learn it)."""
    assert not _validator_accepts(body)
    assert not jsonschema_rs.validator_for(_body_schema("POST", "/api/v1/events")).is_valid(body)


# Statuses the API really answers, each with a request that produces it.
REAL_STATUSES = [
    pytest.param(Pinned("POST", "/api/v1/events", "publisher", (400,), b"{"), id="publish-invalid-json-400"),
    pytest.param(Pinned("POST", "/api/v1/admin/events/purge", "admin", (400,), b"{"), id="admin-invalid-json-400"),
    pytest.param(Pinned("GET", "/api/v1/events", "user", (400,), params={"after": "x"}), id="poll-invalid-after-400"),
    pytest.param(Pinned("GET", "/api/v1/events", "session-user", (403,), params={"session_id": "other"}), id="poll-session-mismatch-403"),
    pytest.param(Pinned("POST", "/api/v1/admin/events/purge", "admin", (400, 413), b'{"older_than_days": 1, "pad": "' + b"x" * (1024 * 1024 + 1) + b'"}'), id="admin-too-large-413"),
    pytest.param(Pinned("GET", STREAM, "user", (400,), params={"token": "x"}), id="stream-token-in-query-400"),
    pytest.param(Pinned("GET", STREAM, "session-user", (403,), params={"session_id": "other"}), id="stream-session-mismatch-403"),
]  # fmt: skip


@pytest.mark.parametrize("pinned", REAL_STATUSES)
def test_openapi_documents_the_statuses_the_api_answers(api: ThreadServer, pinned: Pinned) -> None:
    """A status the API really answers is among the operation's documented responses."""
    status, _ = send(api, pinned)
    assert status in pinned.ok, f"the request no longer produces {pinned.ok}: got {status}"
    documented = sorted(_operation(pinned.method, pinned.path)["responses"])
    assert str(status) in documented, (
        f"{pinned.method} {pinned.path} answers {status}; documented: {documented}"
    )


def test_openapi_stream_documents_its_authorization() -> None:
    """The stream says how to authenticate: an Authorization header parameter or a security requirement."""
    op = _operation("GET", STREAM)
    names = {p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"}
    assert "authorization" in names or op.get("security") or DOC.get("security")
