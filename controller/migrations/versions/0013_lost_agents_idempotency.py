"""Lost agents and lifecycle conveniences (issue 16).

`studio_runs`: a run the controller left behind on an agent (a start elsewhere), whose
final checkpoint that agent alone may still report; `checkpoints.recovered_from_agent`:
such a checkpoint, kept by name and never the default restore point; `idempotency_keys`:
the first answer to a create or start sent with an `Idempotency-Key`.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 23:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("recovered_from_agent", sa.String(length=128), nullable=True))
    op.create_table(
        "studio_runs",
        sa.Column("session_id", sa.String(length=8), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("left_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["studios.session_id"]),
        sa.PrimaryKeyConstraint("session_id", "generation"),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("workspace_id", sa.Integer(), nullable=False),
        sa.Column("operation", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "workspace_id", "operation", "key"),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("studio_runs")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("recovered_from_agent")
