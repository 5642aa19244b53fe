"""The local cluster of deploy/: three instances on PostgreSQL and Redis behind Debian's nginx. A
client follows its stream through nginx while the instance it is on restarts, and loses nothing."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from scribe_events.client import Message, follow
from tests.conftest import REQUIRE_SERVICES

_spec = importlib.util.spec_from_file_location(
    "cluster", Path(__file__).parent.parent / "deploy" / "cluster.py"
)
assert _spec is not None and _spec.loader is not None
cluster_module = importlib.util.module_from_spec(_spec)
sys.modules["cluster"] = cluster_module
_spec.loader.exec_module(cluster_module)


@pytest.fixture
def cluster() -> Any:
    if cluster_module.nginx_binary() is None:
        if REQUIRE_SERVICES:
            pytest.fail("nginx is required here (apt-get install nginx)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    try:
        with cluster_module.Cluster(3, drain_window_s=1.0) as c:
            yield c
    except OSError as exc:  # PostgreSQL or Redis away
        if REQUIRE_SERVICES:
            raise
        pytest.skip(f"the cluster could not start: {exc}")


def test_a_client_follows_the_restart_of_its_instance_through_nginx_losing_nothing(cluster: Any) -> None:
    got: list[Message] = []
    stop = threading.Event()
    statuses: list[str] = []

    async def reader() -> None:
        async for m in follow(
            cluster.url, cluster.token("alice"), on_status=lambda s, why: statuses.append(why)
        ):
            got.append(m)
            if stop.is_set():
                return

    thread = threading.Thread(target=lambda: asyncio.run(reader()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(m.event == "connection.established" for m in got):
        assert time.monotonic() < deadline, "never connected through nginx"
        time.sleep(0.05)
    first = next(m for m in got if m.event == "connection.established").json()["instance"]

    publisher = {"Authorization": f"Bearer {cluster.token('worker', ['publisher'])}"}
    published: list[str] = []
    publishing = threading.Event()
    publishing.set()

    def publish() -> None:
        with httpx.Client(base_url=cluster.url, headers=publisher, timeout=10) as http:
            n = 0
            while publishing.is_set():
                r = http.post(
                    "/api/v1/events", json={"type": "custom.deploy", "user_id": "alice", "data": {"n": n}}
                )
                if r.status_code == 202:
                    published.extend(r.json()["ids"])
                    n += 1
                time.sleep(0.02)

    pub = threading.Thread(target=publish, daemon=True)
    pub.start()
    time.sleep(1.0)
    away_s = cluster.restart(cluster.instance_of(first))  # SIGTERM: drained, exited, started again
    time.sleep(2.0)
    publishing.clear()
    pub.join(15)
    deadline = time.monotonic() + 15
    while len([m for m in got if m.event == "custom.deploy"]) < len(published):
        assert time.monotonic() < deadline, "events missing after the restart"
        time.sleep(0.1)
    stop.set()

    delivered = [m.id for m in got if m.event == "custom.deploy"]
    assert delivered == published  # every one, once, in order, across the restart
    hellos = [m.json()["instance"] for m in got if m.event == "connection.established"]
    assert len(hellos) >= 2 and hellos[0] == first and hellos[-1] != first  # resumed on another
    [closing] = [m for m in got if m.event == "connection.closing"]
    assert (
        0 <= closing.json()["reconnect_after_ms"] <= 1000
        and closing.retry == closing.json()["reconnect_after_ms"]
    )
    assert len(published) > 100 and away_s < 30
