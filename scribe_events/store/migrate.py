"""Running the Alembic migrations from code (``scribe-events db``, and ``serve`` on the embedded default).

Alembic itself (about 80 ms to import, with SQLAlchemy loaded) is loaded only to migrate: a
database already at :data:`HEAD` is recognised by reading its version table, so an instance
starts without it.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from scribe_events.exceptions import StoreUnavailable

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

SCRIPT_LOCATION = "scribe_events.store:migrations"
MIGRATE_LOCK = 0x5CE3  # first key of the advisory lock held while migrating (see store/sql.py for 0x5CE1-2)
# The newest migration's revision (a test holds it to the scripts' head: bump it with each one).
HEAD = "0003"
VERSION_TABLE = "alembic_version"


def alembic_config(schema: str | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["schema"] = schema
    return config


def head() -> str:
    """The revision this version needs."""
    return HEAD


def _scripts() -> ScriptDirectory:
    """This version's migration scripts, as Alembic reads them."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def scripts_head() -> str:
    """The head of the migration scripts."""
    head_revision = _scripts().get_current_head()
    assert head_revision is not None
    return head_revision


def is_known(revision: str) -> bool:
    """Whether ``revision`` is one of this version's migrations."""
    from alembic.util import CommandError

    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


async def current(engine: AsyncEngine, schema: str | None = None) -> str | None:
    """The revision the database is at (None: never migrated), read as Alembic keeps it: the one
    row of its version table."""

    def read(sync_conn: Any) -> str | None:
        if not sa.inspect(sync_conn).has_table(VERSION_TABLE, schema=schema):
            return None
        table = sa.table(VERSION_TABLE, sa.column("version_num"), schema=schema)
        rows = sync_conn.execute(sa.select(table.c.version_num)).scalars().all()
        if len(rows) > 1:
            raise StoreUnavailable(
                f"the database names {len(rows)} schema revisions ({', '.join(rows)}); expected one",
                code="schema_out_of_date",
            )
        return rows[0] if rows else None

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def upgrade(engine: AsyncEngine, schema: str | None = None, revision: str = "head") -> str | None:
    """Bring the database to ``revision``; returns the revision it is at afterwards."""
    if revision in ("head", HEAD):
        at = await current(engine, schema)
        if at == HEAD:
            return at  # nothing to do: Alembic is not even loaded
    from alembic import command
    from alembic.util import CommandError

    config = alembic_config(schema)

    def run(sync_conn: Any) -> None:
        config.attributes["connection"] = sync_conn
        try:
            command.upgrade(config, revision)
        except CommandError as exc:  # an unknown revision, in the database or asked for
            raise StoreUnavailable(
                f"cannot migrate the schema: {exc} (this version knows revisions up to {HEAD}; "
                "a database migrated by a newer scribe-events needs that version)",
                code="schema_out_of_date",
            ) from None

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
