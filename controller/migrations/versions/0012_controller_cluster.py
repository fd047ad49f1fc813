"""Several controllers on one PostgreSQL (controller.cluster, controller.leader).

`agents.controller_id` and `agents.lease_expires_at`: which controller holds an agent's
stream and until when (renewed while the agent talks); `controller_secrets`: the one set
of secrets every controller of the database uses (agent CA, connect and credentials keys),
sealed under the key each controller is given; `job_leases`: which controller runs a
background job (the reconciler's lifespans, checkpoint GC, ...) and until when.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 23:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("controller_id", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "controller_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "job_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("passes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("job_leases")
    op.drop_table("controller_secrets")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("controller_id")
