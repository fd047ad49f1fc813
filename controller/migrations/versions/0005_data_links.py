"""Data-links, the credentials they use, and the agent's report of their mounts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 11:50:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "credentials",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("workspace_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=True),
        sa.Column("region", sa.String(length=64), nullable=True),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workspace_id", "name", name="uq_credentials_workspace_name"),
    )
    op.create_index("ix_credentials_workspace_id", "credentials", ["workspace_id"])
    op.create_table(
        "data_links",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("workspace_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("resource_ref", sa.Text(), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=True),
        sa.Column("credentials_id", sa.String(length=32), nullable=True),
        sa.Column("public_accessible", sa.Boolean(), nullable=False),
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["credentials_id"], ["credentials.id"]),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workspace_id", "name", name="uq_data_links_workspace_name"),
    )
    op.create_index("ix_data_links_workspace_id", "data_links", ["workspace_id"])
    op.create_index("ix_data_links_credentials_id", "data_links", ["credentials_id"])
    with op.batch_alter_table("studios") as batch_op:
        batch_op.add_column(
            sa.Column("data_link_status", sa.JSON(), nullable=False, server_default="{}")
        )


def downgrade() -> None:
    with op.batch_alter_table("studios") as batch_op:
        batch_op.drop_column("data_link_status")
    op.drop_index("ix_data_links_credentials_id", table_name="data_links")
    op.drop_index("ix_data_links_workspace_id", table_name="data_links")
    op.drop_table("data_links")
    op.drop_index("ix_credentials_workspace_id", table_name="credentials")
    op.drop_table("credentials")
