"""Teams and team participants, private studios' allowed users, clones' parent
checkpoint, lifespan extensions, and the index of the default studio order.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 08:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["organizations.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("org_id", "name", name="uq_teams_org_name"),
    )
    op.create_table(
        "team_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("team_id", "user_id", name="uq_team_members_team_user"),
    )
    with op.batch_alter_table("team_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_team_members_team_id"), ["team_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_team_members_user_id"), ["user_id"], unique=False)

    with op.batch_alter_table("participants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team_id", sa.Integer(), nullable=True))
        batch_op.alter_column("user_id", existing_type=sa.Integer(), nullable=True)
        batch_op.create_foreign_key("fk_participants_team_id", "teams", ["team_id"], ["id"])
        batch_op.create_unique_constraint(
            "uq_participants_workspace_team", ["workspace_id", "team_id"]
        )

    with op.batch_alter_table("studios", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("allowed_user_ids", sa.JSON(), nullable=False, server_default="[]")
        )
        batch_op.add_column(sa.Column("parent_checkpoint_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("lifespan_extra_hours", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.create_index(
            "ix_studios_workspace_created",
            ["workspace_id", "date_created", "session_id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("studios", schema=None) as batch_op:
        batch_op.drop_index("ix_studios_workspace_created")
        batch_op.drop_column("lifespan_extra_hours")
        batch_op.drop_column("parent_checkpoint_id")
        batch_op.drop_column("allowed_user_ids")
    with op.batch_alter_table("participants", schema=None) as batch_op:
        batch_op.drop_constraint("uq_participants_workspace_team", type_="unique")
        batch_op.drop_constraint("fk_participants_team_id", type_="foreignkey")
        batch_op.alter_column("user_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("team_id")
    with op.batch_alter_table("team_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_team_members_user_id"))
        batch_op.drop_index(batch_op.f("ix_team_members_team_id"))
    op.drop_table("team_members")
    op.drop_table("teams")
