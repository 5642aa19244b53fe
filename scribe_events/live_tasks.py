"""Between the broker and the hub: what makes task streams calm and trustworthy (R3.5, R3.6, R4.6).

Every instance receives every event from the broker in id order and passes it to its hub through
:meth:`LiveTasks.dispatch`, which
- **throttles** ``task.progress-updated``: per task and audience, one goes out at once, later ones
  within ``progress_throttle_s`` are held (a newer one replaces the held one) and the latest goes
  out when the window ends. A held update always goes out *before* its task's completion, failure
  or restart. Held updates go out without an ``id:`` line (newer ids may have gone out meanwhile);
  the store keeps the latest update of each task for replay;
- **coalesces** ``content.chapter-updated``: per novel and audience, one goes out at once, the
  rest within ``coalesce_window_s`` go out as one event with ``chapters`` (each chapter once, its
  latest summary) and ``coalesced`` (how many updates it stands for);
- lets everything else through untouched and in order (``system.error`` included: it is never
  held).

A loop sends ``task.progress-heartbeat`` to the readers of every running task that has been silent
for ``task_heartbeat_s``, with ``stalled: true`` once it is silent past ``task_stall_s``. Task state
lives in the store, so heartbeats go on across restarts and on every instance (each instance sends
them to its own connections).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from scribe_events.events import Delivery, Event, dumps, now_ms, rfc3339, sendable
from scribe_events.exceptions import ServiceUnavailable
from scribe_events.hub import Hub
from scribe_events.store import EventStore
from scribe_events.tasks import cancel, supervise
from scribe_events.vocabulary import CHAPTER_UPDATED, TASK_ENDED, TASK_HEARTBEAT, TASK_STARTED, TASK_UPDATED

log = logging.getLogger("scribe_events.live_tasks")

Key = tuple[Any, ...]
MAX_HELD = 100_000  # held updates and open windows; past it, updates go out unthrottled


def _key(d: Delivery, by: str | None) -> Key:
    # Not the readers: a grant mid-window must not open a second window for the same task.
    return (by, d.user_id, d.session_id, d.broadcast)


class _Window:
    __slots__ = ("held", "opened", "timer")

    def __init__(self, opened: float) -> None:
        self.opened = opened
        self.held: list[Delivery] = []
        self.timer: asyncio.TimerHandle | None = None


class LiveTasks:
    def __init__(
        self,
        hub: Hub,
        store: EventStore,
        *,
        throttle_s: float,
        coalesce_s: float,
        heartbeat_s: float,
        stall_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self.store = store
        self.throttle_s = throttle_s
        self.coalesce_s = coalesce_s
        self.widest_coalesce_s = coalesce_s
        self.heartbeat_s = heartbeat_s
        self.stall_s = stall_s
        self._clock = clock
        self._progress: dict[Key, _Window] = {}
        self._chapters: dict[Key, _Window] = {}
        self._task_keys: dict[str, set[Key]] = {}  # task id -> its keys in _progress
        self._beaten: dict[str, float] = {}  # task id -> when this instance last sent its heartbeat
        self._loop_task: asyncio.Task[None] | None = None
        self.throttled = 0  # progress updates replaced by a newer one before they went out
        self.coalesced = 0  # chapter updates folded into another event
        self.heartbeats = 0
        # Whether any task may be running (refreshed by every heartbeat pass, set by every start):
        # a stream that opens asks the store for its tasks' state only when one may be.
        self.any_running = True
        # When a chapter update was last held (see snapshot); at start-up, as if just now: one held
        # by a process that died may have gone out to no one.
        self._chapter_held_at = clock()
        self._starts = 0  # tasks started seen: a heartbeat pass that began before one keeps the flag

    # -- the broker's sink ---------------------------------------------------------------------------

    def dispatch(self, deliveries: Sequence[Delivery]) -> None:
        """Throttle and coalesce, then hand the batch to the hub, in order. Never raises."""
        try:
            out = self._shape(deliveries)
        except Exception:  # a bug here must not stop delivery: send the batch as it came
            log.exception("shaping a batch failed; sending it unthrottled")
            out = list(deliveries)
        self.hub.dispatch(out)

    def _shape(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        if self.throttle_s <= 0 and self.coalesce_s <= 0:
            if any(d.type == TASK_STARTED for d in deliveries):
                self._started()
            return list(deliveries)
        now = self._clock()
        out: list[Delivery] = []
        for d in deliveries:
            t = d.type
            held = False
            if t == TASK_UPDATED and d.task_id is not None and self.throttle_s > 0:
                held = self._hold(
                    self._progress, _key(d, d.task_id), d, now, self.throttle_s, self._let_progress
                )
            elif d.task_id is not None and (t in TASK_ENDED or t == TASK_STARTED):
                if t == TASK_STARTED:
                    self._started()
                for key in self._task_keys.pop(d.task_id, ()):  # the last value goes out first
                    out.extend(self._release(self._progress, key, self._progress_out))
            elif t == CHAPTER_UPDATED and d.novel_id is not None and self.coalesce_s > 0:
                held = self._hold(
                    self._chapters, _key(d, d.novel_id), d, now, self.coalesce_s, self._let_chapters
                )
                if held:
                    self._chapter_held_at = now
            if not held:
                out.append(d)
        return out

    def _started(self) -> None:
        self.any_running = True
        self._starts += 1

    def _hold(
        self,
        windows: dict[Key, _Window],
        key: Key,
        d: Delivery,
        now: float,
        width: float,
        let: Callable[[Key], None],
    ) -> bool:
        """True if ``d`` is held for its window; False if it goes out now (and opens a window)."""
        window = windows.get(key)
        if window is None or (now - window.opened >= width and not window.held):
            if len(windows) < MAX_HELD:
                windows[key] = _Window(now)
                if windows is self._progress:
                    self._task_keys.setdefault(key[0], set()).add(key)
            return False
        window.held.append(d)
        if window.timer is None:
            delay = max(0.0, window.opened + width - now)
            window.timer = asyncio.get_running_loop().call_later(delay, let, key)
        return True

    def _release(
        self, windows: dict[Key, _Window], key: Key, build: Callable[[list[Delivery]], list[Delivery]]
    ) -> list[Delivery]:
        window = windows.pop(key, None)
        if window is None:
            return []
        if window.timer is not None:
            window.timer.cancel()
        return build(window.held) if window.held else []

    def _let_progress(self, key: Key) -> None:
        self._let(self._progress, key, self._progress_out)

    def _let_chapters(self, key: Key) -> None:
        self._let(self._chapters, key, self._chapters_out)

    def _let(
        self, windows: dict[Key, _Window], key: Key, build: Callable[[list[Delivery]], list[Delivery]]
    ) -> None:
        """A window ended: send what it held, and open the next window from now."""
        try:
            window = windows.get(key)
            if window is None:
                return
            held, window.held, window.timer = window.held, [], None
            window.opened = self._clock()
            if held:
                self.hub.dispatch(build(held))
            else:
                self._forget(windows, key)
        except Exception:
            log.exception("sending held events failed")

    def _forget(self, windows: dict[Key, _Window], key: Key) -> None:
        windows.pop(key, None)
        if windows is self._progress:
            keys = self._task_keys.get(key[0])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._task_keys[key[0]]

    def sweep(self) -> None:
        """Forget windows that ended with nothing held (they no longer hold anything back)."""
        now = self._clock()
        for windows, width in ((self._progress, self.throttle_s), (self._chapters, self.coalesce_s)):
            for key in [k for k, w in windows.items() if not w.held and now - w.opened >= width]:
                self._forget(windows, key)

    def _progress_out(self, held: list[Delivery]) -> list[Delivery]:
        self.throttled += len(held) - 1
        return [held[-1].unordered()]

    def _chapters_out(self, held: list[Delivery]) -> list[Delivery]:
        if len(held) == 1:
            return [held[0].unordered()]
        self.coalesced += len(held) - 1
        return [coalesce_chapters(held)]

    # -- heartbeats ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = supervise(self._beat_forever, "scribe-task-heartbeats")

    def flush_all(self) -> None:
        """Send everything held now (at shutdown, before the streams end: nothing held is lost)."""
        for windows, build in ((self._progress, self._progress_out), (self._chapters, self._chapters_out)):
            out = []
            for key in list(windows):
                out.extend(self._release(windows, key, build))
            if out:
                self.hub.dispatch(out)
        self._task_keys.clear()

    async def close(self) -> None:
        for windows in (self._progress, self._chapters):
            for window in windows.values():
                if window.timer is not None:
                    window.timer.cancel()
            windows.clear()
        self._task_keys.clear()
        if self._loop_task is not None:
            await cancel(self._loop_task)
            self._loop_task = None

    async def _beat_forever(self) -> None:
        tick = min(5.0, self.heartbeat_s / 4)
        while True:
            self.sweep()
            try:
                await self.beat()
            except ServiceUnavailable as exc:
                log.warning("task heartbeats skipped: %s", exc)
            await asyncio.sleep(tick)

    async def beat(self) -> int:
        """Send the heartbeats that are due; returns how many."""
        wall = now_ms()
        starts = self._starts
        running = await self.store.silent_tasks(silent_since_ms=wall)
        if running or starts == self._starts:  # a start seen meanwhile may not be in the answer
            self.any_running = bool(running)
        silent = [t for t in running if wall - t.updated_ms >= self.heartbeat_s * 1000]
        now = self._clock()
        due = []
        for task in silent:
            last = self._beaten.get(task.task_id)
            if last is not None and now - last < self.heartbeat_s:
                continue
            self._beaten[task.task_id] = now
            event = Event(
                TASK_HEARTBEAT,
                dumps(
                    {
                        "task_id": task.task_id,
                        "progress": task.progress if task.progress is not None else 0,
                        "last_update_at": rfc3339(task.updated_ms),
                        "stalled": wall - task.updated_ms >= self.stall_s * 1000,
                    }
                ),
                task_id=task.task_id,
                persist=False,
                for_task=True,
                readers=task.readers,
            )
            due.append(event.delivery())
        if len(self._beaten) > len(silent):
            still = {t.task_id for t in silent}
            self._beaten = {k: v for k, v in self._beaten.items() if k in still}
        if due:
            self.heartbeats += len(due)
            self.hub.dispatch(due)
        return len(due)

    async def snapshot(
        self, user_id: str, session_id: str | None, through: int, *, resuming: bool
    ) -> list[Delivery]:
        """For a stream that opens: the newest progress of each running task the user may see (at
        or below ``through``: what comes after arrives in order), sent without ``id:`` lines. A
        resuming stream also gets the chapter updates at or below its resume point from the last
        coalescing window: one held for coalescing when the client left went out (if at all)
        after newer ids, so the client's Last-Event-ID may have passed it unseen."""
        found: list[Event] = []
        if self.any_running:
            found += await self.store.task_snapshot(user_id, through=through)
        # Only if one was held lately: every instance sees every event, so none held here means
        # none went out late anywhere, and a reconnect costs no query.
        # The widest window in force since start-up (adaptive load may have widened it: a chapter
        # held then went out that much later).
        self.widest_coalesce_s = max(self.widest_coalesce_s, self.coalesce_s)
        lookback = self.widest_coalesce_s + 1.0
        if resuming and self.coalesce_s > 0 and self._clock() - self._chapter_held_at <= lookback:
            since = now_ms() - int(lookback * 1000)
            found += await self.store.read_recent(
                user_id, session_id, type_=CHAPTER_UPDATED, since_ms=since, through=through
            )
        return [d.unordered() for d in sendable(found)]


def coalesce_chapters(held: list[Delivery]) -> Delivery:
    """One ``content.chapter-updated`` standing for several of one novel and audience: each
    chapter once (its latest summary, in order of first appearance), and how many it stands for."""
    chapters: dict[Any, dict[str, Any]] = {}
    last = held[-1]
    envelope = json.loads(last.envelope)
    for i, d in enumerate(held):
        data = json.loads(d.envelope).get("data", {})
        chapter = data.get("chapter_id")
        entry = chapters.setdefault(chapter if chapter is not None else f"#{i}", {"chapter_id": chapter})
        if "summary" in data:
            entry["summary"] = data["summary"]
    envelope["data"] = {
        "novel_id": last.novel_id,
        "chapters": list(chapters.values()),
        "coalesced": len(held),
    }
    return Delivery.build(
        last.id,
        None,
        last.type,
        last.user_id,
        last.session_id,
        last.broadcast,
        dumps(envelope),
        last.readers,
        last.task_id,
        last.novel_id,
    )
