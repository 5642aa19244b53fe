"""Running the service under uvicorn, with the streaming protocol and a graceful stop for streams."""

from __future__ import annotations

import copy
import gc
import socket
from typing import Any

import uvicorn

from scribe_events.auth import TokenVerifier
from scribe_events.config import Settings
from scribe_events.exceptions import ScribeEventsError
from scribe_events.store import make_store
from scribe_events.web import ScribeApp, create_app
from scribe_events.web.protocol import StreamingHttpToolsProtocol

GRACEFUL_TIMEOUT_S = 5


class Server(uvicorn.Server):
    """uvicorn's server, ending every open stream cleanly before it waits for connections to close.

    (uvicorn waits for in-flight responses on shutdown; a stream never finishes by itself.)
    """

    def __init__(self, config: uvicorn.Config, app: ScribeApp) -> None:
        super().__init__(config)
        self.scribe_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        runtime = self.scribe_app.runtime
        if runtime is not None:
            runtime.live.flush_all()  # what is held for throttling or coalescing goes out first
            # Readiness answers 503 and new streams are refused from here; the open ones are told to
            # come back spread over drain_window_s (elsewhere, behind a load balancer).
            await runtime.hub.close(spread_ms=int(runtime.settings.drain_window_s * 1000))
        await super().shutdown(sockets=sockets)


def tune_gc() -> None:
    """Fewer, cheaper collections: connection state is long-lived and the hot path makes few cycles."""
    gc.set_threshold(50_000, 20, 100)


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging set-up, with the service's own loggers on the same handler."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["scribe_events"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def build_server(settings: Settings, **overrides: Any) -> Server:
    """uvicorn with uvloop and the streaming protocol (``http=`` overrides it, e.g. to test the fallback).

    The streaming protocol enforces max_header_bytes, header_timeout_s and max_connections; on the
    h11 fallback uvicorn only bounds the head's size (answering 400 in plain text).
    """
    app = create_app(settings)
    options: dict[str, Any] = {"http": StreamingHttpToolsProtocol.configured(settings), **overrides}
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        ws="none",
        lifespan="on",
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        access_log=settings.access_log,
        timeout_graceful_shutdown=max(GRACEFUL_TIMEOUT_S, int(settings.drain_deadline_s)),
        proxy_headers=False,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        **options,
    )
    return Server(config, app)


async def preflight(settings: Settings) -> None:
    """Fail before uvicorn starts, with one clear error, when the configuration cannot work:
    no usable JWT key, a store that cannot be opened or whose schema is behind, an unknown broker."""
    try:
        TokenVerifier(settings, create_secret=True)
    except ValueError as exc:
        raise ScribeEventsError(str(exc), code="bad_configuration") from exc
    problem = settings.deployment_problem()
    if problem:
        raise ScribeEventsError(problem, code="bad_configuration")
    store = make_store(settings)
    await store.start()  # migrates on the embedded default; otherwise checks the schema
    await store.close()


def run(settings: Settings, *, fd: int | None = None) -> None:
    tune_gc()
    server = build_server(settings)
    # An inherited socket (``--fd``) is wrapped with its real family: uvicorn's own ``fd=`` takes it
    # for a Unix socket, so accepted TCP connections lose TCP_NODELAY (+40 ms on every answer).
    server.run(sockets=None if fd is None else [socket.socket(fileno=fd)])
