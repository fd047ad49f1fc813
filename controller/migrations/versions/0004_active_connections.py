"""Who is connected to each studio through its agent's connect proxy.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 08:35:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studios") as batch_op:
        batch_op.add_column(
            sa.Column("active_connections", sa.JSON(), nullable=False, server_default="[]")
        )


def downgrade() -> None:
    with op.batch_alter_table("studios") as batch_op:
        batch_op.drop_column("active_connections")
