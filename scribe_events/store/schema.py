"""The tables, as the queries see them. The DDL itself lives in the Alembic migrations.

On PostgreSQL ``events`` is partitioned by day on ``time_ms`` (so retention drops whole days
without rewriting or locking the live table) and its primary key is ``(id, time_ms)``; ids come
from the sequence ``events_id_seq``. On SQLite it is one table with an AUTOINCREMENT id.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("time_ms", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("user_id", sa.String(200)),
    sa.Column("session_id", sa.String(200)),
    sa.Column("broadcast", sa.Boolean, nullable=False),
    sa.Column("task_id", sa.String(200)),
    sa.Column("novel_id", sa.String(200)),
    sa.Column("replace_key", sa.String(420)),
    sa.Column("sensitive", sa.Boolean, nullable=False),
    sa.Column("key_id", sa.String(64)),  # the encryption key of a sensitive event's data
    sa.Column("data", sa.Text, nullable=False),  # JSON text, or base64 ciphertext when key_id is set
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("owner", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("ids", sa.Text, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

# Watermarks: ``purged_through`` (retention) and ``published_through`` (the outbox relay).
store_meta = sa.Table(
    "store_meta",
    metadata,
    sa.Column("key", sa.String(100), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

failed_deliveries = sa.Table(
    "failed_deliveries",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.BigInteger, nullable=False),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("session_id", sa.String(200)),
    sa.Column("connection_id", sa.String(64), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("failed_ms", sa.BigInteger, nullable=False),
    sa.Column("resent_ms", sa.BigInteger),
    sa.Column("resend_count", sa.Integer, nullable=False),
)

# Tasks (R3): one row per task started with ``task.progress-started``; ``status`` is ``running``,
# ``completed`` or ``failed``; ``updated_ms`` is the last start or progress update (heartbeats and
# stall detection are made from it).
tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String(200), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("progress", sa.Float),
    sa.Column("started_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.Column("ended_ms", sa.BigInteger),
)

# Who may see a task's events: the owner and every reader, each from ``from_id`` on (events of the
# task with a higher id), so a reader granted mid-task sees what comes after the grant only.
task_readers = sa.Table(
    "task_readers",
    metadata,
    sa.Column("task_id", sa.String(200), primary_key=True),
    sa.Column("user_id", sa.String(200), primary_key=True),
    sa.Column("from_id", sa.BigInteger, nullable=False),
    sa.Column("granted_ms", sa.BigInteger, nullable=False),
)

# Each instance's metric samples every history interval (when there is no Redis to keep them).
metric_snapshots = sa.Table(
    "metric_snapshots",
    metadata,
    sa.Column("instance", sa.String(200), primary_key=True),
    sa.Column("at_ms", sa.BigInteger, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),  # zlib-compressed JSON of the samples
    sa.Index("ix_metric_snapshots_at_ms", "at_ms"),
)
