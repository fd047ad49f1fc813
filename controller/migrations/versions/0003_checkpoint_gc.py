"""Checkpoint garbage collection runs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 08:25:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "checkpoint_gc_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_uri", sa.Text(), nullable=False),
        sa.Column("compute_env_id", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("deleted_manifests", sa.Integer(), nullable=False),
        sa.Column("deleted_packs", sa.Integer(), nullable=False),
        sa.Column("freed_bytes", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_checkpoint_gc_runs_base_uri", "checkpoint_gc_runs", ["base_uri"], unique=False
    )
    op.create_index(
        "ix_checkpoint_gc_runs_compute_env_id",
        "checkpoint_gc_runs",
        ["compute_env_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_checkpoint_gc_runs_compute_env_id", table_name="checkpoint_gc_runs")
    op.drop_index("ix_checkpoint_gc_runs_base_uri", table_name="checkpoint_gc_runs")
    op.drop_table("checkpoint_gc_runs")
