"""Alembic environment: migrations run on a connection handed over by ``scribe_events.store.migrate``."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
schema = context.config.attributes.get("schema")

context.configure(
    connection=connection,
    version_table_schema=schema,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
