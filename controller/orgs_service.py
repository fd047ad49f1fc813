"""Organisations, their members and their workspaces (reference/studio-roles.md,
"Organisation roles"; controller.org_roles says who holds which role).

- Any user may create an organisation and becomes its owner. Owners update and delete
  it, manage its members and their roles, and create, rename and delete its workspaces
  (the creator of a workspace becomes its owner participant).
- Members and owners see the organisation, its members and collaborators, and its
  workspaces: all of them for owners, those they take part in and the SHARED ones for
  members. Collaborators see the organisation itself and their own workspaces only: its
  member lists are 403 to them (the reference's answer), another workspace is 404.
- Anyone without a role in an organisation gets 404 for all of it.
- `memberId` is the user id (unique in an organisation), as in participants and teams.
- An organisation keeps at least one owner: removing, demoting or a leave of the last
  one is 409. Names are unique (organisations globally, workspaces per organisation,
  case-insensitively): 409 naming the field.
- Deleting an organisation or a workspace with studios starting, running, stopping or
  building is 409 naming them. Otherwise its studios are deleted (kept for their
  checkpoints' garbage collection, as a deleted studio is), its participants, teams and
  members removed, and the row kept as deleted under a name no live one can take, so its
  own name is free again.
- Removing a user from an organisation removes their roles in its workspaces and teams;
  every change of roles is pushed to the affected workspaces' agents (controller.access).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.access import notify_workspaces
from controller.agent_hub import AgentHub
from controller.auth import Principal, Role, workspace_role
from controller.db import Database, escape_like
from controller.errors import BadRequest, Conflict, Forbidden, NotFound
from controller.lifecycle import Status
from controller.models import (
    Organization,
    OrgMember,
    Participant,
    Studio,
    StudioConnection,
    Team,
    TeamMember,
    User,
    Workspace,
    utcnow,
)
from controller.org_requests import (
    CreateOrganizationRequest,
    UpdateOrganizationRequest,
    UpdateWorkspaceRequest,
    WorkspaceBody,
    name_refusal,
)
from controller.org_roles import (
    MemberRow,
    OrgRole,
    check_keeps_owner,
    effective_workspace_role,
    ensure_org_member,
    org_role,
    org_role_or_404,
    require_org_role,
    user_org_ids,
)

__all__ = ["BUSY", "OrgRow", "OrgService", "OrgWorkspaceRow", "busy_studios"]

_SEES_MEMBERS = {OrgRole.OWNER, OrgRole.MEMBER}
_OWNER = {OrgRole.OWNER}
# Studios that hold resources on an agent, or are about to: deleting under them is 409.
BUSY = sorted(s.value for s in (Status.STARTING, Status.RUNNING, Status.STOPPING, Status.BUILDING))


@dataclass(frozen=True, slots=True)
class OrgRow:
    org: Organization
    role: OrgRole


@dataclass(frozen=True, slots=True)
class OrgWorkspaceRow:
    """An organisation (workspace None) or one of its workspaces, with the user's role."""

    org: Organization
    workspace: Workspace | None
    role: str


def deleted_name(name: str, row_id: int) -> str:
    """The name of a deleted row: never a valid name ('~'), unique by its id."""
    return f"~deleted~{row_id}~{name}"[:80]


async def busy_studios(session: AsyncSession, workspace_ids: Iterable[int]) -> list[Studio]:
    return list(
        (
            await session.scalars(
                select(Studio)
                .where(
                    Studio.workspace_id.in_(list(workspace_ids)),
                    Studio.deleted.is_(False),
                    Studio.status.in_(BUSY),
                )
                .order_by(Studio.session_id)
            )
        ).all()
    )


def _refuse_busy(what: str, studios: list[Studio]) -> None:
    if studios:
        named = ", ".join(f"{s.name!r} ({s.session_id}, {s.status})" for s in studios)
        raise Conflict(f"{what} has studios that are not stopped: {named}; stop them first")


