"""Publishing: a pool of keep-alive connections sending what a scenario schedules.

Two ways to send. :meth:`Publisher.schedule` keeps an open-loop schedule like ssebench: message
``seq`` is due at ``t0 + seq / rate``; a dispatcher hands due messages to the connections, and one
that is still queued ``grace`` after the end is skipped (counted, never sent), so a slow server
cannot stretch the run. :meth:`Publisher.flood` is closed-loop: every connection sends as fast as
its answers come back (or on a schedule of its own). Every message carries ``ts``, the time it is
sent (ns), so a receiver measures latency without sharing a clock with us.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scribe_events.loadgen import stats
from scribe_events.loadgen.http import Connection, Endpoint, HTTPError, Template, parse_header, request_head

NOT_SENT, OK, FAILED, SKIPPED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class PublishSpec:
    url: str  # template: {i} target subscriber, {user}, {seq}, {ts}, {sched}, {run}
    body: str  # template of one event (a batch joins several into {"events": [...]})
    headers: tuple[str, ...] = ()
    users: int = 1
    run: int = 0
    connections: int = 32
    timeout_s: float = 10.0
    method: str = "POST"
    content_type: str = "application/json"


class Publisher:
    """Builds and sends publish requests; counts answers by status and their latency."""

    def __init__(self, spec: PublishSpec) -> None:
        self.spec = spec
        self._url = Template(spec.url)
        self._body = Template(spec.body)
        self._headers = [Template(h) for h in spec.headers]
        self.endpoint = Endpoint.parse(self._url.fill(**self._values(0, 0, 0, 0)))
        self.conns = [Connection(self.endpoint, spec.timeout_s) for _ in range(spec.connections)]
        self.statuses: Counter[str] = Counter()  # "202", or an error's kind
        self.ok = self.failed = self.skipped = 0
        self.events_ok = 0
        self.http_latency = stats.Histogram()  # request sent -> answer read
        self.lag = stats.Histogram()  # scheduled -> sent (the publisher's own delay)
        self.corrected = stats.Histogram()  # scheduled -> answer read

    def _values(self, seq: int, i: int, ts: int, sched: int) -> dict[str, object]:
        return {
            "seq": seq,
            "i": i,
            "user": f"u{i % self.spec.users}",
            "ts": ts,
            "sched": sched,
            "run": self.spec.run,
        }

    def event(self, seq: int, i: int, ts: int, sched: int = 0) -> str:
        return self._body.fill(**self._values(seq, i, ts, sched))

    def request(self, body: str, seq: int = 0, i: int = 0, ts: int = 0, sched: int = 0) -> bytes:
        values = self._values(seq, i, ts, sched)
        endpoint = self.endpoint
        if self._url.fields:
            endpoint = Endpoint.parse(self._url.fill(**values))
        headers = [("Content-Type", self.spec.content_type)]
        headers += [parse_header(h.fill(**values)) for h in self._headers]
        data = body.encode()
        return request_head(self.spec.method, endpoint, headers, len(data)) + data

    async def open(self) -> None:
        """Dial every connection before the clock starts (a cold start is not the server's latency)."""
        await asyncio.gather(*(c.open() for c in self.conns))

    def close(self) -> None:
        for c in self.conns:
            c.close()

    async def send(self, conn: Connection, data: bytes, events: int = 1) -> bool:
        """Send one request and count its answer; True when it was accepted (2xx)."""
        started = time.perf_counter()
        try:
            status, _ = await conn.request(data)
        except HTTPError as exc:
            return self._count(None, str(exc), started, events)
        return self._count(status, "", started, events)

    def _count(self, status: int | None, error: str, started: float, events: int) -> bool:
        if status is None:
            self.statuses[error] += 1
            self.failed += 1
            return False
        self.http_latency.add(int((time.perf_counter() - started) * 1e6))
        self.statuses[str(status)] += 1
        if 200 <= status < 300:
            self.ok += 1
            self.events_ok += events
            return True
        self.failed += 1
        return False

    async def schedule(
        self,
        total: int,
        interval_ns: float,
        t0_ns: int,
        grace_ns: int,
        target_of: Callable[[int], int],
        state: bytearray,
    ) -> None:
        """Publish messages 0..total-1, message ``seq`` due at ``t0_ns + seq * interval_ns``.

        A due message is written at once on an idle connection, in the same turn of the event
        loop as the timer that found it due (with many streams to read, every hop through the loop
        would add its own delay to the schedule); a connection that answers takes the next one
        waiting."""
        loop = asyncio.get_running_loop()
        deadline = t0_ns + int(total * interval_ns) + grace_ns
        idle = deque(self.conns)
        waiting: deque[int] = deque()
        running: set[asyncio.Task[None]] = set()

        def launch(conn: Connection, seq: int) -> bool:
            now = time.time_ns()
            if now > deadline:
                state[seq] = SKIPPED
                self.skipped += 1
                return False
            sched = t0_ns + int(seq * interval_ns)
            i = target_of(seq)
            data = self.request(self.event(seq, i, now, sched), seq, i, now, sched)
            self.lag.add((now - sched) // 1000)
            started = time.perf_counter()
            task = loop.create_task(complete(conn, seq, data, conn.write(data), started))
            running.add(task)
            task.add_done_callback(running.discard)
            return True

        async def complete(conn: Connection, seq: int, data: bytes, written: bool, started: float) -> None:
            error = ""
            try:
                status, _ = await (conn.answer() if written else conn.request(data))
            except HTTPError:
                try:
                    status, _ = await conn.retry(data)
                except HTTPError as exc:
                    status, error = None, str(exc)
            ok = self._count(status, error, started, 1)
            state[seq] = OK if ok else FAILED
            while waiting:
                if launch(conn, waiting.popleft()):
                    return
            idle.append(conn)

        seq = 0
        while seq < total:
            due = min(total, int((time.time_ns() - t0_ns) / interval_ns) + 1)
            while seq < due:
                if not idle:
                    waiting.append(seq)
                elif not launch(conn := idle.popleft(), seq):
                    idle.appendleft(conn)  # too late, skipped: the connection is still free
                seq += 1
            if seq < total:
                wait_ns = t0_ns + seq * interval_ns - time.time_ns()
                if wait_ns > 0:
                    await asyncio.sleep(wait_ns / 1e9)
        while running:
            await asyncio.wait(list(running))

    async def flood(
        self,
        until_ns: int,
        batch: int,
        target_of: Callable[[int], int],
        state: bytearray,
        t0_ns: int = 0,
        interval_ns: float = 0.0,
    ) -> None:
        """Every connection sends requests of ``batch`` events until ``until_ns``: back to back, or
        request ``n`` at ``t0_ns + n * interval_ns`` when an interval is given."""
        counter = iter(range(1 << 62))

        async def sender(conn: Connection) -> None:
            while True:
                n = next(counter)
                sched = t0_ns + int(n * interval_ns) if interval_ns else 0
                if interval_ns:
                    if sched >= until_ns:
                        return
                    wait_ns = sched - time.time_ns()
                    if wait_ns > 0:
                        await asyncio.sleep(wait_ns / 1e9)
                now = time.time_ns()
                if now >= until_ns and not interval_ns:
                    return
                first = n * batch
                if len(state) < first + batch:
                    state.extend(bytes(first + batch - len(state)))
                body = self.batch_body(
                    [self.event(s, target_of(s), now, sched) for s in range(first, first + batch)]
                )
                ok = await self.send(conn, self.request(body, first, target_of(first), now, sched), batch)
                for s in range(first, first + batch):
                    state[s] = OK if ok else FAILED
                if interval_ns:
                    self.lag.add((now - sched) // 1000)
                    self.corrected.add((time.time_ns() - sched) // 1000)

        await asyncio.gather(*(sender(c) for c in self.conns))

    async def lanes(self, lanes: Sequence[Sequence[tuple[bytes, int]]]) -> None:
        """Send each lane's requests ``(request, events)`` one after the other (their order is the
        order the server stores them in), the lanes side by side over the connections."""
        queue: asyncio.Queue[Sequence[tuple[bytes, int]]] = asyncio.Queue()
        for lane in lanes:
            queue.put_nowait(lane)

        async def sender(conn: Connection) -> None:
            while not queue.empty():
                for data, events in queue.get_nowait():
                    await self.send(conn, data, events)

        await asyncio.gather(*(sender(c) for c in self.conns))

    @staticmethod
    def batch_body(events: Sequence[str]) -> str:
        return events[0] if len(events) == 1 else '{"events":[' + ",".join(events) + "]}"
