"""Where the subscribers run: :class:`Receivers` on one event loop, and the pools that put them on
this loop or split them over worker processes.

Both pools answer the same calls (connect, start, poll, finish) with the same plain values, so a
scenario does not know which it has. A worker process is started with the ``spawn`` context, runs
its own event loop (uvloop when importable) and talks to the parent over a pipe: one request, one
answer. Counters come back as bytes of arrays (histograms, counts per seq), never as lists of
Python numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from scribe_events.loadgen import procstat, stats
from scribe_events.loadgen.errors import LoadgenError
from scribe_events.loadgen.http import Endpoint, describe
from scribe_events.loadgen.receiver import (
    CLOSED_BY_US,
    READY_HEADERS,
    Accounting,
    Subscriber,
    SubscriberSpec,
    Tally,
)


class Receivers:
    """Subscribers ``indices`` of a run, on the running event loop."""

    def __init__(self, spec: SubscriberSpec, indices: Iterable[int]) -> None:
        self.spec = spec
        self.indices = list(indices)
        self.tally = Tally(run_digits=str(spec.run).encode())
        self.subs: list[Subscriber] = []
        self.track = False  # resume mode (see Subscriber.seqs), with floor and want for new streams
        self.floor = self.want = 0

    async def connect(self, last_event_ids: dict[int, str] | None = None) -> dict[str, Any]:
        """Open every stream (at most ``dial_concurrency`` not yet ready at once); the outcome."""
        loop = asyncio.get_running_loop()
        spec = self.spec
        gate = asyncio.Semaphore(spec.dial_concurrency)
        ready_on_head = spec.ready == READY_HEADERS
        subs = []
        for i in self.indices:
            endpoint, request = spec.request(i, (last_event_ids or {}).get(i))
            sub = Subscriber(i, request, self.tally, ready_on_head, self.track)
            sub.floor, sub.want = self.floor, self.want
            subs.append((endpoint, sub))
        self.subs = [s for _, s in subs]
        tls = subs[0][0].ssl_context() if subs else None  # one context for all (making one is slow)

        async def one(endpoint: Endpoint, sub: Subscriber) -> None:
            async with gate:
                sub.started = time.perf_counter()
                try:
                    async with asyncio.timeout(spec.dial_timeout_s):
                        await loop.create_connection(
                            lambda: sub, endpoint.host, endpoint.port, ssl=tls if endpoint.tls else None
                        )
                        await asyncio.shield(sub.ready)  # a timeout must not cancel it
                except TimeoutError:
                    sub.fail("timeout waiting for the stream")
                except OSError as exc:
                    sub.fail(describe(exc))

        started = time.perf_counter()
        tasks = [asyncio.ensure_future(one(e, s)) for e, s in subs]
        _, pending = await asyncio.wait(tasks, timeout=spec.ready_timeout_s)
        for task in pending:
            task.cancel()
        seconds = time.perf_counter() - started
        errors: Counter[str] = Counter()
        ready = stats.Histogram()
        connected = array("i")
        non_sse = 0
        for sub in self.subs:
            if sub.ready.done() and sub.ready.result() and sub.alive:
                connected.append(sub.idx)
                ready.add(sub.connect_us)
                non_sse += not sub.content_type.startswith("text/event-stream")
            else:
                sub.fail("timeout waiting for the stream")
                errors[sub.error or "unknown"] += 1
        return {
            "requested": len(self.subs),
            "connected": connected.tobytes(),
            "seconds": seconds,
            "ready": ready.to_wire(),
            "errors": dict(errors),
            "non_sse": non_sse,
        }

    def start(self, acct: Accounting) -> None:
        self.tally.start(acct)

    def alive(self) -> int:
        return sum(1 for s in self.subs if s.alive)

    async def close(self) -> None:
        for sub in self.subs:
            sub.close()
        waiting = [s.done for s in self.subs if not s.done.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=5)

    def report(self) -> dict[str, Any]:
        out = self.tally.report()
        out["alive"] = self.alive()
        dropped: Counter[str] = Counter(
            s.error or "closed" for s in self.subs if s.status == 200 and s.closed and s.error != CLOSED_BY_US
        )
        out["drop_errors"] = dict(dropped)
        return out


class Pool(Protocol):
    async def connect(self) -> dict[str, Any]: ...
    async def start(self, acct: Accounting) -> None: ...
    async def poll(self) -> tuple[int, int]: ...  # events received, streams alive
    async def finish(self) -> dict[str, Any]: ...
    async def cancel(self) -> None: ...


def make_pool(spec: SubscriberSpec, subscribers: int, processes: int) -> Pool:
    if processes <= 1:
        return LocalPool(spec, subscribers)
    return ProcessPool(spec, subscribers, processes)


class LocalPool:
    """Subscribers on the caller's own event loop."""

    def __init__(self, spec: SubscriberSpec, subscribers: int) -> None:
        self.receivers = Receivers(spec, range(subscribers))

    async def connect(self) -> dict[str, Any]:
        report = await self.receivers.connect()
        return merge_connect([report])

    async def start(self, acct: Accounting) -> None:
        self.receivers.start(acct)

    async def poll(self) -> tuple[int, int]:
        return self.receivers.tally.received, self.receivers.alive()

    async def finish(self) -> dict[str, Any]:
        report = self.receivers.report()
        await self.receivers.close()
        return merge_reports([report], extra_cpu_s=0.0)

    async def cancel(self) -> None:
        await self.receivers.close()


