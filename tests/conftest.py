from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from tests.harness import ThreadServer

MakeServer = Callable[..., ThreadServer]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """Start real servers (uvicorn, our protocol, uvloop) on this test's own SQLite file."""
    started: list[ThreadServer] = []

    def make(db_name: str = "events.db", **overrides: Any) -> ThreadServer:
        server = ThreadServer(tmp_path / db_name, **overrides).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: MakeServer) -> ThreadServer:
    return make_server()


# --- real PostgreSQL: each test gets its own schema --------------------------------------------

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_URL = os.environ.get("SCRIBE_EVENTS_TEST_PG_URL", "postgresql+asyncpg://root@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("SCRIBE_EVENTS_TEST_REQUIRE_SERVICES") == "1"


def _pg_dsn() -> str:
    return PG_URL.replace("postgresql+asyncpg://", "postgresql://")


async def _pg_execute(sql: str) -> None:
    conn = await asyncpg.connect(_pg_dsn(), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards. Skips without PostgreSQL, except in CI."""
    schema = "t_" + uuid.uuid4().hex[:16]
    try:
        asyncio.run(_pg_execute(f'CREATE SCHEMA "{schema}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        if REQUIRE_SERVICES:
            pytest.fail(f"PostgreSQL is required here and unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    yield schema
    asyncio.run(_pg_execute(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Settings for a store on SQLite (a file of this test) or PostgreSQL (a schema of this test)."""
    if request.param == "sqlite":
        return {"database_url": f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"}
    schema = request.getfixturevalue("pg_schema")
    return {"database_url": PG_URL, "database_schema": schema, "auto_migrate": True}


_SERVICES = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "Redis": 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line at the end for tests skipped because a service is not running (CI requires them)."""
    counts = dict.fromkeys(_SERVICES, 0)
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        for service in _SERVICES:
            if f"{service} unreachable" in reason:
                counts[service] += 1
    missing = {s: n for s, n in counts.items() if n}
    if missing:
        said = ", ".join(f"{n} for {s}" for s, n in missing.items())
        start = " and ".join(f"`{_SERVICES[s]}`" for s in missing)
        terminalreporter.write_line(f"skipped {said} (not running); start with {start}", yellow=True)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        if REQUIRE_SERVICES:
            pytest.fail(f"Redis is required here and unreachable: {exc}")
        pytest.skip(f"Redis unreachable: {exc}")
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    yield prefix
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    client.close()
