"""`scribe-events bench store` on PostgreSQL: it measures on a throw-away schema and drops it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import PG_URL
from tests.harness import cli
from tests.test_durability import _pg_rows


def test_cli_bench_store_on_postgresql_drops_its_schema(tmp_path: Path, pg_schema: str) -> None:
    # pg_schema: skips without PostgreSQL (fails in CI); the bench makes a schema of its own.
    run = cli(
        "bench",
        "store",
        "--database-url",
        PG_URL,
        "--lone",
        "10",
        "--events",
        "100",
        "--concurrency",
        "10",
        "--json",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    match = re.fullmatch(re.escape(PG_URL) + r" \(schema (bench_[0-9a-f]{12})\)", result["store"])
    assert match, result["store"]
    assert result["lone"]["events"] == 10 and result["loaded"]["events"] == 100
    assert 2 < result["loaded"]["events_per_batch"] <= 10
    left = _pg_rows(pg_schema, f"SELECT nspname FROM pg_namespace WHERE nspname = '{match.group(1)}'")
    assert left == []  # the throw-away schema is gone
