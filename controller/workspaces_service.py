"""Organisations, workspaces, teams and participants: who holds which role.

A participant is a user (type MEMBER, `memberId` = the user id) or a team
(type TEAM) with a role in a workspace; a team's role applies to each of its
members, and a user's role is the highest of the two (`controller.auth`).

Rules on top of studio-roles.md ("add, remove participants, change their
role": maintain and above): nobody grants a role above their own or changes
or removes a participant whose role is above their own (403), and a
workspace keeps at least one owner among its user participants (400). New
participants get `launch`, as in Seqera Platform. Owners of the workspace's
organisation act as its owners here (reference/studio-roles.md, "Organisation
roles"); a user added who is not in the organisation becomes a collaborator of
it. Teams themselves, and who is in them, are the organisation owners'
(`controller.teams_service`).
Anything of a workspace the caller has no role in is 404.

Every change of who holds which role pushes a fresh desired state to the
agents of the affected workspaces' active sessions (`controller.access`), so
a connect access list narrows (or widens) within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.access import notify_workspaces
from controller.agent_hub import AgentHub
from controller.auth import Permission, Principal, Role, require
from controller.db import Database, escape_like
from controller.errors import BadRequest, Conflict, Forbidden, NotFound
from controller.models import Participant, Team, User, Workspace, utcnow
from controller.org_roles import OrgRole, effective_workspace_role, ensure_org_member, org_role
from controller.requests import AddParticipantRequest, DataStudioWorkspaceSettingsRequest

__all__ = ["NEW_PARTICIPANT_ROLE", "ParticipantRow", "WorkspaceService"]

NEW_PARTICIPANT_ROLE = Role.LAUNCH


@dataclass(frozen=True, slots=True)
class ParticipantRow:
    """A participant and who it is: a team, or a user (None if since deleted)."""

    participant: Participant
    team: Team | None = None
    user: User | None = None
    # The user's role in the workspace's organisation (None for a team or a gone user).
    org_role: OrgRole | None = None


class WorkspaceService:
    def __init__(self, db: Database, hub: AgentHub | None = None) -> None:
        self.db = db
        # None: nobody to tell (tools that change roles without a running controller).
        self.hub = hub

    # ------------------------------------------------------------ helpers

    @staticmethod
    async def _workspace(
        session: AsyncSession, principal: Principal, org_id: int, workspace_id: int
    ) -> tuple[Workspace, Role]:
        missing = f"workspace {workspace_id} of organization {org_id} not found"
        workspace = await session.get(Workspace, workspace_id)
        if workspace is None or workspace.org_id != org_id:
            raise NotFound(missing)
        role = await effective_workspace_role(session, principal.user_id, workspace)
        if role is None:
            raise NotFound(missing)
        return workspace, role

    @staticmethod
    async def _participant(
        session: AsyncSession, workspace_id: int, participant_id: int
    ) -> Participant:
        row = await session.get(Participant, participant_id, with_for_update=True)
        if row is None or row.workspace_id != workspace_id:
            raise NotFound(f"participant {participant_id} not found")
        return row

    @staticmethod
    async def _check_keeps_owner(session: AsyncSession, row: Participant) -> None:
        """BadRequest if `row` is the workspace's last owner among user participants."""
        if row.role != Role.OWNER.value or row.user_id is None:
            return
        owners = await session.scalar(
            select(func.count())
            .select_from(Participant)
            .where(
                Participant.workspace_id == row.workspace_id,
                Participant.role == Role.OWNER.value,
                Participant.user_id.is_not(None),
            )
        )
        if (owners or 0) <= 1:
            raise BadRequest("a workspace must keep at least one owner")

    @staticmethod
    def _check_above(caller: Role, target: Role, what: str) -> None:
        if target.rank > caller.rank:
            raise Forbidden(f"role '{caller}' may not {what} a participant with role '{target}'")

    @staticmethod
    async def _row(session: AsyncSession, row: Participant) -> ParticipantRow:
        if row.team_id is not None:
            return ParticipantRow(row, team=await session.get(Team, row.team_id))
        user = await session.get(User, row.user_id or -1)
        workspace = await session.get(Workspace, row.workspace_id)
        role = (
            await org_role(session, user.id, workspace.org_id)
            if user is not None and workspace is not None
            else None
        )
        return ParticipantRow(row, user=user, org_role=role)

    # ------------------------------------------------------------ participants

    async def list_participants(
        self,
        principal: Principal,
        org_id: int,
        workspace_id: int,
        search: str | None,
        max_: int | None,
        offset: int,
    ) -> tuple[list[ParticipantRow], int]:
        async with self.db.transaction() as session:
            await self._workspace(session, principal, org_id, workspace_id)
            query = (
                select(Participant)
                .outerjoin(User, User.id == Participant.user_id)
                .outerjoin(Team, Team.id == Participant.team_id)
                .where(Participant.workspace_id == workspace_id)
            )
            for word in (search or "").split():
                pattern = f"%{escape_like(word.lower())}%"
                query = query.where(
                    or_(
                        func.lower(User.user_name).like(pattern, escape="\\"),
                        func.lower(User.email).like(pattern, escape="\\"),
                        func.lower(Team.name).like(pattern, escape="\\"),
                    )
                )
            total = await session.scalar(
                select(func.count()).select_from(query.with_only_columns(Participant.id).subquery())
            )
            query = query.order_by(Participant.id).offset(offset)
            if max_ is not None:
                query = query.limit(max_)
            rows = (await session.scalars(query)).all()
            return [await self._row(session, r) for r in rows], int(total or 0)

    async def add_participant(
        self, principal: Principal, org_id: int, workspace_id: int, body: AddParticipantRequest
    ) -> ParticipantRow:
        given = [
            v for v in (body.member_id, body.team_id, body.user_name_or_email) if v is not None
        ]
        if len(given) != 1:
            raise BadRequest("give exactly one of memberId, teamId and userNameOrEmail")
        try:
            async with self.db.transaction() as session:
                _workspace, role = await self._workspace(session, principal, org_id, workspace_id)
                require(role, Permission.PARTICIPANTS)
                row = Participant(workspace_id=workspace_id, role=NEW_PARTICIPANT_ROLE.value)
                if body.team_id is not None:
                    # Locked: a concurrent change of the team's members waits (their
                    # check reads the workspaces the team takes part in).
                    team = await session.get(Team, body.team_id, with_for_update=True)
                    if team is None or team.org_id != org_id:
                        raise NotFound(f"team {body.team_id} not found")
                    taken = Participant.team_id == team.id
                    row.team_id = team.id
                else:
                    if body.member_id is not None:
                        user = await session.get(User, body.member_id)
                    else:
                        user = await session.scalar(
                            select(User).where(
                                or_(
                                    User.user_name == body.user_name_or_email,
                                    User.email == body.user_name_or_email,
                                )
                            )
                        )
                    if user is None or user.deleted:
                        raise NotFound("user not found")
                    taken = Participant.user_id == user.id
                    row.user_id = user.id
                    # Someone from outside the organisation takes part as a collaborator.
                    await ensure_org_member(session, org_id, user.id, OrgRole.COLLABORATOR)
                exists = await session.scalar(
                    select(Participant.id).where(Participant.workspace_id == workspace_id, taken)
                )
                if exists is not None:
                    raise Conflict("already a participant of the workspace")
                row.date_created = utcnow()
                session.add(row)
                await session.flush()
                added = await self._row(session, row)
        except IntegrityError:
            raise Conflict("already a participant of the workspace") from None
        # A new role can widen who may connect (agents refuse users not listed).
        await notify_workspaces(self.db, self.hub, [workspace_id])
        return added

    async def delete_participant(
        self, principal: Principal, org_id: int, workspace_id: int, participant_id: int
    ) -> None:
        async with self.db.transaction() as session:
            _workspace, role = await self._workspace(session, principal, org_id, workspace_id)
            require(role, Permission.PARTICIPANTS)
            row = await self._participant(session, workspace_id, participant_id)
            self._check_above(role, Role(row.role), "remove")
            await self._check_keeps_owner(session, row)
            await session.delete(row)
        await notify_workspaces(self.db, self.hub, [workspace_id])

    async def update_role(
        self,
        principal: Principal,
        org_id: int,
        workspace_id: int,
        participant_id: int,
        role_text: str,
    ) -> None:
        new_role = Role.parse(role_text)
        async with self.db.transaction() as session:
            _workspace, role = await self._workspace(session, principal, org_id, workspace_id)
            require(role, Permission.PARTICIPANTS)
            row = await self._participant(session, workspace_id, participant_id)
            self._check_above(role, Role(row.role), "change the role of")
            if new_role.rank > role.rank:
                raise Forbidden(f"role '{role}' may not grant the role '{new_role}'")
            if new_role != Role.OWNER:
                await self._check_keeps_owner(session, row)
            row.role = new_role.value
        await notify_workspaces(self.db, self.hub, [workspace_id])

    async def leave(self, principal: Principal, org_id: int, workspace_id: int) -> None:
        async with self.db.transaction() as session:
            await self._workspace(session, principal, org_id, workspace_id)
            row = await session.scalar(
                select(Participant).where(
                    Participant.workspace_id == workspace_id,
                    Participant.user_id == principal.user_id,
                )
            )
            if row is None:
                raise BadRequest("you take part in this workspace through a team only")
            await self._check_keeps_owner(session, row)
            await session.delete(row)
        await notify_workspaces(self.db, self.hub, [workspace_id])

    # ------------------------------------------------------------ settings

    async def studio_settings(
        self, principal: Principal, org_id: int, workspace_id: int
    ) -> Workspace:
        async with self.db.transaction() as session:
            workspace, role = await self._workspace(session, principal, org_id, workspace_id)
            require(role, Permission.READ)
            return workspace

    async def update_studio_settings(
        self,
        principal: Principal,
        org_id: int,
        workspace_id: int,
        body: DataStudioWorkspaceSettingsRequest,
    ) -> None:
        async with self.db.transaction() as session:
            workspace, role = await self._workspace(session, principal, org_id, workspace_id)
            require(role, Permission.SETTINGS)
            if body.lifespan_hours is not None:
                workspace.lifespan_hours = body.lifespan_hours
            if body.private_studio_by_default is not None:
                workspace.private_studio_by_default = body.private_studio_by_default
