"""Reaching the lifespan's :class:`~scribe_events.web.app.Runtime` from a request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from scribe_events.exceptions import StoreUnavailable

if TYPE_CHECKING:
    from scribe_events.web.app import Runtime


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime | None = request.app.state.owner.runtime
    if runtime is None:
        raise StoreUnavailable("the service is starting or stopping", code="not_ready")
    return runtime
