"""The event store: events (partitioned by day on PostgreSQL), idempotency keys, watermarks,
failed deliveries.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_EVENT_COLUMNS = """
    time_ms BIGINT NOT NULL,
    type VARCHAR(200) NOT NULL,
    user_id VARCHAR(200),
    session_id VARCHAR(200),
    broadcast BOOLEAN NOT NULL,
    task_id VARCHAR(200),
    novel_id VARCHAR(200),
    replace_key VARCHAR(420),
    sensitive BOOLEAN NOT NULL,
    key_id VARCHAR(64),
    data TEXT NOT NULL
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE events_id_seq")
        op.execute(
            "CREATE TABLE events (id BIGINT NOT NULL DEFAULT nextval('events_id_seq'),"
            + _EVENT_COLUMNS
            + ", PRIMARY KEY (id, time_ms)) PARTITION BY RANGE (time_ms)"
        )
        op.execute("ALTER SEQUENCE events_id_seq OWNED BY events.id")
        # Rows outside every day partition land here (day partitions are made ahead of time).
        op.execute("CREATE TABLE events_default PARTITION OF events DEFAULT")
    else:
        op.execute("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT," + _EVENT_COLUMNS + ")")
    op.create_index("ix_events_user_id", "events", ["user_id", "id"])
    op.create_index("ix_events_replace_key", "events", ["replace_key"])
    op.create_index("ix_events_time_ms", "events", ["time_ms"])

    op.create_table(
        "idempotency_keys",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("ids", sa.Text, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_idempotency_keys_created_ms", "idempotency_keys", ["created_ms"])
    op.create_table(
        "store_meta",
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "failed_deliveries",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("event_id", sa.BigInteger, nullable=False),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("session_id", sa.String(200)),
        sa.Column("connection_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("failed_ms", sa.BigInteger, nullable=False),
        sa.Column("resent_ms", sa.BigInteger),
        sa.Column("resend_count", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_failed_deliveries_event_id", "failed_deliveries", ["event_id"])
    op.create_index("ix_failed_deliveries_user_id", "failed_deliveries", ["user_id", "failed_ms"])
    op.create_index("ix_failed_deliveries_failed_ms", "failed_deliveries", ["failed_ms"])


def downgrade() -> None:
    op.drop_table("failed_deliveries")
    op.drop_table("store_meta")
    op.drop_table("idempotency_keys")
    op.drop_table("events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE IF EXISTS events_id_seq")
