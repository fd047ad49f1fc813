"""The connection audit: every visit of a user to a studio through its agent's proxy.

Not a foreign key to studios (the audit outlives a deleted studio); deleted with the
workspace.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "studio_connections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workspace_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(length=8), nullable=False),
        sa.Column("studio_name", sa.String(length=80), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("visit_id", sa.String(length=32), nullable=False),
        sa.Column("proxy_instance_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("client_address", sa.String(length=64), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_by", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("agent_id", "visit_id", name="uq_studio_connections_agent_visit"),
    )
    op.create_index("ix_studio_connections_workspace_id", "studio_connections", ["workspace_id"])
    op.create_index(
        "ix_studio_connections_session_opened",
        "studio_connections",
        ["session_id", "opened_at", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_studio_connections_session_opened", table_name="studio_connections")
    op.drop_index("ix_studio_connections_workspace_id", table_name="studio_connections")
    op.drop_table("studio_connections")
