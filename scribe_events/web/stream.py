"""``GET /api/v1/events/stream``: authenticate, register, greet, replay, then stay live until the end.

Answered as a plain ASGI handler (not through FastAPI's routing and middleware), because every
coroutine frame kept alive here is kept once per idle connection.

How a stream ends (each path removes the connection from the hub at once and logs why):
- the client goes away: uvicorn's ``connection_lost`` wakes ``receive()`` with ``http.disconnect``;
- the hub cuts it (slow client, write error): it aborts the transport, which is the same wake-up;
- shutdown: the hub writes the chunked body's end and closes the transport, same again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from typing import Any
from urllib.parse import parse_qs

from scribe_events import sse
from scribe_events.auth import Principal
from scribe_events.config import Settings
from scribe_events.events import TypeFilter, dumps, now_ms, rfc3339, sendable
from scribe_events.exceptions import BadRequest, ScribeEventsError, ServiceUnavailable, ShuttingDown
from scribe_events.hub import Connection, Hub, Sink
from scribe_events.runtime import Runtime
from scribe_events.web.errors import send_error
from scribe_events.web.protocol import PROTOCOL_EXTENSION, TRANSPORT_EXTENSION
from scribe_events.web.sinks import AsgiSink

log = logging.getLogger("scribe_events.stream")

STREAM_PATH = "/api/v1/events/stream"
_DRAIN_TIMEOUT_S = 10.0


def _headers(scope: dict[str, Any]) -> dict[bytes, bytes]:
    return {k: v for k, v in scope["headers"]}


def cors_headers(settings: Settings, origin: bytes | None) -> list[tuple[bytes, bytes]]:
    if origin is None:
        return []
    allowed = settings.cors_origins
    text = origin.decode("latin-1")
    if "*" in allowed or text in allowed:
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]
    return []


async def handle(runtime: Runtime, scope: dict[str, Any], receive: Any, send: Any) -> None:
    # This frame lives as long as the stream: it keeps only what it needs (see _open).
    conn = await _open(runtime, scope, send)
    if conn is None:
        return

    def leave() -> None:
        runtime.hub.remove(conn, "client_closed")

    protocol = scope.get("extensions", {}).get(PROTOCOL_EXTENSION)
    if protocol is not None and not isinstance(conn.sink, AsgiSink):
        # Written straight to the transport from here on: this task ends, the stream goes on.
        detached = protocol.detach(scope, leave)
        if detached == "gone":
            leave()
        if detached != "queued":
            return
        # A request pipelined behind the stream holds uvicorn's cycle, and uvicorn tells only that
        # cycle of a disconnect: this task waits for the socket's close itself, not for receive().
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def lost() -> None:
            if not gone.done():
                gone.set_result(None)

        protocol.on_lost = lost
        try:
            await gone
        finally:
            leave()
        return
    try:
        if isinstance(conn.sink, AsgiSink):
            await conn.sink.wait_closed(receive)
        else:
            while (await receive())["type"] != "http.disconnect":
                pass
    finally:
        leave()


async def _open(runtime: Runtime, scope: dict[str, Any], send: Any) -> Connection | None:
    """Accept or refuse; greet; replay. Returns the live connection, or None if it is already over."""
    headers = _headers(scope)
    cors = cors_headers(runtime.settings, headers.get(b"origin"))
    try:
        principal, conn_args, plan, last_id = await _accept(runtime, scope, headers)
        if runtime.hub.closing:  # shutdown began while the request was being checked
            raise ShuttingDown("the server is shutting down")
        # Checked last, after every await, so concurrent opens cannot all slip under the caps.
        runtime.admission.stream_room(principal, _ip(scope))
    except ScribeEventsError as exc:
        runtime.requests.refused(exc)
        runtime.requests.responses[exc.status] += 1
        await send_error(send, exc, cors)
        return None
    runtime.requests.responses[200] += 1

    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *cors,
            ],
        }
    )
    extensions = scope.get("extensions", {})
    transport = extensions.get(TRANSPORT_EXTENSION)
    sink: Sink = transport if transport is not None else AsgiSink(send)
    hub = runtime.hub
    # Live events are parked until the task state and the replay are sent (see _replay).
    conn = Connection(sink=sink, replaying=True, **conn_args)
    # When the socket drains, what waits for it goes out (see Hub.drain).
    protocol = extensions.get(PROTOCOL_EXTENSION)
    if protocol is not None:
        protocol.on_writable = functools.partial(hub.drain, conn)
        # Its pause is our backlog's start: past max_buffer the transport pauses, and resumes
        # (calling on_writable) once it has drained to a quarter of it.
        transport.set_write_buffer_limits(high=hub.max_buffer)
    elif isinstance(sink, AsgiSink):
        sink.on_writable = functools.partial(hub.drain, conn)
    hub.add(conn, from_seq=plan.after)
    hello = {
        "connection_id": conn.id,
        "server_time": rfc3339(now_ms()),
        "instance": runtime.settings.instance_id,
        "heartbeat_interval_s": runtime.settings.heartbeat_s,
        "resumed_from": last_id,
        # Where this stream starts: a client that has seen no event yet resumes from here.
        "last_event_id": str(conn.last_seq),
    }
    first = [
        sse.chunk(sse.frame(dumps(hello), event="connection.established", retry=runtime.settings.retry_ms))
    ]
    if plan.truncated is not None:
        first.append(sse.chunk(sse.frame(dumps(plan.truncated), event="replay.truncated")))
    try:
        if hub.write_direct(conn, first) and await _task_state(runtime, conn, plan.after):
            await _replay(runtime, conn, plan.after)
    except BaseException:
        hub.remove(conn, "error")
        raise
    return conn


async def _accept(
    runtime: Runtime, scope: dict[str, Any], headers: dict[bytes, bytes]
) -> tuple[Principal, dict[str, Any], Any, str | None]:
    """Check everything about the request before the 200 goes out."""
    if runtime.hub.closing:
        raise ShuttingDown("the server is shutting down")
    query = {
        k: v[0] for k, v in parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True).items()
    }
    if "token" in query or "access_token" in query:
        raise BadRequest("tokens are not accepted in the query string; use a ticket", code="token_in_query")
    client = scope.get("client")
    principal = await runtime.admission.caller(
        _text(headers.get(b"authorization")), _ip(scope), ticket=query.get("ticket")
    )
    await runtime.admission.limit("streams", principal, _ip(scope))
    session_id = runtime.admission.session(principal, query.get("session_id"))
    types = TypeFilter.parse(query.get("types"), max_globs=runtime.settings.max_type_globs)
    last_id = _text(headers.get(b"last-event-id"))
    if last_id is None:
        last_id = query.get("last_event_id")
    plan = await runtime.service.plan_resume(last_id)
    conn_args = {
        "id": secrets.token_hex(8),
        "user_id": principal.user_id,
        "session_id": session_id,
        "types": types,
        "remote": f"{client[0]}:{client[1]}" if client else "",
        "user_agent": (_text(headers.get(b"user-agent")) or "")[:500],
        "expires_at": principal.expires_at if runtime.settings.end_stream_at_token_expiry else None,
        "is_admin": principal.is_admin,
    }
    return principal, conn_args, plan, last_id


async def _task_state(runtime: Runtime, conn: Connection, after: int | None) -> bool:
    """The newest progress of each running task this stream may see, before anything else (R3);
    False if the connection is gone."""
    try:
        # At or below where the stream starts: what is newer comes in order, live or replayed.
        through = after if after is not None else conn.last_seq
        state = await runtime.live.snapshot(
            conn.user_id, conn.session_id, through, resuming=after is not None
        )
    except ServiceUnavailable as exc:
        log.warning("task state for %s skipped: %s", conn.id, exc)
        return conn.id in runtime.hub.connections
    if conn.types is not None:
        state = [d for d in state if conn.types(d.type)]
    return not state or runtime.hub.write_direct(conn, [d.chunk for d in state])


async def _replay(runtime: Runtime, conn: Connection, after: int | None) -> None:
    """Send every stored event after ``after`` that this stream may see, paced by the socket, then
    what arrived live meanwhile. (``after`` None: a fresh stream, only the latter.)"""
    hub, store, page = runtime.hub, runtime.store, runtime.settings.replay_page
    sent = after
    if after is not None:
        hub.replays += 1
    while sent is not None and conn.id in hub.connections:
        try:
            batch = await store.read(
                after=sent, user_id=conn.user_id, session_id=conn.session_id, limit=page, types=conn.types
            )
            purged = await store.purged_through()
        except ServiceUnavailable as exc:
            log.error("replay for %s failed: %s", conn.id, exc)
            hub.cut(conn, "store_unavailable")
            return
        if purged > sent:  # a purge ran since this replay was planned: say so, as at the start
            oldest = batch[0].wire_id if batch else None
            notice = {"last_event_id": str(sent), "oldest_available": oldest}
            if not hub.write_direct(conn, (sse.chunk(sse.frame(dumps(notice), event="replay.truncated")),)):
                return
        for delivery in sendable(batch, runtime.recorder.on_unsendable):
            if not hub.write_direct(conn, (delivery.chunk,), delivery.seq):
                return
            hub.replayed += 1
            if conn.buffer_size() > hub.max_buffer // 2 and not await _drain(hub, conn):
                return
        sent = batch.through
        if not batch.full:
            break
    # Then what arrived live meanwhile, paced the same way, until the stream is live.
    while conn.id in hub.connections and not hub.flush_pending(conn, page):
        if conn.buffer_size() > hub.max_buffer // 2 and not await _drain(hub, conn):
            return


async def _drain(hub: Hub, conn: Connection) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DRAIN_TIMEOUT_S
    while conn.buffer_size() > hub.max_buffer // 4:
        if loop.time() > deadline or conn.id not in hub.connections:
            hub.cut(conn, "slow_client")
            return False
        await asyncio.sleep(0.005)
    return True


def _ip(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
