"""REST handlers for compute environments and agents (no Seqera counterpart).

A compute environment of platform ``studio-agent`` is a named pool of agents
sharing a work directory (checkpoints go to ``<workDir>/.studios/checkpoints``)
and a disk budget per host (`bootDiskSizeGb`).
"""

from __future__ import annotations

import secrets

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from controller.auth import Permission, require, workspace_role
from controller.checkpoint_gc import gc_run_json, last_gc_runs
from controller.errors import BadRequest, Conflict, NotFound
from controller.models import Agent, ComputeEnv, Workspace, utcnow
from controller.mounts import validate_allowed_buckets, validate_file_system_mounts
from controller.schemas import (
    AgentsListResponse,
    ComputeEnvCreateRequest,
    ComputeEnvCreateResponse,
    ComputeEnvsListResponse,
)
from controller.studios_service import DEFAULT_WORKSPACE_ID
from controller.views import agent_dto, compute_env_dto
from controller.web_app import DB_KEY, SERVICES_KEY, json_response, parse_body, principal, query_int

__all__ = ["PLATFORM", "routes"]

routes = web.RouteTableDef()

PLATFORM = "studio-agent"


def _workspace(request: web.Request) -> int:
    return query_int(request, "workspaceId", minimum=1, maximum=2**63 - 1) or DEFAULT_WORKSPACE_ID


@routes.post("/compute-envs")
async def create_compute_env(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    body = await parse_body(request, ComputeEnvCreateRequest)
    assert body is not None
    env_body = body.compute_env
    if env_body.platform != PLATFORM:
        raise BadRequest(f"computeEnv.platform: must be {PLATFORM!r}, got {env_body.platform!r}")
    # Checked before anything is stored (controller.mounts says what is refused and why).
    fs_mounts = validate_file_system_mounts(env_body.config.file_system_mounts)
    allowed_buckets = validate_allowed_buckets(env_body.config.allowed_buckets)
    user = principal(request)
    try:
        async with request.app[DB_KEY].transaction() as session:
            role = await workspace_role(session, user.user_id, workspace_id)
            if role is None:
                raise NotFound(f"workspace {workspace_id} not found")
            require(role, Permission.ADMIN)
            taken = await session.scalar(
                select(ComputeEnv.id).where(
                    ComputeEnv.workspace_id == workspace_id, ComputeEnv.name == env_body.name
                )
            )
            if taken:
                raise Conflict(f"a compute environment named {env_body.name!r} already exists")
            while True:
                env_id = secrets.token_hex(8)
                if await session.get(ComputeEnv, env_id) is None:
                    break
            now = utcnow()
            session.add(
                ComputeEnv(
                    id=env_id,
                    workspace_id=workspace_id,
                    name=env_body.name,
                    platform=PLATFORM,
                    work_dir=env_body.config.work_dir,
                    boot_disk_size_gb=env_body.config.boot_disk_size_gb,
                    allowed_buckets=allowed_buckets,
                    file_system_mounts=fs_mounts,
                    date_created=now,
                    last_updated=now,
                )
            )
    except IntegrityError:
        raise Conflict(f"a compute environment named {env_body.name!r} already exists") from None
    return json_response(ComputeEnvCreateResponse(compute_env_id=env_id))


@routes.get("/compute-envs")
async def list_compute_envs(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    user = principal(request)
    async with request.app[DB_KEY].transaction() as session:
        role = await workspace_role(session, user.user_id, workspace_id)
        if role is None:
            raise NotFound(f"workspace {workspace_id} not found")
        require(role, Permission.READ)
        workspace = await session.get(Workspace, workspace_id)
        envs = (
            await session.scalars(
                select(ComputeEnv)
                .where(ComputeEnv.workspace_id == workspace_id)
                .order_by(ComputeEnv.name)
            )
        ).all()
        items = [compute_env_dto(e, workspace.name if workspace else "") for e in envs]
        gc_runs = await last_gc_runs(session, [e.id for e in envs])
    data = ComputeEnvsListResponse(compute_envs=items).dump()
    # The last checkpoint garbage collection of each environment's store (or null).
    for entry in data["computeEnvs"]:
        entry["checkpointGc"] = gc_run_json(gc_runs.get(entry["id"]))
    return json_response(data)


@routes.get("/agents")
async def list_agents(request: web.Request) -> web.Response:
    """Agents of the workspace's compute environments."""
    workspace_id = _workspace(request)
    user = principal(request)
    hub = request.app[SERVICES_KEY].hub
    async with request.app[DB_KEY].transaction() as session:
        role = await workspace_role(session, user.user_id, workspace_id)
        if role is None:
            raise NotFound(f"workspace {workspace_id} not found")
        require(role, Permission.READ)
        agents = (
            await session.scalars(
                select(Agent)
                .join(ComputeEnv, ComputeEnv.id == Agent.compute_env_id)
                .where(ComputeEnv.workspace_id == workspace_id)
                .order_by(Agent.agent_id)
            )
        ).all()
        items = [agent_dto(a, hub.is_connected(a.agent_id)) for a in agents]
    return json_response(AgentsListResponse(agents=items))
