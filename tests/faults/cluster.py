"""Instances, a retrying publisher and the baseline checks the fault scenarios share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

from scribe_events.auth import mint_token
from scribe_events.store import migrate
from scribe_events.store.sql import SQLEventStore
from tests.conftest import PG_URL, REDIS_URL, _pg_dsn
from tests.faults.ledger import BROADCAST, Ledger
from tests.harness import SECRET, ProcessServer, free_port, wait_for
from tests.test_redis import _env

PUBLISHER = {"Authorization": f"Bearer {mint_token(SECRET, 'worker', roles=['publisher'])}"}
ADMIN = {"Authorization": f"Bearer {mint_token(SECRET, 'root', roles=['admin'])}"}
GHOST = "ghost"  # a user no client follows: its events must reach nobody
FD_SLACK = 6
BENCH_S = 3.0  # an instance that failed a request is skipped this long
CRASH_LINE = re.compile(
    r"^scribe_events_background_task_crashes_total\{(?P<labels>[^}]*)\} (?P<n>\S+)$", re.M
)


@dataclass(frozen=True)
class Size:
    """How big a scenario is: instances, clients, distinct users, events published."""

    instances: int
    clients: int
    users: int
    events: int
    pace_s: float  # between two publishes

    @property
    def label(self) -> str:
        return f"{self.instances}i/{self.clients}c/{self.events}e"


SMALL = Size(instances=2, clients=20, users=10, events=150, pace_s=0.02)
BIG = Size(instances=3, clients=200, users=60, events=1000, pace_s=0.008)


# -- instances --------------------------------------------------------------------------------------


class Cluster:
    """N ``scribe-events serve`` processes on one PostgreSQL schema and one Redis prefix."""

    def __init__(
        self, tmp_path: Path, schema: str, prefix: str, n: int, redis_url: str = REDIS_URL, **extra: str
    ) -> None:
        self.schema = schema
        # --port, not the harness's --fd: uvicorn wraps an inherited fd as AF_UNIX, so its accepted
        # TCP sockets lose TCP_NODELAY (each response then waits ~40 ms for a delayed ACK), and a
        # killed instance's port would still accept connections through the test's copy of it.
        self.servers = [
            ProcessServer(
                tmp_path, env=_env(schema, prefix, f"i{k}", redis_url=redis_url, **extra), port=free_port()
            )
            for k in range(n)
        ]
        self.fd_baseline: dict[int, int] = {}
        self.fd_kinds: dict[int, dict[str, int]] = {}
        self.dead: set[int] = set()

    def start(self) -> Cluster:
        errors: list[BaseException] = []

        def start(s: ProcessServer) -> None:
            try:
                s.start(timeout=30)
            except BaseException as exc:
                errors.append(exc)

        # Migrated here first: instances auto-migrating a fresh schema at once race on CREATE TABLE
        # alembic_version and one of them exits (see the report). Then all start together.
        asyncio.run(_migrate(PG_URL, self.schema))
        threads = [threading.Thread(target=start, args=(s,)) for s in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        if errors:
            raise errors[0]
        return self

    def close(self) -> None:
        for s in self.servers:
            if s.proc is not None:
                if s.proc.poll() is None:
                    os.kill(s.proc.pid, 18)  # SIGCONT, in case a scenario left it stopped
                s.stop()
            s.close()

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def alive(self) -> list[ProcessServer]:
        return [s for k, s in enumerate(self.servers) if k not in self.dead]

    def restart(self, k: int) -> None:
        """Start a killed instance again, on its port."""
        self.servers[k].stop()
        self.servers[k].start(timeout=30)
        self.dead.discard(k)

    def kill(self, k: int, sig: int) -> None:
        proc = self.servers[k].proc
        assert proc is not None
        proc.send_signal(sig)
        if sig == 9:
            proc.wait(5)
            self.dead.add(k)

    def warm_up(self) -> None:
        """Every pool and connection an instance keeps opened once, then the fd baselines taken."""
        with httpx.Client(timeout=5) as http:
            for s in self.servers:
                r = http.post(
                    s.url + "/api/v1/events",
                    json={"type": "custom.warmup", "user_id": GHOST},
                    headers=PUBLISHER,
                )
                assert r.status_code == 202, r.text
                http.get(s.url + "/api/v1/admin/connections", headers=ADMIN)
                http.get(s.url + "/metrics")
        for s in self.servers:
            wait_for(lambda s=s: _connections(s) == 0, timeout=5)
        time.sleep(0.3)
        self.fd_baseline = {s.port: fd_count(s) - redis_pool(s) for s in self.servers}
        self.fd_kinds = {s.port: dict(fd_kinds(s)) for s in self.servers}


async def _migrate(url: str, schema: str) -> None:
    engine = SQLEventStore(url, schema=schema).make_engine()
    try:
        await migrate.upgrade(engine, schema)
    finally:
        await engine.dispose()


def redis_pool(server: ProcessServer) -> int:
    """Connections in the instance's Redis command pool: bounded (SCRIBE_EVENTS_REDIS_MAX_CONNECTIONS)
    and kept while idle, so a burst of requests leaves them open without a leak."""
    text = httpx.get(server.url + "/metrics", timeout=3).text
    found = re.search(r"^scribe_events_redis_connections\{[^}]*\} (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


def fd_count(server: ProcessServer) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def _tcp_table(pid: int) -> dict[str, tuple[int, int, str]]:
    """The kernel's TCP sockets as the process sees them: inode -> (local port, remote port, state)."""
    table: dict[str, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{name}") as fh:
            next(fh)
            for line in fh:
                cols = line.split()
                local, remote = (int(c.rsplit(":", 1)[1], 16) for c in cols[1:3])
                table[cols[9]] = (local, remote, cols[3])
    return table


def _fd_links(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def fd_kinds(server: ProcessServer) -> Counter[str]:
    """The instance's open fds by what they are: a TCP peer's port (PostgreSQL's, else "peer") and
    state, a listening port, else the link's kind (pipe, anon_inode, a file). Said when a baseline
    check fails, beside the same count at the baseline."""
    assert server.proc is not None
    table = _tcp_table(server.proc.pid)
    kinds: Counter[str] = Counter()
    for link in _fd_links(server.proc.pid):
        found = re.fullmatch(r"socket:\[(\d+)\]", link)
        if found is None:
            kinds[re.sub(r"[:\[].*", "", link)] += 1
        elif found.group(1) not in table:
            kinds["socket"] += 1
        else:
            local, remote, state = table[found.group(1)]
            kinds[f"listen:{local}" if state == "0A" else f"tcp:{remote if remote == 5432 else 'peer'}"] += 1
    return kinds


def _connections(server: ProcessServer) -> int:
    return int(httpx.get(server.url + "/health", timeout=3).json()["connections"])


def _registry(server: ProcessServer) -> list[dict[str, object]]:
    r = httpx.get(server.url + "/api/v1/admin/connections", headers=ADMIN, timeout=3)
    assert r.status_code == 200, r.text
    return list(r.json()["connections"])


def crashes(server: ProcessServer) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=3).text
    return {m["labels"]: float(m["n"]) for m in CRASH_LINE.finditer(text) if float(m["n"]) > 0}


def check_baselines(cluster: Cluster, timeout: float = 6.0) -> dict[str, object]:
    """Clients gone: no connection on any surviving instance, an empty registry, fds back near their
    baseline and no crashed background task. (There is no endpoint listing asyncio tasks: a leaked
    task shows as a held socket, i.e. fds, or as a crash in /metrics.)"""
    report: dict[str, object] = {}
    for s in cluster.alive:
        wait_for(lambda s=s: _connections(s) == 0, timeout=timeout, interval=0.1)
    first = cluster.alive[0]
    try:
        wait_for(lambda: _registry(first) == [], timeout=timeout, interval=0.1)
    except TimeoutError:
        raise AssertionError(f"registry not empty: {_registry(first)}") from None
    for s in cluster.alive:
        base = cluster.fd_baseline[s.port]
        try:
            wait_for(
                lambda s=s, base=base: fd_count(s) - redis_pool(s) <= base + FD_SLACK,
                timeout=timeout,
                interval=0.1,
            )
        except TimeoutError:
            raise AssertionError(
                f"{s.url}: {fd_count(s)} fds open ({redis_pool(s)} in the Redis pool), baseline {base} besides it;"
                f" now {dict(fd_kinds(s))}, at the baseline {cluster.fd_kinds[s.port]}"
            ) from None
        report[s.url] = {"fds": fd_count(s), "baseline": base}
        assert crashes(s) == {}, f"{s.url}: background tasks crashed: {crashes(s)}"
    return report


async def _count_stored(schema: str, key: str) -> tuple[int, int]:
    conn = await asyncpg.connect(_pg_dsn(), timeout=5)
    try:
        row = await conn.fetchrow(
            f'SELECT count(*) AS n, count(DISTINCT data) AS d FROM "{schema}".events '
            "WHERE type = 'custom.fault' AND strpos(data, $1) > 0",
            key,
        )
        return int(row["n"]), int(row["d"])
    finally:
        await conn.close()


def stored(schema: str, key: str) -> tuple[int, int]:
    """Rows of one scenario's events (their data hold its key) and distinct payloads (each unique)."""
    return asyncio.run(_count_stored(schema, key))


# -- pg_terminate_backend, for this test's instances only ----------------------------------------


def pg_client_ports(pid: int, pg_port: int = 5432) -> list[int]:
    """Local ports of this process's TCP connections to PostgreSQL (its fds' socket inodes matched
    against the kernel's TCP table), to find exactly its backends in pg_stat_activity."""
    inodes = {link[8:-1] for link in _fd_links(pid) if link.startswith("socket:[")}
    return [
        local
        for inode, (local, remote, _) in _tcp_table(pid).items()
        if inode in inodes and remote == pg_port
    ]


async def _terminate(ports: list[int]) -> int:
    conn = await asyncpg.connect(_pg_dsn(), timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
            "WHERE client_addr = '127.0.0.1' AND client_port = ANY($1::int[]) AND pid <> pg_backend_pid()",
            ports,
        )
        return sum(1 for r in rows if r["ok"])
    finally:
        await conn.close()


def terminate_backends(cluster: Cluster) -> int:
    ports = [p for s in cluster.alive if s.proc is not None for p in pg_client_ports(s.proc.pid)]
    return asyncio.run(_terminate(ports)) if ports else 0


class Gate:
    """A reader-writer lock: requests hold it shared, a fault exclusively (no request in flight)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer, timeout=30)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def __enter__(self) -> Gate:
        with self._cond:
            self._writer = True
            self._cond.wait_for(lambda: self._readers == 0, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


# -- the publisher ---------------------------------------------------------------------------------


def plan(size: Size, users: list[str], seed: int) -> list[tuple[int, str]]:
    """Event n → its audience: mostly one user, some broadcasts, some for a user nobody follows."""
    rng = random.Random(seed)
    out = []
    for n in range(size.events):
        r = n % 10
        out.append((n, BROADCAST if r == 0 else GHOST if r == 1 else rng.choice(users)))
    return out


@dataclass
class Publisher:
    """Publishes the plan in order, one event per request with its own Idempotency-Key; a failed
    attempt (refused connection, timeout, 5xx) is retried on the next instance with the same key."""

    urls: list[str]
    ledger: Ledger
    events: list[tuple[int, str]]
    pace_s: float
    key_prefix: str
    pad: Callable[[str], int] = lambda audience: 0  # bytes of padding for an audience
    timeout_s: float = 2.0
    lifetime_s: float = 60.0
    attempted: int = 0
    acked: int = 0
    retries: int = 0
    failed: list[int] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    workers: int = 3  # requests in flight at once (ids still rise in commit order)

    def __post_init__(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, name=f"publisher-{k}", daemon=True)
            for k in range(self.workers)
        ]
        self._queue = list(reversed(self.events))
        self._take = threading.Lock()
        # Held (shared) around each request; a fault takes it exclusively to act between requests.
        self.gate = Gate()
        self._benched: dict[str, float] = {}  # url → monotonic time until which it is skipped

    def start(self) -> Publisher:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "the publisher did not finish"

    def _run(self) -> None:
        deadline = time.monotonic() + self.lifetime_s
        with httpx.Client(timeout=self.timeout_s) as http:
            while True:
                with self._take:
                    if not self._queue:
                        return
                    n, audience = self._queue.pop()
                    self.attempted += 1
                self._one(http, n, audience, deadline)
                time.sleep(self.pace_s)

    def _one(self, http: httpx.Client, n: int, audience: str, deadline: float) -> None:
        data: dict[str, object] = {"n": n, "key": self.key_prefix}
        if pad := self.pad(audience):
            data["pad"] = "x" * pad
        body: dict[str, object] = {"type": "custom.fault", "data": data}
        body.update({"broadcast": True} if audience == BROADCAST else {"user_id": audience})
        headers = {**PUBLISHER, "Idempotency-Key": f"{self.key_prefix}-{n}"}
        for attempt in range(100):
            now = time.monotonic()
            if now > deadline:
                break
            # Round robin over the instances not failed lately (a load balancer's health check).
            order = [self.urls[(n + attempt + k) % len(self.urls)] for k in range(len(self.urls))]
            url = next(
                (u for u in order if self._benched.get(u, 0.0) <= now),
                min(order, key=lambda u: self._benched.get(u, 0.0)),
            )
            try:
                with self.gate.shared():
                    r = http.post(url + "/api/v1/events", json=body, headers=headers)
            except httpx.HTTPError as exc:
                self.statuses[type(exc).__name__] += 1
                self._benched[url] = time.monotonic() + BENCH_S
            else:
                if r.status_code == 202:
                    ids = list(r.json()["ids"])
                    self.ledger.record(int(ids[0]), audience, n)
                    self.acked += 1
                    return
                code = r.json().get("error", {}).get("code", "") if r.content else ""
                self.statuses[f"{r.status_code} {code}"] += 1
                if r.status_code != 409:  # 409 idempotency_busy: the same request is being stored
                    self._benched[url] = time.monotonic() + BENCH_S
                if r.status_code not in (409, 429) and r.status_code < 500:
                    break  # refused for good
            self.retries += 1
            time.sleep(min(0.05 * (attempt + 1), 0.5))
        self.failed.append(n)
