"""Labels (Seqera's `/labels`) on studios, and compute environments in the reference's shape:
a description, a status (AVAILABLE or DISABLED), a primary flag per workspace, when they were
last used, and deletion that keeps the row (studios refer to it) and frees the name.

Existing environments become AVAILABLE, not primary, not deleted.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workspace_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=39), nullable=False),
        sa.Column("value", sa.String(length=39), server_default="", nullable=False),
        sa.Column("resource", sa.Boolean(), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workspace_id", "name", "value", name="uq_labels_workspace_name_value"),
    )
    op.create_index("ix_labels_workspace_id", "labels", ["workspace_id"])
    op.create_table(
        "studio_labels",
        sa.Column("session_id", sa.String(length=8), nullable=False),
        sa.Column("label_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["studios.session_id"]),
        sa.ForeignKeyConstraint(["label_id"], ["labels.id"]),
        sa.PrimaryKeyConstraint("session_id", "label_id"),
    )
    op.create_index("ix_studio_labels_label_id", "studio_labels", ["label_id"])
    with op.batch_alter_table("compute_envs") as batch_op:
        batch_op.add_column(sa.Column("description", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("status", sa.String(length=16), server_default="AVAILABLE", nullable=False)
        )
        batch_op.add_column(
            sa.Column("is_primary", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("last_used", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("deleted", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        # A deleted environment frees its name: unique among the live ones only.
        batch_op.drop_constraint("uq_compute_envs_workspace_name", type_="unique")
    op.create_index(
        "uq_compute_envs_workspace_name_live",
        "compute_envs",
        ["workspace_id", "name"],
        unique=True,
        sqlite_where=sa.text("NOT deleted"),
        postgresql_where=sa.text("NOT deleted"),
    )


def downgrade() -> None:
    op.drop_index("uq_compute_envs_workspace_name_live", table_name="compute_envs")
    with op.batch_alter_table("compute_envs") as batch_op:
        batch_op.create_unique_constraint(
            "uq_compute_envs_workspace_name", ["workspace_id", "name"]
        )
        batch_op.drop_column("deleted")
        batch_op.drop_column("last_used")
        batch_op.drop_column("is_primary")
        batch_op.drop_column("status")
        batch_op.drop_column("description")
    op.drop_index("ix_studio_labels_label_id", table_name="studio_labels")
    op.drop_table("studio_labels")
    op.drop_index("ix_labels_workspace_id", table_name="labels")
    op.drop_table("labels")
