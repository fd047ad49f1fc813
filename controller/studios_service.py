"""What the REST API does with studios: create, list, start, stop, delete,
checkpoints, connect. Web handlers parse and answer; this module decides.

Workspace scoping: `workspaceId` omitted means the default workspace (1) for
create and list; for a single studio it means "the studio's own workspace".
A user without a role in the studio's workspace gets 404, as if the studio
did not exist.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from agent.connect_token import derive_agent_key, sign_connect_token
from controller import lifecycle
from controller.agent_hub import AgentHub
from controller.auth import Permission, Principal, Role, require, workspace_role
from controller.db import Database
from controller.errors import Conflict, Forbidden, NotFound
from controller.lifecycle import Status
from controller.models import Agent, Checkpoint, ComputeEnv, Studio, User, Workspace, utcnow
from controller.placement import PLACING_STEP, Placer
from controller.schemas import (
    CheckpointDto,
    DataStudioConfiguration,
    DataStudioCreateRequest,
    DataStudioDto,
    DataStudioStartRequest,
    DataStudioStartResponse,
    DataStudioStopResponse,
)
from controller.templates import resolve_template
from controller.views import checkpoint_dto, status_info, studio_dto

__all__ = ["DEFAULT_WORKSPACE_ID", "Page", "StudioService"]

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_ID = 1
_SESSION_ID = re.compile(r"^[0-9a-f]{8}$")
_SEARCH_KEYWORDS = {"status", "userid", "computeenvid"}


@dataclass(frozen=True, slots=True)
class Page:
    max: int | None
    offset: int


class StudioService:
    def __init__(
        self,
        db: Database,
        hub: AgentHub,
        placer: Placer,
        master_key: bytes,
        *,
        public_url: str,
        connect_token_ttl: float,
    ) -> None:
        self.db = db
        self.hub = hub
        self.placer = placer
        self.master_key = master_key
        self.public_url = public_url
        self.connect_token_ttl = connect_token_ttl

    # ------------------------------------------------------------ helpers

    async def _role(self, session: AsyncSession, principal: Principal, workspace_id: int) -> Role:
        role = await workspace_role(session, principal.user_id, workspace_id)
        if role is None:
            raise NotFound(f"workspace {workspace_id} not found")
        return role

    async def _studio(
        self,
        session: AsyncSession,
        principal: Principal,
        session_id: str,
        workspace_id: int | None,
        *,
        for_update: bool = False,
    ) -> tuple[Studio, Role]:
        missing = NotFound(f"studio {session_id} not found")
        if not _SESSION_ID.match(session_id):
            raise missing
        studio = await session.get(Studio, session_id, with_for_update=for_update or None)
        if studio is None or studio.deleted:
            raise missing
        if workspace_id is not None and studio.workspace_id != workspace_id:
            raise missing
        role = await workspace_role(session, principal.user_id, studio.workspace_id)
        if role is None:
            raise missing
        return studio, role

    async def _dto(self, session: AsyncSession, studio: Studio) -> DataStudioDto:
        user = await session.get(User, studio.user_id)
        env = await session.get(ComputeEnv, studio.compute_env_id)
        workspace = await session.get(Workspace, studio.workspace_id)
        return studio_dto(studio, user, env, workspace, self.public_url)

    async def _new_session_id(self, session: AsyncSession) -> str:
        while True:
            candidate = secrets.token_hex(4)
            if await session.get(Studio, candidate) is None:
                return candidate

    @staticmethod
    async def _name_taken(
        session: AsyncSession, workspace_id: int, name: str, exclude: str | None = None
    ) -> bool:
        query = select(Studio.session_id).where(
            Studio.workspace_id == workspace_id, Studio.name == name, Studio.deleted.is_(False)
        )
        if exclude:
            query = query.where(Studio.session_id != exclude)
        return (await session.scalar(query)) is not None

    # ------------------------------------------------------------ operations

    async def create(
        self,
        principal: Principal,
        workspace_id: int | None,
        body: DataStudioCreateRequest,
        *,
        auto_start: bool,
    ) -> DataStudioDto:
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        template = resolve_template(body.data_studio_tool_url)
        try:
            async with self.db.transaction() as session:
                role = await self._role(session, principal, workspace_id)
                require(role, Permission.WRITE)
                if auto_start:
                    require(role, Permission.EXECUTE)
                env = await session.get(ComputeEnv, body.compute_env_id)
                if env is None or env.workspace_id != workspace_id:
                    raise NotFound(f"compute environment {body.compute_env_id} not found")
                if await self._name_taken(session, workspace_id, body.name):
                    raise Conflict(f"a studio named {body.name!r} already exists in the workspace")
                workspace = await session.get(Workspace, workspace_id)
                now = utcnow()
                studio = Studio(
                    session_id=await self._new_session_id(session),
                    workspace_id=workspace_id,
                    user_id=principal.user_id,
                    name=body.name,
                    description=body.description,
                    template_repository=template.repository,
                    tool=template.tool,
                    custom_image=template.custom,
                    compute_env_id=env.id,
                    configuration=(body.configuration or DataStudioConfiguration()).stored(),
                    is_private=(
                        body.is_private
                        if body.is_private is not None
                        else bool(workspace and workspace.private_studio_by_default)
                    ),
                    status=Status.STOPPED.value,
                    desired_status="stopped",
                    generation=0,
                    progress=[],
                    volume={},
                    date_created=now,
                    last_updated=now,
                    status_updated_at=now,
                )
                session.add(studio)
                if auto_start:
                    self._start(studio, principal)
                session_id = studio.session_id
        except IntegrityError:
            # Lost a race with a concurrent create of the same name.
            raise Conflict(
                f"a studio named {body.name!r} already exists in the workspace"
            ) from None
        log.info("studio %s (%r) created by %s", session_id, body.name, principal.user_name)
        if auto_start:
            await self.placer.place_pending([session_id])
        async with self.db.transaction() as session:
            studio = await session.get(Studio, session_id)
            assert studio is not None
            return await self._dto(session, studio)

    def _start(self, studio: Studio, principal: Principal) -> None:
        """Record a start (the caller places it once committed)."""
        now = utcnow()
        studio.generation += 1
        studio.desired_status = "running"
        studio.agent_id = None
        studio.placed_at = None
        studio.started_by_user_id = principal.user_id
        studio.last_started = now
        studio.tool_port = None
        studio.root_dir = None
        studio.progress = [{"message": PLACING_STEP, "status": "in-progress", "warnings": []}]
        lifecycle.transition(studio, Status.STARTING, message=PLACING_STEP, now=now)

    async def _newest_restorable(self, session: AsyncSession, session_id: str) -> int | None:
        return await session.scalar(
            select(Checkpoint.id)
            .where(
                Checkpoint.session_id == session_id,
                Checkpoint.status.in_(["finalized", "interim"]),
            )
            .order_by(Checkpoint.date_saved.desc(), Checkpoint.id.desc())
            .limit(1)
        )

    async def get(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> DataStudioDto:
        async with self.db.transaction() as session:
            studio, _role = await self._studio(session, principal, session_id, workspace_id)
            return await self._dto(session, studio)

    async def list(
        self, principal: Principal, workspace_id: int | None, search: str | None, page: Page
    ) -> tuple[list[DataStudioDto], int]:
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        async with self.db.transaction() as session:
            await self._role(session, principal, workspace_id)
            query = select(Studio).where(
                Studio.workspace_id == workspace_id, Studio.deleted.is_(False)
            )
            for word in (search or "").split():
                key, sep, value = word.partition(":")
                if sep and key.lower() in _SEARCH_KEYWORDS:
                    if key.lower() == "status":
                        query = query.where(Studio.status == value)
                    elif key.lower() == "computeenvid":
                        query = query.where(Studio.compute_env_id == value)
                    else:
                        query = query.where(
                            Studio.user_id == (int(value) if value.isdigit() else -1)
                        )
                    continue
                pattern = f"%{_escape_like(word.lower())}%"
                query = query.where(
                    or_(
                        func.lower(Studio.name).like(pattern, escape="\\"),
                        func.lower(Studio.template_repository).like(pattern, escape="\\"),
                    )
                )
            total = await session.scalar(select(func.count()).select_from(query.subquery()))
            query = query.order_by(Studio.date_created.desc(), Studio.session_id).offset(
                page.offset
            )
            if page.max is not None:
                query = query.limit(page.max)
            studios = (await session.scalars(query)).all()
            return [await self._dto(session, s) for s in studios], int(total or 0)

    async def start(
        self,
        principal: Principal,
        session_id: str,
        workspace_id: int | None,
        body: DataStudioStartRequest | None,
    ) -> DataStudioStartResponse:
        async with self.db.transaction() as session:
            studio, role = await self._studio(
                session, principal, session_id, workspace_id, for_update=True
            )
            require(role, Permission.EXECUTE)
            lifecycle.check_start(studio)
            if body is not None:
                if body.name is not None and body.name != studio.name:
                    if await self._name_taken(
                        session, studio.workspace_id, body.name, exclude=studio.session_id
                    ):
                        raise Conflict(
                            f"a studio named {body.name!r} already exists in the workspace"
                        )
                    studio.name = body.name
                if body.description is not None:
                    studio.description = body.description
                if body.configuration is not None:
                    studio.configuration = body.configuration.stored()
            previous_agent = studio.agent_id
            self._start(studio, principal)
            studio.restore_checkpoint_id = await self._newest_restorable(session, studio.session_id)
        # The agent of the previous run forgets it (it is placed anew).
        self.hub.notify(previous_agent, [session_id])
        await self.placer.place_pending([session_id])
        async with self.db.transaction() as session:
            studio = await session.get(Studio, session_id)
            assert studio is not None
            return DataStudioStartResponse(
                job_submitted=True, session_id=session_id, status_info=status_info(studio)
            )

    async def stop(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> DataStudioStopResponse:
        async with self.db.transaction() as session:
            studio, role = await self._studio(
                session, principal, session_id, workspace_id, for_update=True
            )
            require(role, Permission.EXECUTE)
            submitted = lifecycle.check_stop(studio)
            agent_id = studio.agent_id
            if submitted:
                studio.desired_status = "stopped"
                lifecycle.transition(studio, Status.STOPPING, message="stopping")
            elif studio.desired_status == "running":
                # Errored or stopped while the agent was told to run: tell it
                # to stop, so nothing lingers there.
                studio.desired_status = "stopped"
            info = status_info(studio)
        self.hub.notify(agent_id, [session_id])
        return DataStudioStopResponse(
            job_submitted=submitted, session_id=session_id, status_info=info
        )

    async def delete(self, principal: Principal, session_id: str, workspace_id: int | None) -> None:
        async with self.db.transaction() as session:
            studio, role = await self._studio(
                session, principal, session_id, workspace_id, for_update=True
            )
            require(role, Permission.WRITE)
            lifecycle.check_delete(studio)
            # Soft delete: the row keeps its checkpoints for garbage
            # collection, and the name is free again.
            studio.deleted = True
            studio.date_deleted = utcnow()
            studio.desired_status = "deleted"
            agent_id = studio.agent_id
        log.info("studio %s deleted by %s", session_id, principal.user_name)
        self.hub.notify(agent_id, [session_id])

    async def checkpoints(
        self, principal: Principal, session_id: str, workspace_id: int | None, page: Page
    ) -> tuple[list[CheckpointDto], int]:
        async with self.db.transaction() as session:
            studio, _role = await self._studio(session, principal, session_id, workspace_id)
            base = select(Checkpoint).where(Checkpoint.session_id == studio.session_id)
            total = await session.scalar(select(func.count()).select_from(base.subquery()))
            query = base.order_by(Checkpoint.date_created.desc(), Checkpoint.id.desc()).offset(
                page.offset
            )
            if page.max is not None:
                query = query.limit(page.max)
            rows = (await session.scalars(query)).all()
            authors = {
                u.id: u
                for u in (
                    await session.scalars(
                        select(User).where(User.id.in_({c.author_user_id for c in rows}))
                    )
                ).all()
            }
            return [checkpoint_dto(c, authors.get(c.author_user_id or -1)) for c in rows], int(
                total or 0
            )

    async def connect_url(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> str:
        """Where the browser goes: the agent's proxy, with a signed connect token."""
        async with self.db.transaction() as session:
            studio, role = await self._studio(session, principal, session_id, workspace_id)
            require(role, Permission.CONNECT)
            if studio.is_private and studio.user_id != principal.user_id:
                raise Forbidden(f"studio {session_id} is private: only its creator can connect")
            if studio.status != Status.RUNNING.value or studio.agent_id is None:
                raise Conflict(f"studio {session_id} is {studio.status}, not running")
            agent = await session.get(Agent, studio.agent_id)
        if agent is None or not self.hub.is_connected(agent.agent_id):
            raise Conflict(
                f"the agent of studio {session_id} is not connected; try again when it is"
            )
        parts = urlsplit(agent.proxy_url if "//" in agent.proxy_url else f"//{agent.proxy_url}")
        scheme = parts.scheme or "http"
        host = parts.hostname
        if not host:
            raise Conflict(f"agent {agent.agent_id} has no usable proxy URL")
        port = parts.port or (443 if scheme == "https" else 80)
        token = sign_connect_token(
            derive_agent_key(self.master_key, agent.agent_id),
            session_id=session_id,
            user_id=principal.user_id,
            user_name=principal.user_name,
            ttl_seconds=self.connect_token_ttl,
        )
        return f"{scheme}://{session_id}.{host}:{port}/?studio-token={token}"


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
