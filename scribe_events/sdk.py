"""The publisher SDK: how the other InfiniteScribe services send events (``POST /api/v1/events``).

    async with EventPublisher("http://127.0.0.1:8000", token=service_token) as events:
        await events.task_started("t1", owner="alice", title="Chapter 3", readers=["bob"])
        for p in range(101):
            await events.task_progress("t1", p, status_text=f"{p}%")  # a tight loop is fine
        await events.task_completed("t1", summary="3,200 words")

Every call carries an ``Idempotency-Key`` of its own, so a retry (on 429, 5xx or a connection
error, with exponential backoff and jitter, honouring ``Retry-After``) is stored and sent once.
``task_progress`` has its own throttle: per task, one update goes out at once and later ones within
``progress_interval_s`` are held (the newest replaces the held one) and sent when the window ends;
the task's completion or failure sends the held update first. So a worker can report progress as
often as it likes and the service sees at most one update a second per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from scribe_events.vocabulary import MAX_TASK_READERS

log = logging.getLogger("scribe_events.sdk")

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class PublishError(Exception):
    """The service refused the events (a 4xx other than 408/425/429), or retries ran out."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _Held:
    __slots__ = ("event", "opened", "sending", "timer")

    def __init__(self, opened: float) -> None:
        self.opened = opened
        self.event: dict[str, Any] | None = None
        self.timer: asyncio.Task[None] | None = None  # waiting for the window to end
        self.sending: asyncio.Future[str] | None = None  # the held update on its way (maybe retrying)


