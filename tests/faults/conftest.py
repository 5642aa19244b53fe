"""Fixtures of the fault suite: one PostgreSQL schema, one private redis-server and one cluster of
instances per module and size, shared by the scenarios (each takes its own baselines; one that
kills an instance starts it again)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.conftest import REQUIRE_SERVICES, _pg_execute
from tests.faults.cluster import Cluster, Size
from tests.harness import free_port
from tests.test_redis import _redis_server

__all__ = ["OwnRedis", "cluster", "fault_schema", "own_redis"]


class OwnRedis:
    """A redis-server of the suite's own on a free loopback port (it may be killed and restarted)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] = _redis_server(self.port)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def restart_empty(self) -> None:
        self.kill()
        self.proc = _redis_server(self.port)
        client = redis.Redis(port=self.port)
        try:
            client.flushall()
        finally:
            client.close()


@pytest.fixture(scope="module")
def fault_schema() -> Iterator[str]:
    schema = "t_faults_" + uuid.uuid4().hex[:12]
    try:
        asyncio.run(_pg_execute(f'CREATE SCHEMA "{schema}"'))
    except OSError as exc:
        if REQUIRE_SERVICES:
            pytest.fail(f"PostgreSQL is required here and unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    yield schema
    asyncio.run(_pg_execute(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(scope="module")
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def cluster(
    size: Size, fault_schema: str, own_redis: OwnRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The instances, with a small write-buffer limit (only the slow consumer ever reaches it)."""
    tmp = tmp_path_factory.mktemp(f"faults-{size.instances}")
    prefix = f"f{uuid.uuid4().hex[:8]}:"
    cluster = Cluster(
        tmp,
        fault_schema,
        prefix,
        size.instances,
        redis_url=own_redis.url,
        SCRIBE_EVENTS_MAX_CONNECTION_BUFFER="65536",
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
