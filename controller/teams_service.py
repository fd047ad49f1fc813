"""Teams of an organisation (reference/studio-roles.md, "Organisation roles").

A team carries its workspace role into every workspace it takes part in, so only owners
of the organisation create, rename and delete teams and change who is in them (a
workspace admin would otherwise grant herself the team's role in another workspace).
Owners and members see the teams, their members and their workspaces; collaborators get
403 (the reference's answer), anyone outside the organisation 404. Adding a team to a
workspace, and its role there, are the workspace's participants (controller.workspaces_service).

`memberId` of a team member is the user id. A user added to a team who is not in the
organisation yet becomes a member of it. Names follow the reference's pattern and are
unique per organisation (case-insensitively; 409 naming the field). Every change of who
is in a team, or a team's deletion, is pushed to the agents of the workspaces it takes
part in (controller.access).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.access import notify_team_workspaces, notify_workspaces, team_workspaces
from controller.agent_hub import AgentHub
from controller.auth import Principal
from controller.db import Database, escape_like
from controller.errors import BadRequest, Conflict, NotFound
from controller.models import (
    Organization,
    OrgMember,
    Participant,
    Team,
    TeamMember,
    User,
    Workspace,
)
from controller.org_requests import TeamBody, UpdateTeamRequest, name_refusal
from controller.org_roles import (
    MemberRow,
    OrgRole,
    ensure_org_member,
    org_role_or_404,
    require_org_role,
)

__all__ = ["TeamRow", "TeamService", "TeamWorkspaceRow"]

_SEES_TEAMS = {OrgRole.OWNER, OrgRole.MEMBER}
_OWNER = {OrgRole.OWNER}


@dataclass(frozen=True, slots=True)
class TeamRow:
    team: Team
    members_count: int


@dataclass(frozen=True, slots=True)
class TeamWorkspaceRow:
    participant: Participant
    workspace: Workspace
    org_name: str


class TeamService:
    def __init__(self, db: Database, hub: AgentHub | None = None) -> None:
        self.db = db
        self.hub = hub

    @staticmethod
    async def _team(
        session: AsyncSession, org_id: int, team_id: int, *, for_update: bool = False
    ) -> Team:
        team = await session.get(Team, team_id, with_for_update=for_update or None)
        if team is None or team.org_id != org_id:
            raise NotFound(f"team {team_id} of organization {org_id} not found")
        return team

    @staticmethod
    async def _row(session: AsyncSession, team: Team) -> TeamRow:
        count = await session.scalar(
            select(func.count()).select_from(TeamMember).where(TeamMember.team_id == team.id)
        )
        return TeamRow(team, int(count or 0))

    @staticmethod
    async def _name_taken(
        session: AsyncSession, org_id: int, name: str, but: int | None = None
    ) -> bool:
        query = select(Team.id).where(Team.org_id == org_id, func.lower(Team.name) == name.lower())
        if but is not None:
            query = query.where(Team.id != but)
        return await session.scalar(query) is not None

    async def _caller(
        self, session: AsyncSession, principal: Principal, org_id: int, allowed: set[OrgRole]
    ) -> Organization:
        """The organisation, once the caller's role in it allows `allowed`."""
        org, role = await org_role_or_404(session, principal.user_id, org_id)
        require_org_role(
            role, allowed, "manage teams" if allowed == _OWNER else "see the organization's teams"
        )
        return org

    async def list_teams(
        self,
        principal: Principal,
        org_id: int,
        search: str | None,
        max_: int | None,
        offset: int,
    ) -> tuple[list[TeamRow], int]:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _SEES_TEAMS)
            query = select(Team).where(Team.org_id == org_id)
            for word in (search or "").split():
                pattern = f"%{escape_like(word.lower())}%"
                query = query.where(func.lower(Team.name).like(pattern, escape="\\"))
            teams = (await session.scalars(query.order_by(Team.name, Team.id))).all()
            page = teams[offset:] if max_ is None else teams[offset : offset + max_]
            return [await self._row(session, t) for t in page], len(teams)

    async def validate_name(self, principal: Principal, org_id: int, name: str | None) -> None:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _SEES_TEAMS)
            if not name:
                raise BadRequest("name: a name is required")
            refusal = name_refusal(name)
            if refusal is not None:
                raise BadRequest(f"name: {refusal}")
            if await self._name_taken(session, org_id, name):
                # The reference lists no 409 here: a taken name is not valid.
                raise BadRequest(f"name: a team named {name!r} already exists")

    async def create_team(self, principal: Principal, org_id: int, body: TeamBody) -> TeamRow:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _OWNER)
            if await self._name_taken(session, org_id, body.name):
                raise Conflict(f"team.name: a team named {body.name!r} already exists")
            team = Team(org_id=org_id, name=body.name, description=body.description)
            session.add(team)
            await session.flush()
            return await self._row(session, team)

    async def describe_team(self, principal: Principal, org_id: int, team_id: int) -> TeamRow:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _SEES_TEAMS)
            return await self._row(session, await self._team(session, org_id, team_id))

    async def update_team(
        self, principal: Principal, org_id: int, team_id: int, body: UpdateTeamRequest
    ) -> None:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _OWNER)
            team = await self._team(session, org_id, team_id, for_update=True)
            if body.name is not None and body.name != team.name:
                if await self._name_taken(session, org_id, body.name, but=team.id):
                    raise Conflict(f"name: a team named {body.name!r} already exists")
                team.name = body.name
            if body.description is not None:
                team.description = body.description

    async def delete_team(self, principal: Principal, org_id: int, team_id: int) -> None:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _OWNER)
            team = await self._team(session, org_id, team_id, for_update=True)
            touched = await team_workspaces(session, team.id)
            await session.execute(delete(Participant).where(Participant.team_id == team.id))
            await session.execute(delete(TeamMember).where(TeamMember.team_id == team.id))
            await session.delete(team)
        await notify_workspaces(self.db, self.hub, touched)

    async def list_members(
        self,
        principal: Principal,
        org_id: int,
        team_id: int,
        search: str | None,
        max_: int | None,
        offset: int,
    ) -> tuple[list[MemberRow], int]:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _SEES_TEAMS)
            team = await self._team(session, org_id, team_id)
            query = (
                select(User, OrgMember.role)
                .join(TeamMember, TeamMember.user_id == User.id)
                .outerjoin(OrgMember, (OrgMember.user_id == User.id) & (OrgMember.org_id == org_id))
                .where(TeamMember.team_id == team.id)
            )
            for word in (search or "").split():
                pattern = f"%{escape_like(word.lower())}%"
                query = query.where(
                    or_(
                        func.lower(User.user_name).like(pattern, escape="\\"),
                        func.lower(User.email).like(pattern, escape="\\"),
                    )
                )
            rows = (await session.execute(query.order_by(User.id))).all()
            page = rows[offset:] if max_ is None else rows[offset : offset + max_]
            return [
                MemberRow(user, OrgRole(role or OrgRole.COLLABORATOR.value)) for user, role in page
            ], len(rows)

    async def add_member(
        self, principal: Principal, org_id: int, team_id: int, user_name_or_email: str
    ) -> MemberRow:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _OWNER)
            # Locked: a concurrent change of the team waits.
            team = await self._team(session, org_id, team_id, for_update=True)
            user = await session.scalar(
                select(User).where(
                    User.deleted.is_(False),
                    or_(User.user_name == user_name_or_email, User.email == user_name_or_email),
                )
            )
            if user is None:
                raise NotFound(f"user {user_name_or_email!r} not found")
            if await session.scalar(
                select(TeamMember.id).where(
                    TeamMember.team_id == team.id, TeamMember.user_id == user.id
                )
            ):
                raise Conflict(f"userNameOrEmail: {user.user_name!r} is already in the team")
            member = await ensure_org_member(session, org_id, user.id, OrgRole.MEMBER)
            session.add(TeamMember(team_id=team.id, user_id=user.id))
            added = MemberRow(user, OrgRole(member.role))
        await notify_team_workspaces(self.db, self.hub, team_id)
        return added

    async def remove_member(
        self, principal: Principal, org_id: int, team_id: int, member_id: int
    ) -> None:
        async with self.db.transaction() as session:
            await self._caller(session, principal, org_id, _OWNER)
            team = await self._team(session, org_id, team_id, for_update=True)
            row = await session.scalar(
                select(TeamMember).where(
                    TeamMember.team_id == team.id, TeamMember.user_id == member_id
                )
            )
            if row is None:
                raise NotFound(f"member {member_id} of team {team_id} not found")
            await session.delete(row)
        await notify_team_workspaces(self.db, self.hub, team_id)

    async def workspaces(
        self,
        principal: Principal,
        org_id: int,
        team_id: int,
        search: str | None,
        max_: int | None,
        offset: int,
    ) -> tuple[list[TeamWorkspaceRow], int]:
        async with self.db.transaction() as session:
            org = await self._caller(session, principal, org_id, _SEES_TEAMS)
            team = await self._team(session, org_id, team_id)
            query = (
                select(Participant, Workspace)
                .join(Workspace, Workspace.id == Participant.workspace_id)
                .where(Participant.team_id == team.id, Workspace.deleted.is_(False))
            )
            for word in (search or "").split():
                pattern = f"%{escape_like(word.lower())}%"
                query = query.where(func.lower(Workspace.name).like(pattern, escape="\\"))
            rows = (await session.execute(query.order_by(Workspace.id))).all()
            page = rows[offset:] if max_ is None else rows[offset : offset + max_]
            return [TeamWorkspaceRow(p, w, org.name) for p, w in page], len(rows)
