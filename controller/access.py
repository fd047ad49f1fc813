"""Who may use a session's connect proxy now: who `SessionDesired.access` names.

The list is the users for whom the connect endpoint would issue a token:
`auth.workspace_roles` (direct and team roles) filtered by
`auth.studio_access_denial(..., Permission.CONNECT)`, the same function
``GET /studios/{id}/connect`` checks. Agents end everyone else's connections
within seconds and refuse their cookies.

It is filled for active sessions only (starting, running, stopping): only they
have a proxy route. Any change that can alter the list (participants, roles,
team membership, a studio's privacy) calls `notify_workspaces` after its
transaction commits, so the affected agents get a fresh desired state; the
message is built from the database when sent, so it is never stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.agent_hub import AgentHub
from controller.auth import Permission, Role, studio_access_denial, workspace_roles
from controller.db import Database
from controller.lifecycle import ACTIVE, Status
from controller.models import Participant, Studio

__all__ = [
    "allowed_users",
    "connect_access",
    "notify_team_workspaces",
    "notify_workspaces",
    "team_workspaces",
]

_ACTIVE = sorted(s.value for s in ACTIVE)


def allowed_users(studio: Studio, roles: Mapping[int, Role]) -> list[int]:
    """The ids in `roles` (the workspace's users) that may connect to `studio`."""
    return sorted(
        user_id
        for user_id, role in roles.items()
        if studio_access_denial(studio, role, user_id, Permission.CONNECT) is None
    )


async def connect_access(session: AsyncSession, studios: Iterable[Studio]) -> dict[str, list[int]]:
    """{session id: users who may connect} of the active, live studios among `studios`.

    The agent-facing modules put it on the wire (`controller.desired`).
    """
    roles: dict[int, dict[int, Role]] = {}
    access: dict[str, list[int]] = {}
    for studio in studios:
        if studio.deleted or Status(studio.status) not in ACTIVE:
            continue
        if studio.workspace_id not in roles:
            roles[studio.workspace_id] = await workspace_roles(session, studio.workspace_id)
        access[studio.session_id] = allowed_users(studio, roles[studio.workspace_id])
    return access


async def notify_workspaces(
    db: Database, hub: AgentHub | None, workspace_ids: Iterable[int]
) -> None:
    """Queue a desired-state update of every active session of the workspaces.

    Call after the change committed: the stream writer reads the database.
    """
    wanted = set(workspace_ids)
    if hub is None or not wanted:
        return
    async with db.transaction() as session:
        rows = (
            await session.execute(
                select(Studio.agent_id, Studio.session_id).where(
                    Studio.workspace_id.in_(wanted),
                    Studio.deleted.is_(False),
                    Studio.agent_id.is_not(None),
                    Studio.status.in_(_ACTIVE),
                )
            )
        ).all()
    by_agent: dict[str, set[str]] = {}
    for agent_id, session_id in rows:
        if agent_id is None:  # excluded by the query; narrows the column's type
            continue
        by_agent.setdefault(agent_id, set()).add(session_id)
    for agent_id, session_ids in by_agent.items():
        hub.notify(agent_id, session_ids)


async def team_workspaces(session: AsyncSession, team_id: int) -> list[int]:
    """The workspaces where the team is a participant (its members' roles there change)."""
    return list(
        (
            await session.scalars(
                select(Participant.workspace_id).where(Participant.team_id == team_id).distinct()
            )
        ).all()
    )


async def notify_team_workspaces(db: Database, hub: AgentHub | None, team_id: int) -> None:
    async with db.transaction() as session:
        workspace_ids = await team_workspaces(session, team_id)
    await notify_workspaces(db, hub, workspace_ids)
