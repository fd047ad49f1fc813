"""The caller's own account: who they are, and their API tokens.

Tokens are the caller's own: listed without their value, created with the
value returned once (only its sha256 is stored), deleted by id (another
user's token is as missing as one that never existed). Names are unique per
user (409). Results are rows; `controller.web_users` gives them their REST
shape.

Other users (`/users/{userId}`): a user sees themselves and the users of the
organisations where they are owner or member (anyone else: 404). A user is
deleted by themselves or by an owner of every organisation they belong to
(403 otherwise; the last owner of an organisation: 409). Deletion removes, in
one transaction, their tokens (so neither API nor sign-in cookie works), their
organisation memberships, team memberships and participant roles; the row stays
(studios and checkpoints name their creator) marked deleted. Their starting and
running studios are stopped as a lifespan expiry stops them (the agent writes a
final checkpoint) and kept; their private studios stay private to them, so
nobody connects until an admin of the workspace deletes them. The agents of
every workspace whose roles changed get a fresh desired state at once
(`controller.access`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller import lifecycle
from controller.access import notify_workspaces
from controller.agent_hub import AgentHub
from controller.auth import Principal, hash_token, new_token
from controller.db import Database
from controller.errors import Conflict, Forbidden, NotFound
from controller.lifecycle import Status
from controller.models import ApiToken, OrgMember, Participant, Studio, TeamMember, User, utcnow
from controller.org_roles import OrgRole, check_keeps_owner, org_role, user_org_ids
from controller.orgs_service import remove_from_org

__all__ = ["NewToken", "UserService", "UserSummary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UserSummary:
    user: User
    # The lowest-numbered workspace the user takes part in (directly or through
    # a team); None for a user of no workspace.
    default_workspace_id: int | None


@dataclass(frozen=True, slots=True)
class NewToken:
    token: ApiToken
    # The bearer value, shown to its owner this once; kept out of the repr.
    value: str = field(repr=False)


class UserService:
    def __init__(self, db: Database, hub: AgentHub | None = None) -> None:
        self.db = db
        # None: nobody to tell (tools without a running controller).
        self.hub = hub

    async def describe(self, principal: Principal) -> UserSummary:
        async with self.db.transaction() as session:
            user = await session.get(User, principal.user_id)
            assert user is not None  # authenticated a moment ago
            teams = select(TeamMember.team_id).where(TeamMember.user_id == user.id)
            default_workspace = await session.scalar(
                select(Participant.workspace_id)
                .where((Participant.user_id == user.id) | Participant.team_id.in_(teams))
                .order_by(Participant.workspace_id)
                .limit(1)
            )
            return UserSummary(user, default_workspace)

    async def tokens(self, principal: Principal) -> Sequence[ApiToken]:
        async with self.db.transaction() as session:
            return (
                await session.scalars(
                    select(ApiToken)
                    .where(ApiToken.user_id == principal.user_id)
                    .order_by(ApiToken.id)
                )
            ).all()

    async def create_token(self, principal: Principal, name: str) -> NewToken:
        value = new_token()
        async with self.db.transaction() as session:
            taken = await session.scalar(
                select(ApiToken.id).where(
                    ApiToken.user_id == principal.user_id, ApiToken.name == name
                )
            )
            if taken is not None:
                raise Conflict(f"you already have a token named {name!r}")
            token = ApiToken(
                user_id=principal.user_id,
                name=name,
                token_hash=hash_token(value),
                date_created=utcnow(),
            )
            session.add(token)
            await session.flush()
            return NewToken(token, value)

    async def delete_token(self, principal: Principal, token_id: int) -> bool:
        """False when the caller has no token `token_id`."""
        async with self.db.transaction() as session:
            token = await session.get(ApiToken, token_id)
            if token is None or token.user_id != principal.user_id:
                return False
            await session.delete(token)
            return True

    @staticmethod
    async def _sees(session: AsyncSession, caller_id: int, user_id: int) -> bool:
        """Whether the caller may see the user: themselves, or a user of an organisation
        where the caller is owner or member."""
        if caller_id == user_id:
            return True
        shared = set(await user_org_ids(session, user_id))
        for org_id in await user_org_ids(session, caller_id):
            role = await org_role(session, caller_id, org_id)
            if org_id in shared and role in (OrgRole.OWNER, OrgRole.MEMBER):
                return True
        return False

    async def describe_user(self, principal: Principal, user_id: int) -> UserSummary:
        async with self.db.transaction() as session:
            user = await session.get(User, user_id)
            if (
                user is None
                or user.deleted
                or not await self._sees(session, principal.user_id, user_id)
            ):
                raise NotFound(f"user {user_id} not found")
        if user_id == principal.user_id:
            return await self.describe(principal)
        return UserSummary(user, None)

    async def delete_user(self, principal: Principal, user_id: int) -> None:
        stopped: list[tuple[str | None, str]] = []
        async with self.db.transaction() as session:
            user = await session.get(User, user_id, with_for_update=True)
            if user is None or user.deleted:
                raise NotFound(f"user {user_id} not found")
            org_ids = await user_org_ids(session, user_id)
            if user_id != principal.user_id:
                owned = [
                    o
                    for o in org_ids
                    if await org_role(session, principal.user_id, o) == OrgRole.OWNER
                ]
                if not org_ids or owned != org_ids:
                    # Whoever does not see the user is not told that they exist.
                    if not await self._sees(session, principal.user_id, user_id):
                        raise NotFound(f"user {user_id} not found")
                    raise Forbidden(
                        f"only user {user_id} or an owner of every organization they belong "
                        "to may delete them"
                    )
            for org_id in org_ids:
                await check_keeps_owner(session, org_id, user_id)
            touched: set[int] = set()
            for org_id in org_ids:
                touched |= await remove_from_org(session, org_id, user_id)
            # Anything left outside live organisations (rows of deleted ones).
            await session.execute(delete(Participant).where(Participant.user_id == user_id))
            await session.execute(delete(TeamMember).where(TeamMember.user_id == user_id))
            await session.execute(delete(OrgMember).where(OrgMember.user_id == user_id))
            await session.execute(delete(ApiToken).where(ApiToken.user_id == user_id))
            user.deleted = True
            user.date_deleted = utcnow()
            studios = (
                await session.scalars(
                    select(Studio)
                    .where(
                        Studio.user_id == user_id,
                        Studio.deleted.is_(False),
                        Studio.status.in_([Status.STARTING.value, Status.RUNNING.value]),
                        Studio.desired_status == "running",
                    )
                    .with_for_update()
                )
            ).all()
            for studio in studios:
                # As a lifespan expiry stops it: the agent writes a final checkpoint.
                studio.desired_status = "stopped"
                studio.progress = [
                    {
                        "message": "stopping the session: its creator was deleted",
                        "status": "in-progress",
                        "warnings": [],
                    }
                ]
                lifecycle.transition(
                    studio, Status.STOPPING, message=f"its creator (user {user_id}) was deleted"
                )
                stopped.append((studio.agent_id, studio.session_id))
                touched.add(studio.workspace_id)
        log.info(
            "user %s deleted by %s; %d studio(s) stopping",
            user_id,
            principal.user_name,
            len(stopped),
        )
        # Connect lists of every workspace whose roles changed, and the stops.
        await notify_workspaces(self.db, self.hub, touched)
        if self.hub is not None:
            for agent_id, session_id in stopped:
                self.hub.notify(agent_id, [session_id])
