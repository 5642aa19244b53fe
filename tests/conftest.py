from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
