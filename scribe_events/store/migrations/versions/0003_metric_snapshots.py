"""Metric snapshots: each instance's rolling history for `scribe-events report` (without Redis).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metric_snapshots",
        sa.Column("instance", sa.String(200), primary_key=True),
        sa.Column("at_ms", sa.BigInteger, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),  # zlib-compressed JSON of the samples
    )
    op.create_index("ix_metric_snapshots_at_ms", "metric_snapshots", ["at_ms"])


def downgrade() -> None:
    op.drop_table("metric_snapshots")
