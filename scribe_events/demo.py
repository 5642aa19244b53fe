"""Simulated novel-writing work, published through the SDK: what ``scribe-events demo`` runs.

A novel is created; then chapters are drafted as tasks, a few at a time. Each task starts (owned
by the demo user, readable by a second user), reports progress in a tight loop (the SDK and the
service throttle it), updates its chapter, and completes; one task fails once with retry advice
and is started again. A workflow moves through its statuses and a notification closes the run.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from scribe_events.sdk import EventPublisher

TITLE = "The Glass Orchard"
CHAPTERS = ["The Frost Market", "A Ledger of Apples", "Night Grafting", "The Orchard Keeper's Debt"]

Report = Callable[[str], None]


@dataclass
class DemoPlan:
    user: str = "demo"
    reader: str = "demo-reader"
    tasks: int = 3
    step_s: float = 0.05  # the pause between two progress reports (a tight loop: the SDK throttles)
    seed: int | None = None


async def run_demo(events: EventPublisher, plan: DemoPlan, report: Report = print) -> dict[str, int]:
    rng = random.Random(plan.seed)
    run = f"{rng.randrange(16**6):06x}"
    novel = f"novel-{run}"
    workflow = f"wf-{run}"
    counts = {"tasks": 0, "failed": 0, "progress_calls": 0}
    await events.novel_created(novel, TITLE, user_id=plan.user, genre="literary fantasy")
    report(f"novel created: {TITLE} ({novel})")
    await events.workflow_changed(workflow, "draft", "writing", user_id=plan.user)
    failing = rng.randrange(plan.tasks)

    async def chapter(n: int) -> None:
        task = f"task-{run}-{n + 1}"
        name = CHAPTERS[n % len(CHAPTERS)]
        await events.task_started(
            task,
            owner=plan.user,
            readers=[plan.reader],
            title=f"Drafting chapter {n + 1}: {name}",
            estimated_duration_s=round(100 * plan.step_s, 1),
        )
        report(f"{task} started: chapter {n + 1}")
        attempt = 0
        while True:
            top = 100 if not (n == failing and attempt == 0) else rng.randrange(40, 70)
            for p in range(0, top + 1):
                await events.task_progress(task, p, status_text=_status(p))
                counts["progress_calls"] += 1
                await asyncio.sleep(plan.step_s * rng.uniform(0.5, 1.5))
            if top == 100:
                break
            counts["failed"] += 1
            await events.task_failed(
                task,
                code="model_overloaded",
                message="the language model is overloaded",
                retryable=True,
                after_s=2,
                suggestion="retrying automatically in 2 s",
            )
            report(f"{task} failed at {top}% (retryable); retrying")
            await asyncio.sleep(min(2.0, 20 * plan.step_s))
            attempt += 1
            await events.task_started(
                task, owner=plan.user, readers=[plan.reader], title=f"Retrying chapter {n + 1}"
            )
        await events.chapter_updated(
            novel, f"ch-{n + 1}", f"Chapter {n + 1}, '{name}', drafted", user_id=plan.user
        )
        await events.task_completed(
            task, summary=f"chapter {n + 1} drafted", duration_s=round(100 * plan.step_s, 1)
        )
        counts["tasks"] += 1
        report(f"{task} completed")

    await asyncio.gather(*(chapter(n) for n in range(plan.tasks)))
    await events.workflow_changed(workflow, "writing", "review", user_id=plan.user)
    await events.notify(
        "info",
        "Draft ready",
        f"{plan.tasks} chapters of {TITLE} are ready for review",
        action={"label": "Open the novel", "href": f"/novels/{novel}"},
        user_id=plan.user,
    )
    report("workflow moved to review; notification sent")
    return counts


def _status(p: int) -> str:
    if p < 20:
        return "outlining"
    if p < 80:
        return "drafting"
    return "polishing"
