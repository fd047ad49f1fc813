"""Agent enrollment: join tokens that are bound, expire, run out or are revoked; enrolled
agents with their certificate, revocation and capacity cap.

Existing enrollment tokens (the bootstrap one) admit any compute environment of workspace 1,
as the bootstrap token does from now on.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 16:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("enrollment_tokens") as batch_op:
        batch_op.add_column(sa.Column("compute_env_id", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("workspace_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("max_uses", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("uses", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE enrollment_tokens SET workspace_id = 1 WHERE compute_env_id IS NULL")
    with op.batch_alter_table("agents") as batch_op:
        batch_op.add_column(sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("cert_serial", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("capacity_cap", sa.JSON(), nullable=False, server_default="{}")
        )


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch_op:
        for column in (
            "capacity_cap",
            "revoked_at",
            "cert_not_after",
            "cert_serial",
            "enrolled_at",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("enrollment_tokens") as batch_op:
        for column in (
            "revoked_at",
            "uses",
            "max_uses",
            "expires_at",
            "workspace_id",
            "compute_env_id",
        ):
            batch_op.drop_column(column)
