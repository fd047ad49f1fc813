"""Organisation roles (reference/studio-roles.md, "Organisation roles").

owner, member, collaborator. A user's role is their `org_members` row; a user without
one who takes part in a workspace of the organisation (directly or through a team) is a
collaborator of it, since that is what Seqera calls a participant from outside the
organisation (and rows written before organisations had members stay meaningful).
Anyone else has no role and is told nothing of the organisation (404).

Owners hold the owner role in every live workspace of their organisation for
participants and settings (`effective_workspace_role`); the studios themselves still
follow the workspace's participants (`controller.auth`), so an organisation owner is
not silently added to every private studio's connect list.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.auth import Role, workspace_role
from controller.errors import Conflict, Forbidden, NotFound
from controller.models import (
    Organization,
    OrgMember,
    Participant,
    TeamMember,
    User,
    Workspace,
    utcnow,
)

__all__ = [
    "MemberRow",
    "OrgRole",
    "check_keeps_owner",
    "effective_workspace_role",
    "ensure_org_member",
    "org_role",
    "org_role_or_404",
    "require_org_role",
    "user_org_ids",
]


class OrgRole(StrEnum):
    OWNER = "owner"
    MEMBER = "member"
    COLLABORATOR = "collaborator"


@dataclass(frozen=True, slots=True)
class MemberRow:
    """A user and their role in an organisation (its members, a team's members)."""

    user: User
    role: OrgRole


async def org_role(session: AsyncSession, user_id: int, org_id: int) -> OrgRole | None:
    """The user's role in the live organisation `org_id`; None when they have none."""
    org = await session.get(Organization, org_id)
    if org is None or org.deleted:
        return None
    row = await session.get(OrgMember, (org_id, user_id))
    if row is not None:
        return OrgRole(row.role)
    teams = select(TeamMember.team_id).where(TeamMember.user_id == user_id)
    taking_part = await session.scalar(
        select(Participant.id)
        .join(Workspace, Workspace.id == Participant.workspace_id)
        .where(
            Workspace.org_id == org_id,
            Workspace.deleted.is_(False),
            (Participant.user_id == user_id) | Participant.team_id.in_(teams),
        )
        .limit(1)
    )
    return OrgRole.COLLABORATOR if taking_part is not None else None


async def org_role_or_404(
    session: AsyncSession, user_id: int, org_id: int
) -> tuple[Organization, OrgRole]:
    """The organisation and the caller's role in it; NotFound for anyone without one."""
    role = await org_role(session, user_id, org_id)
    org = await session.get(Organization, org_id)
    if role is None or org is None:
        raise NotFound(f"organization {org_id} not found")
    return org, role


def require_org_role(role: OrgRole, allowed: set[OrgRole], what: str) -> None:
    """Forbidden unless `role` is one of `allowed` (the reference answers 403 here)."""
    if role not in allowed:
        names = " or ".join(sorted(r.value for r in allowed))
        raise Forbidden(f"organization role '{role}' may not {what} (needs {names})")


async def ensure_org_member(
    session: AsyncSession, org_id: int, user_id: int, role: OrgRole
) -> OrgMember:
    """The user's membership row, created with `role` when they have none."""
    row = await session.get(OrgMember, (org_id, user_id))
    if row is None:
        row = OrgMember(org_id=org_id, user_id=user_id, role=role.value, date_created=utcnow())
        session.add(row)
        await session.flush()
    return row


async def check_keeps_owner(session: AsyncSession, org_id: int, user_id: int) -> None:
    """Conflict when `user_id` is the organisation's last owner (it would have none)."""
    owners = (
        await session.scalars(
            select(OrgMember.user_id).where(
                OrgMember.org_id == org_id, OrgMember.role == OrgRole.OWNER.value
            )
        )
    ).all()
    if list(owners) == [user_id]:
        raise Conflict(f"user {user_id} is the last owner of organization {org_id}")


async def effective_workspace_role(
    session: AsyncSession, user_id: int, workspace: Workspace
) -> Role | None:
    """The user's workspace role for participants and settings: their own (direct or
    team) role, or owner for an owner of the workspace's organisation."""
    if workspace.deleted:
        return None
    role = await workspace_role(session, user_id, workspace.id)
    member = await session.get(OrgMember, (workspace.org_id, user_id))
    if member is not None and member.role == OrgRole.OWNER.value:
        return Role.OWNER
    return role


async def user_org_ids(session: AsyncSession, user_id: int) -> list[int]:
    """The live organisations where the user has a role (member row or participation)."""
    teams = select(TeamMember.team_id).where(TeamMember.user_id == user_id)
    via_rows = select(OrgMember.org_id).where(OrgMember.user_id == user_id)
    via_participation = (
        select(Workspace.org_id)
        .join(Participant, Participant.workspace_id == Workspace.id)
        .where(
            Workspace.deleted.is_(False),
            (Participant.user_id == user_id) | Participant.team_id.in_(teams),
        )
    )
    ids = (
        await session.scalars(
            select(Organization.id)
            .where(
                Organization.deleted.is_(False),
                Organization.id.in_(via_rows) | Organization.id.in_(via_participation),
            )
            .order_by(Organization.id)
        )
    ).all()
    return list(ids)