async def remove_from_org(session: AsyncSession, org_id: int, user_id: int) -> set[int]:
    """Remove the user's membership, participations and team memberships in the
    organisation; the workspaces whose roles changed."""
    workspace_ids = select(Workspace.id).where(Workspace.org_id == org_id)
    team_ids = select(Team.id).where(Team.org_id == org_id)
    touched = set(
        (
            await session.scalars(
                select(Participant.workspace_id).where(
                    Participant.workspace_id.in_(workspace_ids), Participant.user_id == user_id
                )
            )
        ).all()
    )
    user_teams = select(TeamMember.team_id).where(
        TeamMember.user_id == user_id, TeamMember.team_id.in_(team_ids)
    )
    touched |= set(
        (
            await session.scalars(
                select(Participant.workspace_id).where(Participant.team_id.in_(user_teams))
            )
        ).all()
    )
    await session.execute(
        delete(Participant).where(
            Participant.workspace_id.in_(workspace_ids), Participant.user_id == user_id
        )
    )
    await session.execute(
        delete(TeamMember).where(TeamMember.user_id == user_id, TeamMember.team_id.in_(team_ids))
    )
    await session.execute(
        delete(OrgMember).where(OrgMember.org_id == org_id, OrgMember.user_id == user_id)
    )
    return touched


