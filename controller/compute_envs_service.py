"""Compute environments and their agents: the decisions behind ``/compute-envs`` and ``/agents``.

A compute environment of platform ``studio-agent`` is a named pool of agents
sharing a work directory (checkpoints go to ``<workDir>/.studios/checkpoints``)
and a disk budget per host (`bootDiskSizeGb`). Results are database rows; the
web layer (`controller.web_compute_envs`) gives them their REST shape.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from controller.agent_hub import AgentHub
from controller.auth import Permission, Principal, require, workspace_role_or_404
from controller.checkpoint_gc import last_gc_runs
from controller.db import Database
from controller.errors import BadRequest, Conflict
from controller.models import Agent, CheckpointGcRun, ComputeEnv, Workspace, utcnow
from controller.mounts import validate_allowed_buckets, validate_file_system_mounts
from controller.requests import ComputeEnvCreateBody

__all__ = ["PLATFORM", "AgentListing", "ComputeEnvListing", "ComputeEnvService"]

PLATFORM = "studio-agent"


@dataclass(frozen=True, slots=True)
class ComputeEnvListing:
    workspace_name: str
    envs: Sequence[ComputeEnv]
    # The newest checkpoint GC run of each environment's store, by environment id.
    gc_runs: dict[str, CheckpointGcRun]


@dataclass(frozen=True, slots=True)
class AgentListing:
    agent: Agent
    connected: bool


class ComputeEnvService:
    def __init__(self, db: Database, hub: AgentHub) -> None:
        self.db = db
        self.hub = hub

    async def create(
        self, principal: Principal, workspace_id: int, body: ComputeEnvCreateBody
    ) -> str:
        """Store a new compute environment; returns its id."""
        if body.platform != PLATFORM:
            raise BadRequest(f"computeEnv.platform: must be {PLATFORM!r}, got {body.platform!r}")
        # Checked before anything is stored (controller.mounts says what is refused and why).
        fs_mounts = validate_file_system_mounts(body.config.file_system_mounts)
        allowed_buckets = validate_allowed_buckets(body.config.allowed_buckets)
        try:
            async with self.db.transaction() as session:
                role = await workspace_role_or_404(session, principal.user_id, workspace_id)
                require(role, Permission.ADMIN)
                taken = await session.scalar(
                    select(ComputeEnv.id).where(
                        ComputeEnv.workspace_id == workspace_id, ComputeEnv.name == body.name
                    )
                )
                if taken:
                    raise Conflict(f"a compute environment named {body.name!r} already exists")
                while True:
                    env_id = secrets.token_hex(8)
                    if await session.get(ComputeEnv, env_id) is None:
                        break
                now = utcnow()
                session.add(
                    ComputeEnv(
                        id=env_id,
                        workspace_id=workspace_id,
                        name=body.name,
                        platform=PLATFORM,
                        work_dir=body.config.work_dir,
                        boot_disk_size_gb=body.config.boot_disk_size_gb,
                        allowed_buckets=allowed_buckets,
                        file_system_mounts=fs_mounts,
                        date_created=now,
                        last_updated=now,
                    )
                )
        except IntegrityError:
            # Lost a race with a concurrent create of the same name.
            raise Conflict(f"a compute environment named {body.name!r} already exists") from None
        return env_id

    async def list_envs(self, principal: Principal, workspace_id: int) -> ComputeEnvListing:
        """The workspace's compute environments by name, with their stores' last GC run."""
        async with self.db.transaction() as session:
            role = await workspace_role_or_404(session, principal.user_id, workspace_id)
            require(role, Permission.READ)
            workspace = await session.get(Workspace, workspace_id)
            envs = (
                await session.scalars(
                    select(ComputeEnv)
                    .where(ComputeEnv.workspace_id == workspace_id)
                    .order_by(ComputeEnv.name)
                )
            ).all()
            gc_runs = await last_gc_runs(session, [e.id for e in envs])
        return ComputeEnvListing(workspace.name if workspace else "", envs, gc_runs)

    async def agents(self, principal: Principal, workspace_id: int) -> list[AgentListing]:
        """Agents of the workspace's compute environments that have connected, by id."""
        async with self.db.transaction() as session:
            role = await workspace_role_or_404(session, principal.user_id, workspace_id)
            require(role, Permission.READ)
            agents = (
                await session.scalars(
                    select(Agent)
                    .join(ComputeEnv, ComputeEnv.id == Agent.compute_env_id)
                    .where(
                        ComputeEnv.workspace_id == workspace_id,
                        # Enrolled but never connected: `studio-controller agent list`.
                        Agent.last_seen.is_not(None),
                    )
                    .order_by(Agent.agent_id)
                )
            ).all()
        return [AgentListing(a, self.hub.is_connected(a.agent_id)) for a in agents]
