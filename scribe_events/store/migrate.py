"""Running the Alembic migrations from code (``scribe-events db``, and ``serve`` on the embedded default)."""

from __future__ import annotations

import zlib
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

SCRIPT_LOCATION = "scribe_events.store:migrations"
MIGRATE_LOCK = 0x5CE3  # first key of the advisory lock held while migrating (see store/sql.py for 0x5CE1-2)


def alembic_config(schema: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["schema"] = schema
    return config


def head() -> str:
    head_revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head_revision is not None
    return head_revision


async def current(engine: AsyncEngine, schema: str | None = None) -> str | None:
    """The revision the database is at (None: never migrated)."""

    def read(sync_conn: Any) -> str | None:
        opts = {"version_table_schema": schema} if schema else {}
        return MigrationContext.configure(sync_conn, opts=opts).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def upgrade(engine: AsyncEngine, schema: str | None = None, revision: str = "head") -> str | None:
    """Bring the database to ``revision``; returns the revision it is at afterwards."""
    config = alembic_config(schema)

    def run(sync_conn: Any) -> None:
        config.attributes["connection"] = sync_conn
        command.upgrade(config, revision)

    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Instances starting together migrate one after another: the others then find the
            # schema current (without the lock two raced on CREATE TABLE alembic_version).
            key = zlib.crc32((schema or "public").encode()) & 0x7FFFFFFF
            await conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": MIGRATE_LOCK, "key": key}
            )
            if schema:
                await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.run_sync(run)
    return await current(engine, schema)
