"""A per-session disk cap of a compute environment (`sessionDiskCapGb`): the most one
session's volume may grow to on a host. NULL (every existing row): no cap of its own, the
whole `bootDiskSizeGb` budget, as before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 17:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("compute_envs") as batch_op:
        batch_op.add_column(sa.Column("session_disk_cap_gb", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("compute_envs") as batch_op:
        batch_op.drop_column("session_disk_cap_gb")
