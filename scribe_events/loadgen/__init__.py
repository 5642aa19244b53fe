"""A load generator for SSE servers (``scribe-events bench s1|s2|s3|s4|publish``).

It mirrors the shared Go yardstick, ssebench (``shared/bench``): the same scenarios, templates,
counting and pass rule, so its figures can be set beside ssebench's. It speaks raw HTTP/1.1 on
asyncio protocols (uvloop when installed), and can spread the subscribers over worker processes.

    target.py     scribe-events' endpoints and minted tokens, or another server's templates
    http.py       URL and body templates, a keep-alive client for publishing
    receiver.py   a subscriber's read path (head, chunked, SSE frames) and the tally it keeps
    workers.py    subscribers on one loop; pools on this loop or in worker processes
    publisher.py  the publishing pool: an open-loop schedule, a flood, ordered lanes
    stats.py      latency histograms that merge across processes
    procstat.py   CPU and RSS from /proc; the process listening on a port
    common.py     the run's description, preflight, the verdict
    fanout.py     S1 broadcast, S2 targeted
    idle.py       S3 idle streams
    resume.py     S4 resume with Last-Event-ID
    throughput.py publish throughput
    summary.py    a result as a title and rows of text

Each scenario module has one coroutine of its name (``fanout.fanout(run, ...)``) that returns the
result as a JSON-ready dict with ``pass`` and ``fail_reasons``; :func:`run` runs one on a fresh loop.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from scribe_events.loadgen.common import Progress, Run
from scribe_events.loadgen.errors import BadInput, LoadgenError
from scribe_events.loadgen.procstat import raise_nofile
from scribe_events.loadgen.publisher import PublishSpec
from scribe_events.loadgen.receiver import READY_FRAME, READY_HEADERS, SubscriberSpec
from scribe_events.loadgen.workers import run_loop

__all__ = [
    "READY_FRAME",
    "READY_HEADERS",
    "BadInput",
    "LoadgenError",
    "Progress",
    "PublishSpec",
    "Run",
    "SubscriberSpec",
    "run",
]


def run(scenario: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run one scenario to its result on a fresh event loop (uvloop when installed)."""
    raise_nofile()
    result: dict[str, Any] = run_loop(lambda: scenario)
    return result
