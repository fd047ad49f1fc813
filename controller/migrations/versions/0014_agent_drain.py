"""Draining agents (`studio-agent drain`, issue 16).

`agents.drain`: how the agent's host is being drained, as its Hello and Heartbeats
say: "" (not draining), "stop" (its running studios are stopped, each with its final
checkpoint) or "wait" (they are left to finish). Placement skips a draining agent.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 23:50:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("drain", sa.String(length=8), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("drain")
