"""The app factory and the one lifespan that owns every resource.

Start-up builds, in order: store (migrated or checked), broker, publisher (which first relays what
was committed but never published), failure recorder, hub heartbeat, retention job; shutdown
closes them in reverse. Nothing connects at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from scribe_events import __version__
from scribe_events.adaptive import AdaptiveLoad
from scribe_events.admission import Admission
from scribe_events.auth import TokenVerifier
from scribe_events.broker import make_broker
from scribe_events.config import Settings
from scribe_events.constants import RedisKeys, redis_client
from scribe_events.control import Control
from scribe_events.exceptions import PayloadTooLarge, RequestTimeout, ScribeEventsError, ServiceUnavailable
from scribe_events.failures import FailureRecorder
from scribe_events.history import RedisHistory, StoreHistory
from scribe_events.hub import Hub
from scribe_events.live_tasks import LiveTasks
from scribe_events.metrics import RequestStats, make_registry
from scribe_events.monitor import Monitor, Notify
from scribe_events.proxies import TrustedProxies
from scribe_events.publisher import Publisher
from scribe_events.ratelimit import RateLimits
from scribe_events.registry import LocalRegistry, RedisRegistry, Registry
from scribe_events.retention import RetentionJob
from scribe_events.runtime import Runtime
from scribe_events.service import EventService
from scribe_events.state import MemoryState, RedisState, SharedState
from scribe_events.store import make_store
from scribe_events.vocabulary import parse_publish
from scribe_events.web import errors, publish, routes, stream

log = logging.getLogger("scribe_events")


class ScribeApp:
    """The ASGI application: the stream and publishing are answered directly, the rest by FastAPI."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        self.requests = RequestStats()
        self.proxies = TrustedProxies(settings.trusted_proxies, settings.forwarded_header)
        self.metrics = make_registry(lambda: self.runtime)
        self.api = FastAPI(
            title="scribe-events",
            version=__version__,
            description="Real-time events for InfiniteScribe over Server-Sent Events. "
            'Errors are `{"error": {"code", "message"}}`.',
            lifespan=self._lifespan,
        )
        self.api.state.owner = self
        if settings.cors_origins:
            # The stream answers CORS itself (it bypasses this stack); preflights come through here.
            self.api.add_middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_credentials=True,
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            )
        errors.install(self.api)
        routes.install(self.api, settings)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self.proxies and (client := self.proxies.client(scope)) is not None:
                scope = {**scope, "client": client}  # what bans, caps and limits see
            if scope["path"] == stream.STREAM_PATH and scope["method"] == "GET" and self.runtime is not None:
                await stream.handle(self.runtime, scope, receive, send)  # counts its own answer
                return
            send = self._counted(send)
            try:
                receive = await self._buffered(scope, receive)
            except ScribeEventsError as exc:
                await errors.send_error(send, exc, stream.cors_headers(self.settings, _origin(scope)))
                return
            if (
                scope["path"] == publish.PUBLISH_PATH
                and scope["method"] == "POST"
                and self.runtime is not None
            ):
                message = await receive()
                if message["type"] == "http.request":  # else the client left: nobody to answer
                    await publish.handle(self.runtime, scope, message.get("body", b""), send)
                return
        await self.api(scope, receive, send)  # type: ignore[arg-type]

    def _counted(self, send: Any) -> Any:
        """``send``, counting the response's status (``scribe_events_http_responses_total``)."""
        responses = self.requests.responses

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                responses[message["status"]] += 1
            await send(message)

        return counted

    async def _buffered(self, scope: dict[str, Any], receive: Any) -> Any:
        """Read the whole request body first, bounded in size (413) and time (408), so no route can
        be held by a body that never ends or grows without limit; FastAPI then reads it from memory."""
        limit = self.settings.max_request_bytes
        declared = next((v for n, v in scope["headers"] if n == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
        if declared == b"0" or (declared is None and b"chunked" not in _header(scope, b"transfer-encoding")):
            return receive  # no body
        parts: list[bytes] = []
        seen = 0
        # One deadline for the whole body (a timer, not wait_for's task per message: a body that has
        # already arrived is then read without another turn of the loop).
        deadline = asyncio.get_running_loop().time() + self.settings.body_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return _replay([message])  # the client left: let the app see it
                    body = message.get("body", b"")
                    seen += len(body)
                    if seen > limit:
                        raise PayloadTooLarge(f"the request body is over {limit} bytes")
                    parts.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.settings.body_timeout_s:g} s"
            ) from None
        return _replay([{"type": "http.request", "body": b"".join(parts), "more_body": False}], receive)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        settings = self.settings
        verifier = TokenVerifier(settings, create_secret=True)
        problem = settings.deployment_problem()
        if problem:
            raise ScribeEventsError(problem, code="bad_configuration")
        async with contextlib.AsyncExitStack() as stack:
            store = make_store(settings)
            await store.start()
            stack.push_async_callback(store.close)
            head = await store.head()
            hub = Hub(
                instance=settings.instance_id,
                heartbeat_s=settings.heartbeat_s,
                max_buffer=settings.max_connection_buffer,
                max_queue=settings.max_connection_queue,
            )
            hub.last_seq = head  # a fresh stream starts from now
            recorder = FailureRecorder(store, hub, max_per_user=settings.max_failed_per_user)
            recorder.start()
            stack.push_async_callback(recorder.close)
            state, registry, redis = self._shared(settings, hub, stack)
            broker = make_broker(settings, store, last_seq=head, redis=redis, origin=await store.identity())
            broker.on_unsendable = recorder.on_unsendable
            control = Control(settings, state, broker, hub)
            try:
                await control.start()
            except ServiceUnavailable as exc:
                log.error("could not load push mode and bans: %s (using defaults)", exc)
            live = LiveTasks(
                hub,
                store,
                throttle_s=settings.progress_throttle_s,
                coalesce_s=settings.coalesce_window_s,
                heartbeat_s=settings.task_heartbeat_s,
                stall_s=settings.task_stall_s,
            )
            stack.push_async_callback(live.close)
            await broker.start(live.dispatch)
            stack.push_async_callback(broker.close)
            publisher = Publisher(
                store,
                broker,
                queue_max=settings.publish_queue,
                queue_bytes=settings.publish_queue_bytes,
                batch_max=settings.publish_batch,
                faults=frozenset(settings.faults),
            )
            await publisher.start()  # relays what was committed but never published
            stack.push_async_callback(publisher.close)
            hub.start()
            stack.push_async_callback(hub.close)
            stack.callback(
                live.flush_all
            )  # runs first at shutdown: what is held goes out before the streams end
            live.start()
            registry.start()
            stack.push_async_callback(registry.close)
            limits = RateLimits(settings, redis)
            stack.push_async_callback(limits.close)
            retention = RetentionJob(store, settings)
            retention.start()
            stack.push_async_callback(retention.close)
            history = (
                RedisHistory(redis, RedisKeys(settings.redis_prefix), settings.history_keep_s)
                if redis is not None
                else StoreHistory(store, settings.history_keep_s)
            )
            adaptive = AdaptiveLoad(settings, hub, live, publisher)
            monitor = Monitor(settings, hub, self.metrics, history, _notifier(settings, publisher), adaptive)
            self.runtime = Runtime(
                settings=settings,
                verifier=verifier,
                admission=Admission(settings, verifier, state, control, hub, limits),
                state=state,
                control=control,
                registry=registry,
                store=store,
                broker=broker,
                hub=hub,
                publisher=publisher,
                recorder=recorder,
                live=live,
                service=EventService(settings, store, broker, publisher, state, control, registry),
                monitor=monitor,
                requests=self.requests,
                started_at=time.time(),
            )
            stack.callback(setattr, self, "runtime", None)
            monitor.start()
            stack.push_async_callback(monitor.close)
            if settings.gc_freeze:
                # Long-lived start-up objects leave the collector's view, so full collections stay short.
                gc.collect()
                gc.freeze()
            log.info(
                "scribe-events ready instance=%s store=%s broker=%s",
                settings.instance_id,
                store.describe(),
                broker.name,
            )
            yield

    @staticmethod
    def _shared(
        settings: Settings, hub: Hub, stack: contextlib.AsyncExitStack
    ) -> tuple[SharedState, Registry, aioredis.Redis | None]:
        """Tickets, push mode, bans and the registry: in Redis when configured, else in this process.
        Also the instance's one Redis command pool (None without Redis), which the broker shares."""
        if not settings.redis_url:
            return MemoryState(), LocalRegistry(hub), None
        client = redis_client(settings.redis_url, settings.redis_max_connections)
        stack.push_async_callback(client.aclose)
        keys = RedisKeys(settings.redis_prefix)
        registry = RedisRegistry(
            client, keys, hub, ttl_s=1.5 * settings.heartbeat_s, refresh_s=settings.heartbeat_s
        )
        return RedisState(client, keys), registry, client


def _notifier(settings: Settings, publisher: Publisher) -> Notify:
    """Tell the users in alert_notify_users (a stored system.notification, so none is missed)."""

    async def notify(title: str, message: str) -> None:
        data = {"level": "warning", "title": title, "message": message}
        events = [
            parse_publish(
                {"type": "system.notification", "user_id": user, "data": data},
                max_event_bytes=settings.max_event_bytes,
            )
            for user in settings.alert_notify_users
        ]
        await publisher.submit(events)

    return notify


def _origin(scope: dict[str, Any]) -> bytes | None:
    return next((v for n, v in scope["headers"] if n == b"origin"), None)


def _header(scope: dict[str, Any], name: bytes) -> bytes:
    return b",".join(v.lower() for n, v in scope["headers"] if n == name)


def _replay(messages: list[dict[str, Any]], then: Any = None) -> Any:
    """An ASGI ``receive`` that gives ``messages``, then defers to ``then`` (e.g. for a disconnect)."""
    queue = list(messages)

    async def receive() -> Any:
        if queue:
            return queue.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


def create_app(settings: Settings | None = None) -> ScribeApp:
    """Build the ASGI app (``uvicorn --factory scribe_events.web:create_app`` works too)."""
    return ScribeApp(settings or Settings())