class EventPublisher:
    def __init__(
        self,
        base_url: str,
        *,
        token: str,
        timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        progress_interval_s: float = 1.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._client = client or httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s)
        self._own_client = client is None
        self._headers = {"Authorization": f"Bearer {token}"}
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.progress_interval_s = progress_interval_s
        self._progress: dict[str, _Held] = {}
        self.retries = 0  # attempts that were retried
        self.held = 0  # progress updates replaced by a newer one before they were sent

    async def __aenter__(self) -> EventPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Send every held progress update, then close the connection pool."""
        for task_id in list(self._progress):
            await self._flush(task_id)
        if self._own_client:
            await self._client.aclose()

    # -- sending ------------------------------------------------------------------------------------

    async def publish(self, events: Sequence[dict[str, Any]]) -> list[str]:
        """Publish events (the contract's publish body, one or many) in one request; their ids."""
        if not events:
            return []
        body: dict[str, Any] = {"events": list(events)} if len(events) > 1 else dict(events[0])
        key = uuid.uuid4().hex  # one per call: its retries are stored and sent once
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            try:
                r = await self._client.post(
                    "/api/v1/events", json=body, headers={**self._headers, "Idempotency-Key": key}
                )
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise PublishError(f"cannot reach the event service: {exc}") from exc
                wait = delay
            else:
                if r.status_code == 202:
                    return list(r.json()["ids"])
                error = _error_of(r)
                if r.status_code not in RETRY_STATUSES and not (
                    r.status_code == 409 and error[0] == "idempotency_busy"
                ):
                    raise PublishError(
                        f"{r.status_code} {error[0]}: {error[1]}", status=r.status_code, code=error[0]
                    )
                if attempt == self.max_retries:
                    raise PublishError(
                        f"gave up after {attempt + 1} tries: {r.status_code} {error[0]}",
                        status=r.status_code,
                        code=error[0],
                    )
                wait = max(delay, _retry_after(r))
            self.retries += 1
            await asyncio.sleep(min(self.max_backoff_s, wait) * (0.5 + random.random() / 2))
            delay = min(self.max_backoff_s, delay * 2)
        raise AssertionError("unreachable")

    async def send(self, event: dict[str, Any]) -> str:
        return (await self.publish([event]))[0]

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Collect events and publish them in one request at the end of the block:

        async with events.batch() as b:
            b.append(chapter_updated_event(...))
        """
        collected: list[dict[str, Any]] = []
        yield collected
        await self.publish(collected)

    # -- tasks (R3) ---------------------------------------------------------------------------------

    async def task_started(
        self,
        task_id: str,
        *,
        owner: str,
        title: str | None = None,
        estimated_duration_s: float | None = None,
        readers: Sequence[str] = (),
        **extra: Any,
    ) -> str:
        if len(readers) > MAX_TASK_READERS:
            raise ValueError(f"at most {MAX_TASK_READERS} readers")
        data = _data(
            task_id=task_id, owner=owner, title=title, estimated_duration_s=estimated_duration_s, **extra
        )
        if readers:
            data["readers"] = list(readers)
        await self._flush(task_id)
        return await self.send({"type": "task.progress-started", "task_id": task_id, "data": data})

    async def task_progress(
        self, task_id: str, progress: float, *, status_text: str | None = None, **extra: Any
    ) -> None:
        """Report progress (0-100). Throttled here: may be called as often as the worker likes."""
        event = {
            "type": "task.progress-updated",
            "task_id": task_id,
            "data": _data(task_id=task_id, progress=progress, status_text=status_text, **extra),
        }
        now = time.monotonic()
        held = self._progress.get(task_id)
        if held is None or (now - held.opened >= self.progress_interval_s and held.event is None):
            self._progress[task_id] = _Held(now)
            await self.send(event)
            return
        if held.event is not None:
            self.held += 1
        held.event = event
        if held.timer is None:
            held.timer = asyncio.create_task(
                self._later(task_id, held.opened + self.progress_interval_s - now)
            )

    async def _later(self, task_id: str, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
        held = self._progress.get(task_id)
        if held is None:
            return
        held.timer = None
        event, held.event = held.event, None
        held.opened = time.monotonic()
        if event is None:
            self._progress.pop(task_id, None)
            return
        held.sending = asyncio.ensure_future(self.send(event))
        try:
            await held.sending
        except PublishError as exc:
            log.warning("a held progress update of %s was not sent: %s", task_id, exc)
        finally:
            held.sending = None

    async def _flush(self, task_id: str) -> None:
        """Send the task's held progress update now, or wait for the one on its way: before the
        task's completion, failure or restart, never after it."""
        held = self._progress.pop(task_id, None)
        if held is None:
            return
        if held.timer is not None:
            held.timer.cancel()
        if held.sending is not None:
            with contextlib.suppress(PublishError):
                await asyncio.shield(held.sending)
        if held.event is not None:
            await self.send(held.event)

    async def task_completed(
        self,
        task_id: str,
        *,
        result: Any = None,
        summary: str | None = None,
        duration_s: float | None = None,
        **extra: Any,
    ) -> str:
        await self._flush(task_id)
        data = _data(task_id=task_id, result=result, summary=summary, duration_s=duration_s, **extra)
        return await self.send({"type": "task.progress-completed", "task_id": task_id, "data": data})

    async def task_failed(
        self,
        task_id: str,
        *,
        code: str,
        message: str,
        retryable: bool = False,
        after_s: float | None = None,
        suggestion: str | None = None,
        **extra: Any,
    ) -> str:
        await self._flush(task_id)
        retry = _data(retryable=retryable, after_s=after_s, suggestion=suggestion)
        data = _data(task_id=task_id, error={"code": code, "message": message}, retry=retry, **extra)
        return await self.send({"type": "task.progress-failed", "task_id": task_id, "data": data})

    async def grant(self, task_id: str, user_id: str) -> dict[str, Any]:
        """Let another user follow the task from now on."""
        r = await self._client.post(
            f"/api/v1/tasks/{task_id}/grants", json={"user_id": user_id}, headers=self._headers
        )
        if r.status_code != 200:
            code, message = _error_of(r)
            raise PublishError(f"{r.status_code} {code}: {message}", status=r.status_code, code=code)
        return dict(r.json())

    # -- content, workflow, system (R4) -------------------------------------------------------------

    async def novel_created(self, novel_id: str, title: str, **audience_and_extra: Any) -> str:
        audience, extra = _split(audience_and_extra)
        return await self.send(
            {
                "type": "content.novel-created",
                **audience,
                "data": _data(novel_id=novel_id, title=title, **extra),
            }
        )

    async def chapter_updated(
        self, novel_id: str, chapter_id: str, summary: str | None = None, **audience_and_extra: Any
    ) -> str:
        audience, extra = _split(audience_and_extra)
        data = _data(novel_id=novel_id, chapter_id=chapter_id, summary=summary, **extra)
        return await self.send({"type": "content.chapter-updated", **audience, "data": data})

    async def workflow_changed(
        self, workflow_id: str, old_status: str, new_status: str, **audience_and_extra: Any
    ) -> str:
        audience, extra = _split(audience_and_extra)
        data = _data(workflow_id=workflow_id, old_status=old_status, new_status=new_status, **extra)
        return await self.send({"type": "workflow.status-changed", **audience, "data": data})

    async def notify(
        self, level: str, title: str, message: str, *, action: Any = None, **audience_and_extra: Any
    ) -> str:
        audience, extra = _split(audience_and_extra)
        data = _data(level=level, title=title, message=message, action=action, **extra)
        return await self.send({"type": "system.notification", **audience, "data": data})

    async def system_error(self, level: str, impact: str, message: str, **audience_and_extra: Any) -> str:
        audience, extra = _split(audience_and_extra)
        data = _data(level=level, impact=impact, message=message, **extra)
        return await self.send({"type": "system.error", **audience, "data": data})


_AUDIENCE = ("user_id", "session_id", "broadcast", "task_id", "sensitive")


def _split(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    audience = {k: kw.pop(k) for k in _AUDIENCE if k in kw}
    if not any(k in audience for k in ("user_id", "broadcast", "task_id")):
        raise ValueError("name an audience: user_id=…, broadcast=True or task_id=…")
    return audience, kw


def _data(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _error_of(r: httpx.Response) -> tuple[str, str]:
    try:
        error = r.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "http_error", r.text[:200]


def _retry_after(r: httpx.Response) -> float:
    try:
        return float(r.headers.get("retry-after", 0))
    except ValueError:
        return 0.0