class ProcessPool:
    """Subscribers split into contiguous ranges over ``processes`` worker processes."""

    def __init__(self, spec: SubscriberSpec, subscribers: int, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        per, extra = divmod(subscribers, processes)
        lo = 0
        for w in range(processes):
            hi = lo + per + (w < extra)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, spec, lo, hi), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
            lo = hi

    async def _ask(self, message: tuple[Any, ...]) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(message)
        answers = await asyncio.gather(*(_receive(pipe) for pipe in self.pipes))
        for answer in answers:
            if isinstance(answer, tuple) and answer and answer[0] == "error":
                raise LoadgenError(f"a receiver process failed: {answer[1]}")
        return answers

    async def connect(self) -> dict[str, Any]:
        return merge_connect(await self._ask(("connect",)))

    async def start(self, acct: Accounting) -> None:
        await self._ask(("start", acct))

    async def poll(self) -> tuple[int, int]:
        answers = await self._ask(("poll",))
        return sum(a[0] for a in answers), sum(a[1] for a in answers)

    async def finish(self) -> dict[str, Any]:
        reports = await self._ask(("finish",))
        cpu = sum(r.pop("cpu_s") for r in reports)
        self._reap()
        return merge_reports(reports, extra_cpu_s=cpu)

    async def cancel(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ask(("finish",)), 5)
        self._reap()

    def _reap(self) -> None:
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


async def _receive(pipe: Connection) -> Any:
    """The next message on ``pipe``, waiting on the event loop rather than in a thread."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = pipe.fileno()
    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(fd)
            # uvloop leaves the descriptor non-blocking; a message is read (and later sent) whole.
            os.set_blocking(fd, True)
    try:
        return pipe.recv()
    except (EOFError, OSError):
        raise LoadgenError("a receiver process ended unexpectedly") from None


def run_loop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def worker_main(pipe: Connection, spec: SubscriberSpec, lo: int, hi: int) -> None:
    """Entry point of a worker process: serve the parent's requests until ``finish``."""
    procstat.raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(lambda: _serve(pipe, spec, lo, hi))
    pipe.close()


async def _serve(pipe: Connection, spec: SubscriberSpec, lo: int, hi: int) -> None:
    receivers = Receivers(spec, range(lo, hi))
    cpu_start = procstat.own_cpu_s()
    while True:
        try:
            message = await _receive(pipe)
        except LoadgenError:
            await receivers.close()
            return
        try:
            command = message[0]
            if command == "connect":
                answer: Any = await receivers.connect()
                gc.collect()
                gc.freeze()  # what the connections hold is never garbage; keep it out of collections
            elif command == "start":
                cpu_start = procstat.own_cpu_s()
                receivers.start(message[1])
                answer = True
            elif command == "poll":
                answer = (receivers.tally.received, receivers.alive())
            else:
                answer = receivers.report()
                await receivers.close()
                answer["cpu_s"] = procstat.own_cpu_s() - cpu_start
                pipe.send(answer)
                return
        except Exception as exc:
            answer = ("error", "".join(traceback.format_exception_only(exc)).strip())
        pipe.send(answer)


# --- merging what the receivers report -----------------------------------------------------


def merge_connect(reports: list[dict[str, Any]]) -> dict[str, Any]:
    connected = array("i")
    ready = stats.Histogram()
    errors: dict[str, int] = {}
    for r in reports:
        connected.frombytes(r["connected"])
        ready.merge(stats.Histogram.from_wire(r["ready"]))
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    summary = ready.summary()
    requested = sum(r["requested"] for r in reports)
    return {
        "requested": requested,
        "connected": len(connected),
        "failed": requested - len(connected),
        "seconds": round(max(r["seconds"] for r in reports), 3),
        "ready_p50_ms": summary["p50_ms"],
        "ready_p99_ms": summary["p99_ms"],
        "ready_max_ms": summary["max_ms"],
        "errors": errors,
        "non_sse_content_type": sum(r["non_sse"] for r in reports),
        "indices": sorted(connected),
    }


def merge_reports(reports: list[dict[str, Any]], *, extra_cpu_s: float) -> dict[str, Any]:
    counts = array("i")
    latency, corrected = stats.Histogram(), stats.Histogram()
    out: dict[str, Any] = {
        k: 0 for k in ("received", "duplicated", "misrouted", "other", "comments", "pre", "last_ns", "alive")
    }
    drops: dict[str, int] = {}
    for r in reports:
        mine = array("i")
        mine.frombytes(r["counts"])
        stats.add_counts(counts, mine)
        latency.merge(stats.Histogram.from_wire(r["latency"]))
        corrected.merge(stats.Histogram.from_wire(r["corrected"]))
        for key in out:
            out[key] = max(out[key], r[key]) if key == "last_ns" else out[key] + r[key]
        for kind, n in r["drop_errors"].items():
            drops[kind] = drops.get(kind, 0) + n
    out.update(counts=counts, latency=latency, corrected=corrected, drop_errors=drops, cpu_s=extra_cpu_s)
    return out