class OrgService:
    def __init__(self, db: Database, hub: AgentHub | None = None) -> None:
        self.db = db
        # None: nobody to tell (tools that change roles without a running controller).
        self.hub = hub

    # ------------------------------------------------------------ organisations

    @staticmethod
    async def _org_name_taken(session: AsyncSession, name: str, but: int | None = None) -> bool:
        query = select(Organization.id).where(
            func.lower(Organization.name) == name.lower(), Organization.deleted.is_(False)
        )
        if but is not None:
            query = query.where(Organization.id != but)
        return await session.scalar(query) is not None

    async def list_orgs(self, principal: Principal) -> list[OrgRow]:
        async with self.db.transaction() as session:
            rows = []
            for org_id in await user_org_ids(session, principal.user_id):
                org = await session.get(Organization, org_id)
                role = await org_role(session, principal.user_id, org_id)
                if org is not None and role is not None:
                    rows.append(OrgRow(org, role))
            return rows

    async def validate_org_name(self, name: str | None) -> None:
        if not name:
            raise BadRequest("name: a name is required")
        refusal = name_refusal(name)
        if refusal is not None:
            raise BadRequest(f"name: {refusal}")
        async with self.db.transaction() as session:
            if await self._org_name_taken(session, name):
                raise Conflict(f"name: an organization named {name!r} already exists")

    async def create_org(self, principal: Principal, body: CreateOrganizationRequest) -> OrgRow:
        given = body.organization
        async with self.db.transaction() as session:
            if await self._org_name_taken(session, given.name):
                raise Conflict(
                    f"organization.name: an organization named {given.name!r} already exists"
                )
            now = utcnow()
            org = Organization(
                name=given.name,
                full_name=given.full_name,
                description=given.description,
                location=given.location,
                website=given.website,
                logo_id=body.logo_id,
                date_created=now,
                last_updated=now,
            )
            session.add(org)
            await session.flush()
            await ensure_org_member(session, org.id, principal.user_id, OrgRole.OWNER)
            return OrgRow(org, OrgRole.OWNER)

    async def describe_org(self, principal: Principal, org_id: int) -> OrgRow:
        async with self.db.transaction() as session:
            org, role = await org_role_or_404(session, principal.user_id, org_id)
            return OrgRow(org, role)

    async def update_org(
        self, principal: Principal, org_id: int, body: UpdateOrganizationRequest
    ) -> None:
        async with self.db.transaction() as session:
            org, role = await org_role_or_404(session, principal.user_id, org_id)
            require_org_role(role, _OWNER, "update the organization")
            if body.name is not None and body.name != org.name:
                if await self._org_name_taken(session, body.name, but=org.id):
                    raise Conflict(f"name: an organization named {body.name!r} already exists")
                org.name = body.name
            for field in ("full_name", "description", "location", "website", "logo_id"):
                value = getattr(body, field)
                if value is not None:
                    setattr(org, field, value)
            org.last_updated = utcnow()

    async def delete_org(self, principal: Principal, org_id: int) -> None:
        notices: list[tuple[str | None, str]] = []
        async with self.db.transaction() as session:
            org, role = await org_role_or_404(session, principal.user_id, org_id)
            require_org_role(role, _OWNER, "delete the organization")
            workspaces = (
                await session.scalars(
                    select(Workspace)
                    .where(Workspace.org_id == org_id, Workspace.deleted.is_(False))
                    .with_for_update()
                )
            ).all()
            _refuse_busy(
                f"organization {org.name!r}",
                await busy_studios(session, [w.id for w in workspaces]),
            )
            for workspace in workspaces:
                notices += await _retire_workspace(session, workspace)
            team_ids = select(Team.id).where(Team.org_id == org_id)
            await session.execute(delete(Participant).where(Participant.team_id.in_(team_ids)))
            await session.execute(delete(TeamMember).where(TeamMember.team_id.in_(team_ids)))
            await session.execute(delete(Team).where(Team.org_id == org_id))
            await session.execute(delete(OrgMember).where(OrgMember.org_id == org_id))
            org.deleted = True
            org.name = deleted_name(org.name, org.id)
            org.last_updated = utcnow()
        self._notify_sessions(notices)

    def _notify_sessions(self, notices: list[tuple[str | None, str]]) -> None:
        if self.hub is None:
            return
        for agent_id, session_id in notices:
            self.hub.notify(agent_id, [session_id])

    # ------------------------------------------------------------ members

    async def list_members(
        self,
        principal: Principal,
        org_id: int,
        *,
        collaborators: bool,
        search: str | None,
        max_: int | None,
        offset: int,
    ) -> tuple[list[MemberRow], int]:
        """Owners and members, or (`collaborators`) the collaborators: those with a
        collaborator row and those taking part in a workspace without any row."""
        async with self.db.transaction() as session:
            _org, role = await org_role_or_404(session, principal.user_id, org_id)
            require_org_role(role, _SEES_MEMBERS, "list the organization's members")
            rows = {
                m.user_id: OrgRole(m.role)
                for m in (
                    await session.scalars(select(OrgMember).where(OrgMember.org_id == org_id))
                ).all()
            }
            if collaborators:
                wanted = {u for u, r in rows.items() if r == OrgRole.COLLABORATOR}
                teams = select(TeamMember.user_id, Participant.workspace_id).join(
                    Participant, Participant.team_id == TeamMember.team_id
                )
                workspace_ids = select(Workspace.id).where(
                    Workspace.org_id == org_id, Workspace.deleted.is_(False)
                )
                direct = await session.scalars(
                    select(Participant.user_id).where(
                        Participant.workspace_id.in_(workspace_ids),
                        Participant.user_id.is_not(None),
                    )
                )
                via_team = await session.execute(
                    teams.where(Participant.workspace_id.in_(workspace_ids))
                )
                taking_part = {u for u in direct.all() if u is not None}
                taking_part |= {int(u) for u, _w in via_team.all()}
                wanted |= {u for u in taking_part if u not in rows}
                roles = dict.fromkeys(wanted, OrgRole.COLLABORATOR)
            else:
                roles = {u: r for u, r in rows.items() if r != OrgRole.COLLABORATOR}
            query = select(User).where(User.id.in_(list(roles)), User.deleted.is_(False))
            for word in (search or "").split():
                pattern = f"%{escape_like(word.lower())}%"
                query = query.where(
                    or_(
                        func.lower(User.user_name).like(pattern, escape="\\"),
                        func.lower(User.email).like(pattern, escape="\\"),
                    )
                )
            users = (await session.scalars(query.order_by(User.id))).all()
            page = users[offset:] if max_ is None else users[offset : offset + max_]
            return [MemberRow(u, roles[u.id]) for u in page], len(users)

    @staticmethod
    async def _user_by_name_or_email(session: AsyncSession, text: str) -> User:
        user = await session.scalar(
            select(User).where(
                User.deleted.is_(False), or_(User.user_name == text, User.email == text)
            )
        )
        if user is None:
            raise NotFound(f"user {text!r} not found")
        return user

    async def add_member(self, principal: Principal, org_id: int, user_text: str) -> MemberRow:
        """A user as member; a collaborator becomes a member; an owner or member is 409."""
        async with self.db.transaction() as session:
            _org, role = await org_role_or_404(session, principal.user_id, org_id)
            require_org_role(role, _OWNER, "add members")
            user = await self._user_by_name_or_email(session, user_text)
            row = await session.get(OrgMember, (org_id, user.id))
            if row is not None and row.role != OrgRole.COLLABORATOR.value:
                raise Conflict(
                    f"user: {user.user_name!r} is already a {row.role} of the organization"
                )
            if row is None:
                row = await ensure_org_member(session, org_id, user.id, OrgRole.MEMBER)
            row.role = OrgRole.MEMBER.value
            return MemberRow(user, OrgRole.MEMBER)

    async def _member(self, session: AsyncSession, org_id: int, member_id: int) -> OrgMember:
        """The membership row of `member_id`: one is written for an implicit collaborator."""
        user = await session.get(User, member_id)
        role = await org_role(session, member_id, org_id)
        if user is None or user.deleted or role is None:
            raise NotFound(f"member {member_id} of organization {org_id} not found")
        return await ensure_org_member(session, org_id, member_id, role)

    async def delete_member(self, principal: Principal, org_id: int, member_id: int) -> None:
        async with self.db.transaction() as session:
            _org, role = await org_role_or_404(session, principal.user_id, org_id)
            require_org_role(role, _OWNER, "remove members")
            await self._member(session, org_id, member_id)
            await check_keeps_owner(session, org_id, member_id)
            touched = await remove_from_org(session, org_id, member_id)
        await notify_workspaces(self.db, self.hub, touched)

    async def leave(self, principal: Principal, org_id: int) -> None:
        async with self.db.transaction() as session:
            await org_role_or_404(session, principal.user_id, org_id)
            await check_keeps_owner(session, org_id, principal.user_id)
            touched = await remove_from_org(session, org_id, principal.user_id)
        await notify_workspaces(self.db, self.hub, touched)

    async def update_member_role(
        self, principal: Principal, org_id: int, member_id: int, new_role: str
    ) -> None:
        wanted = OrgRole(new_role)
        async with self.db.transaction() as session:
            _org, role = await org_role_or_404(session, principal.user_id, org_id)
            require_org_role(role, _OWNER, "change the role of members")
            row = await self._member(session, org_id, member_id)
            if wanted != OrgRole.OWNER:
                await check_keeps_owner(session, org_id, member_id)
            # No agent needs telling: an organisation role reaches workspace participants
            # and settings, never the connect lists (controller.org_roles).
            row.role = wanted.value

    # ------------------------------------------------------------ workspaces

    @staticmethod
    async def _workspace_name_taken(
        session: AsyncSession, org_id: int, name: str, but: int | None = None
    ) -> bool:
        query = select(Workspace.id).where(
            Workspace.org_id == org_id,
            func.lower(Workspace.name) == name.lower(),
            Workspace.deleted.is_(False),
        )
        if but is not None:
            query = query.where(Workspace.id != but)
        return await session.scalar(query) is not None

    @staticmethod
    async def _visible(
        session: AsyncSession, principal: Principal, workspace: Workspace, role: OrgRole
    ) -> Role | None:
        """The caller's workspace role (owner for organisation owners; view for members
        in a SHARED workspace they take no part in); None when they may not see it."""
        wsp_role = await effective_workspace_role(session, principal.user_id, workspace)
        if wsp_role is not None:
            return wsp_role
        if role == OrgRole.MEMBER and workspace.visibility == "SHARED":
            return Role.VIEW
        return None

    async def _workspace(
        self, session: AsyncSession, principal: Principal, org_id: int, workspace_id: int
    ) -> tuple[Workspace, OrgRole, Role]:
        missing = NotFound(f"workspace {workspace_id} of organization {org_id} not found")
        _org, role = await org_role_or_404(session, principal.user_id, org_id)
        workspace = await session.get(Workspace, workspace_id)
        if workspace is None or workspace.org_id != org_id or workspace.deleted:
            raise missing
        wsp_role = await self._visible(session, principal, workspace, role)
        if wsp_role is None:
            raise missing
        return workspace, role, wsp_role

    async def list_workspaces(self, principal: Principal, org_id: int) -> list[Workspace]:
        async with self.db.transaction() as session:
            _org, role = await org_role_or_404(session, principal.user_id, org_id)
            workspaces = (
                await session.scalars(
                    select(Workspace)
                    .where(Workspace.org_id == org_id, Workspace.deleted.is_(False))
                    .order_by(Workspace.id)
                )
            ).all()
            return [w for w in workspaces if await self._visible(session, principal, w, role)]

    async def validate_workspace_name(
        self, principal: Principal, org_id: int, name: str | None
    ) -> None:
        async with self.db.transaction() as session:
            _org, role = await org_role_or_404(session, principal.user_id, org_id)
            require_org_role(role, _SEES_MEMBERS, "validate workspace names")
            if not name:
                raise BadRequest("name: a name is required")
            refusal = name_refusal(name)
            if refusal is not None:
                raise BadRequest(f"name: {refusal}")
            if await self._workspace_name_taken(session, org_id, name):
                raise Conflict(f"name: a workspace named {name!r} already exists")

    async def create_workspace(
        self, principal: Principal, org_id: int, body: WorkspaceBody
    ) -> Workspace:
        async with self.db.transaction() as session:
            _org, role = await org_role_or_404(session, principal.user_id, org_id)
            require_org_role(role, _OWNER, "create workspaces")
            if await self._workspace_name_taken(session, org_id, body.name):
                raise Conflict(f"workspace.name: a workspace named {body.name!r} already exists")
            now = utcnow()
            workspace = Workspace(
                org_id=org_id,
                name=body.name,
                full_name=body.full_name,
                description=body.description,
                visibility=body.visibility,
                date_created=now,
                last_updated=now,
            )
            session.add(workspace)
            await session.flush()
            # The creator takes part as owner, so the studios of it are theirs to use.
            session.add(
                Participant(
                    workspace_id=workspace.id,
                    user_id=principal.user_id,
                    role=Role.OWNER.value,
                    date_created=now,
                )
            )
            return workspace

    async def describe_workspace(
        self, principal: Principal, org_id: int, workspace_id: int
    ) -> Workspace:
        async with self.db.transaction() as session:
            workspace, _role, _wsp_role = await self._workspace(
                session, principal, org_id, workspace_id
            )
            return workspace

    async def update_workspace(
        self, principal: Principal, org_id: int, workspace_id: int, body: UpdateWorkspaceRequest
    ) -> Workspace:
        """Organisation owners and the workspace's owners."""
        async with self.db.transaction() as session:
            workspace, _role, wsp_role = await self._workspace(
                session, principal, org_id, workspace_id
            )
            if wsp_role != Role.OWNER:
                raise Forbidden(
                    f"role '{wsp_role}' may not update the workspace (needs an owner of it "
                    "or of the organization)"
                )
            if body.name is not None and body.name != workspace.name:
                if await self._workspace_name_taken(session, org_id, body.name, but=workspace.id):
                    raise Conflict(f"name: a workspace named {body.name!r} already exists")
                workspace.name = body.name
            for field in ("full_name", "description", "visibility"):
                value = getattr(body, field)
                if value is not None:
                    setattr(workspace, field, value)
            workspace.last_updated = utcnow()
            return workspace

    async def delete_workspace(self, principal: Principal, org_id: int, workspace_id: int) -> None:
        async with self.db.transaction() as session:
            workspace, role, _wsp_role = await self._workspace(
                session, principal, org_id, workspace_id
            )
            require_org_role(role, _OWNER, "delete workspaces")
            _refuse_busy(
                f"workspace {workspace.name!r}", await busy_studios(session, [workspace.id])
            )
            notices = await _retire_workspace(session, workspace)
        self._notify_sessions(notices)

    # ------------------------------------------------------------ a user's workspaces

    async def user_workspaces(self, principal: Principal, user_id: int) -> list[OrgWorkspaceRow]:
        """The caller's organisations and workspaces (another user's: 403)."""
        if user_id != principal.user_id:
            raise Forbidden("only your own organizations and workspaces can be listed")
        async with self.db.transaction() as session:
            rows: list[OrgWorkspaceRow] = []
            for org_id in await user_org_ids(session, user_id):
                org = await session.get(Organization, org_id)
                role = await org_role(session, user_id, org_id)
                if org is None or role is None:
                    continue
                rows.append(OrgWorkspaceRow(org, None, role.value))
                workspaces = (
                    await session.scalars(
                        select(Workspace)
                        .where(Workspace.org_id == org_id, Workspace.deleted.is_(False))
                        .order_by(Workspace.id)
                    )
                ).all()
                for workspace in workspaces:
                    wsp_role = await workspace_role(session, user_id, workspace.id)
                    if wsp_role is None and role == OrgRole.OWNER:
                        wsp_role = Role.OWNER
                    if wsp_role is not None:
                        rows.append(OrgWorkspaceRow(org, workspace, wsp_role.value))
            return rows


async def _retire_workspace(
    session: AsyncSession, workspace: Workspace
) -> list[tuple[str | None, str]]:
    """Delete a workspace with no busy studio: its studios are deleted (kept, as a deleted
    studio is), its participants removed; (agent, session) of studios to tell agents."""
    notices = []
    now = utcnow()
    for studio in (
        await session.scalars(
            select(Studio).where(Studio.workspace_id == workspace.id, Studio.deleted.is_(False))
        )
    ).all():
        studio.deleted = True
        studio.date_deleted = now
        studio.desired_status = "deleted"
        notices.append((studio.agent_id, studio.session_id))
    await session.execute(delete(Participant).where(Participant.workspace_id == workspace.id))
    # The connection audit lives as long as its workspace (visits still open are
    # refused when they close: the workspace is gone).
    await session.execute(
        delete(StudioConnection).where(StudioConnection.workspace_id == workspace.id)
    )
    workspace.deleted = True
    workspace.name = deleted_name(workspace.name, workspace.id)
    workspace.last_updated = now
    return notices
