"""Task routes (R3.7): who may follow a task, and where it stands."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel

from scribe_events.auth import ROLE_ADMIN, ROLE_PUBLISHER, Principal
from scribe_events.events import rfc3339
from scribe_events.exceptions import Forbidden, NotFound, ValidationFailed
from scribe_events.ids import check_text_id
from scribe_events.store.tasks import TaskState
from scribe_events.vocabulary import MAX_TASK_READERS
from scribe_events.web.deps import Caller, UserId, errors, runtime_of

router = APIRouter(tags=["tasks"])

TaskId = Annotated[str, Path(min_length=1, max_length=200)]


class GrantIn(BaseModel):
    user_id: UserId


def _out(task: TaskState) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "owner": task.owner,
        "readers": [u for u in task.readers if u != task.owner],
        "status": task.status,
        "progress": task.progress,
        "started_at": rfc3339(task.started_ms),
        "updated_at": rfc3339(task.updated_ms),
        "ended_at": rfc3339(task.ended_ms) if task.ended_ms else None,
    }


def _may_manage(principal: Principal, task: TaskState) -> bool:
    return principal.user_id == task.owner or bool(principal.roles & {ROLE_PUBLISHER, ROLE_ADMIN})


@router.post("/api/v1/tasks/{task_id}/grants", responses=errors(404))
async def grant(request: Request, principal: Caller, task_id: TaskId, body: GrantIn) -> dict[str, Any]:
    """Let another user follow a task (its owner, a publisher or an admin): the reader gets the
    task's events published from now on, on the stream, on replay and on polling; nothing before."""
    store = runtime_of(request).store
    task_id = check_text_id(task_id, "task_id")
    user_id = check_text_id(body.user_id, "user_id")
    task = await store.task(task_id)
    if task is None:
        raise NotFound(f"no task {task_id!r} was started", code="unknown_task")
    if not _may_manage(principal, task):
        raise Forbidden("only the task's owner, a publisher or an admin may grant it", code="not_task_owner")
    if user_id not in task.readers and len(task.readers) > MAX_TASK_READERS:
        raise ValidationFailed(f"a task has at most {MAX_TASK_READERS} readers", field="user_id")
    granted = await store.grant(task_id, user_id)
    if granted is None:
        raise NotFound(f"no task {task_id!r} was started", code="unknown_task")
    return _out(granted)


@router.get("/api/v1/tasks/{task_id}", responses=errors(404))
async def get_task(request: Request, principal: Caller, task_id: TaskId) -> dict[str, Any]:
    """Where a task stands (its owner, its readers, a publisher or an admin)."""
    task = await runtime_of(request).store.task(check_text_id(task_id, "task_id"))
    if task is None or not (principal.user_id in task.readers or _may_manage(principal, task)):
        raise NotFound(f"no task {task_id!r} is visible to you", code="unknown_task")
    return _out(task)
