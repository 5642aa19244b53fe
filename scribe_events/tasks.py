"""Background tasks: one way to start them, one way to keep them running, one way to stop them.

No task dies silently: a task that ends with an error is logged with its traceback and counted
(``CRASHES``, exported as ``scribe_events_background_task_crashes_total``); a supervised one is
restarted with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("scribe_events.tasks")

# Crashes per task name, since the process started.
CRASHES: Counter[str] = Counter()
MAX_BACKOFF_S = 30.0


def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_report)
    return task


def _report(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        CRASHES[task.get_name()] += 1
        log.error("background task %s crashed", task.get_name(), exc_info=exc)


def supervise(run: Callable[[], Coroutine[Any, Any, None]], name: str) -> asyncio.Task[None]:
    """Run ``run()`` in the background until it returns; restart it with backoff when it raises."""

    async def keep_running() -> None:
        delay = 0.1
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                CRASHES[name] += 1
                log.exception("background task %s crashed; restarting in %.1f s", name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    return spawn(keep_running(), name)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task and wait until it has ended. Its own error is not re-raised (the done
    callback of :func:`spawn` has logged and counted it)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # already reported by _report
        pass
