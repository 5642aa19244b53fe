"""Tasks and their readers: who may see a task's events, and the state heartbeats are made from.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("task_id", sa.String(200), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float),
        sa.Column("started_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.Column("ended_ms", sa.BigInteger),
    )
    op.create_index("ix_tasks_status", "tasks", ["status", "updated_ms"])
    op.create_table(
        "task_readers",
        sa.Column("task_id", sa.String(200), primary_key=True),
        sa.Column("user_id", sa.String(200), primary_key=True),
        sa.Column("from_id", sa.BigInteger, nullable=False),
        sa.Column("granted_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_task_readers_user_id", "task_readers", ["user_id"])
    op.create_index("ix_events_task_id", "events", ["task_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_events_task_id", "events")
    op.drop_table("task_readers")
    op.drop_table("tasks")
