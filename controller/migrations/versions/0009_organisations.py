"""Organisations and workspaces in Seqera's shapes, organisation members, deleted users.

Organisations gain fullName, description, location, website and a logo id; workspaces
fullName, description and visibility (PRIVATE); both a last-updated time and a deleted
flag (deleted ones are kept: their studios' checkpoints are still collected). Users gain a
deleted flag (kept for the studios and checkpoints that name them).

`org_members` holds each user's organisation role (owner, member, collaborator). Data:
existing rows get fullName = name. The bootstrap admin (user 1, `admin`) becomes owner of
organisation 1; every other user taking part in a workspace of an organisation, directly
or through a team, or in a team of it, becomes a member (not a collaborator: until now
everyone of a workspace saw the organisation's teams). An organisation left without an
owner (no bootstrap admin in it) gets the owners of its workspaces as owners, so somebody
can manage it. Teams and their members are kept as they are.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("organizations") as batch_op:
        batch_op.add_column(
            sa.Column("full_name", sa.String(length=100), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("description", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("location", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("website", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("logo_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("last_updated", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("workspaces") as batch_op:
        batch_op.add_column(
            sa.Column("full_name", sa.String(length=100), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("description", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("visibility", sa.String(length=16), nullable=False, server_default="PRIVATE")
        )
        batch_op.add_column(sa.Column("last_updated", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("users") as batch_op:
        batch_op.add_column(
            sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("date_deleted", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "org_members",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["organizations.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("org_id", "user_id"),
    )
    with op.batch_alter_table("org_members") as batch_op:
        batch_op.create_index(batch_op.f("ix_org_members_user_id"), ["user_id"], unique=False)
    _migrate_data()


def _migrate_data() -> None:
    bind = op.get_bind()
    bind.execute(sa.text("UPDATE organizations SET full_name = name"))
    bind.execute(sa.text("UPDATE workspaces SET full_name = name"))
    # (org, user) of everyone who takes part in the organisation today.
    rows = bind.execute(
        sa.text(
            "SELECT w.org_id, p.user_id FROM participants p "
            "JOIN workspaces w ON w.id = p.workspace_id WHERE p.user_id IS NOT NULL "
            "UNION SELECT w.org_id, tm.user_id FROM participants p "
            "JOIN workspaces w ON w.id = p.workspace_id "
            "JOIN team_members tm ON tm.team_id = p.team_id "
            "UNION SELECT t.org_id, tm.user_id FROM team_members tm "
            "JOIN teams t ON t.id = tm.team_id"
        )
    ).all()
    admin = bind.execute(sa.text("SELECT id FROM users WHERE id = 1 AND user_name = 'admin'"))
    admin_id = admin.scalar()
    roles: dict[tuple[int, int], str] = {(int(o), int(u)): "member" for o, u in rows}
    if (
        admin_id is not None
        and bind.execute(sa.text("SELECT id FROM organizations WHERE id = 1")).scalar()
    ):
        roles[(1, int(admin_id))] = "owner"
    owned = {org for (org, _user), role in roles.items() if role == "owner"}
    workspace_owners = bind.execute(
        sa.text(
            "SELECT DISTINCT w.org_id, p.user_id FROM participants p "
            "JOIN workspaces w ON w.id = p.workspace_id "
            "WHERE p.user_id IS NOT NULL AND p.role = 'owner'"
        )
    ).all()
    for org_id, user_id in workspace_owners:
        if int(org_id) not in owned:
            roles[(int(org_id), int(user_id))] = "owner"
    if roles:
        bind.execute(
            sa.text(
                "INSERT INTO org_members (org_id, user_id, role, date_created) "
                "VALUES (:org_id, :user_id, :role, CURRENT_TIMESTAMP)"
            ),
            [{"org_id": o, "user_id": u, "role": r} for (o, u), r in sorted(roles.items())],
        )


def downgrade() -> None:
    with op.batch_alter_table("org_members") as batch_op:
        batch_op.drop_index(batch_op.f("ix_org_members_user_id"))
    op.drop_table("org_members")
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("date_deleted")
        batch_op.drop_column("deleted")
    with op.batch_alter_table("workspaces") as batch_op:
        for column in ("deleted", "last_updated", "visibility", "description", "full_name"):
            batch_op.drop_column(column)
    with op.batch_alter_table("organizations") as batch_op:
        for column in (
            "deleted",
            "last_updated",
            "logo_id",
            "website",
            "location",
            "description",
            "full_name",
        ):
            batch_op.drop_column(column)
