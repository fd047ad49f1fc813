"""REST handlers for compute environments and agents (no Seqera counterpart).

The decisions are `controller.compute_envs_service`'s; this module parses
requests and gives the results their REST shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controller.compute_envs_service import PLATFORM, ComputeEnvOps, ComputeEnvService
from controller.db import Database
from controller.models import ComputeEnv
from controller.requests import ComputeEnvCreateRequest, UpdateComputeEnvRequest
from controller.responses import (
    AgentsListResponse,
    ComputeEnvCreateResponse,
    ComputeEnvsListResponse,
)
from controller.studios_service import DEFAULT_WORKSPACE_ID
from controller.views import agent_dto, compute_env_dto, gc_run_json, iso
from controller.web_app import SERVICES_KEY, json_response, parse_body, principal, query_int

__all__ = ["PLATFORM", "routes", "setup"]

routes = web.RouteTableDef()
_OPS = web.AppKey("compute_env_ops", ComputeEnvOps)


def setup(app: web.Application, db: Database) -> None:
    app[_OPS] = ComputeEnvOps(db)


def _reference_fields(env: ComputeEnv) -> dict[str, Any]:
    """The reference's fields of an environment that our list entry did not carry:
    its status, primary flag, description and last use (absent: never used)."""
    fields: dict[str, Any] = {"status": env.status, "primary": env.is_primary}
    if env.description:
        fields["description"] = env.description
    if env.last_used is not None:
        fields["lastUsed"] = iso(env.last_used)
    return fields


def _workspace(request: web.Request) -> int:
    return query_int(request, "workspaceId", minimum=1, maximum=2**63 - 1) or DEFAULT_WORKSPACE_ID


def _service(request: web.Request) -> ComputeEnvService:
    service: ComputeEnvService = request.app[SERVICES_KEY].compute_envs
    return service


@routes.post("/compute-envs")
async def create_compute_env(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    body = await parse_body(request, ComputeEnvCreateRequest)
    assert body is not None  # parse_body returns None only when the body is optional
    env_id = await _service(request).create(principal(request), workspace_id, body.compute_env)
    return json_response(ComputeEnvCreateResponse(compute_env_id=env_id))


@routes.get("/compute-envs")
async def list_compute_envs(request: web.Request) -> web.Response:
    listing = await _service(request).list_envs(
        principal(request), _workspace(request), request.query.get("status") or None
    )
    items = [compute_env_dto(e, listing.workspace_name) for e in listing.envs]
    data = ComputeEnvsListResponse(compute_envs=items).dump()
    for entry, env in zip(data["computeEnvs"], listing.envs, strict=True):
        entry.update(_reference_fields(env))
    # The last checkpoint garbage collection of each environment's store (absent before
    # the first).
    for entry in data["computeEnvs"]:
        run = listing.gc_runs.get(entry["id"])
        if run is not None:
            entry["checkpointGc"] = gc_run_json(run)
    return json_response(data)


@routes.get("/agents")
async def list_agents(request: web.Request) -> web.Response:
    """Agents of the workspace's compute environments."""
    listing = await _service(request).agents(principal(request), _workspace(request))
    return json_response(
        AgentsListResponse(agents=[agent_dto(a.agent, a.connected) for a in listing])
    )


# Registered before /compute-envs/{computeEnvId} so that "validate" is not an id.
@routes.get("/compute-envs/validate")
async def validate_compute_env_name(request: web.Request) -> web.Response:
    await request.app[_OPS].validate_name(
        principal(request), _workspace(request), request.query.get("name")
    )
    return web.Response(status=204)


@routes.get("/compute-envs/{computeEnvId}")
async def describe_compute_env(request: web.Request) -> web.Response:
    """The reference's DescribeComputeEnvResponse. Its `config` is a oneOf over Seqera's
    platforms chosen by `config.discriminator`, which has no `studio-agent` entry: our
    configuration is given as `studioAgentConfig` (an addition), `config` is absent."""
    view = await request.app[_OPS].describe(
        principal(request), request.match_info["computeEnvId"], query_workspace(request)
    )
    env = view.env
    body: dict[str, Any] = {
        "id": env.id,
        "name": env.name,
        "platform": env.platform,
        "workspaceId": env.workspace_id,
        "dateCreated": iso(env.date_created),
        "lastUpdated": iso(env.last_updated),
        "deleted": False,
        **_reference_fields(env),
        "studioAgentConfig": compute_env_dto(env, view.workspace.name if view.workspace else "")
        .dump()
        .get("config", {}),
    }
    if view.workspace is not None:
        body["orgId"] = view.workspace.org_id
    return json_response({"computeEnv": body})


@routes.put("/compute-envs/{computeEnvId}")
async def update_compute_env(request: web.Request) -> web.Response:
    body = await parse_body(request, UpdateComputeEnvRequest)
    assert body is not None
    await request.app[_OPS].update(
        principal(request),
        request.match_info["computeEnvId"],
        query_workspace(request),
        name=body.name,
        description=body.description,
    )
    return web.Response(status=204)


@routes.delete("/compute-envs/{computeEnvId}")
async def delete_compute_env(request: web.Request) -> web.Response:
    await request.app[_OPS].delete(
        principal(request), request.match_info["computeEnvId"], query_workspace(request)
    )
    return web.Response(status=204)


@routes.post("/compute-envs/{computeEnvId}/disable")
async def disable_compute_env(request: web.Request) -> web.Response:
    await request.app[_OPS].set_status(
        principal(request), request.match_info["computeEnvId"], query_workspace(request), "DISABLED"
    )
    return web.Response(status=204)


@routes.post("/compute-envs/{computeEnvId}/enable")
async def enable_compute_env(request: web.Request) -> web.Response:
    await request.app[_OPS].set_status(
        principal(request),
        request.match_info["computeEnvId"],
        query_workspace(request),
        "AVAILABLE",
    )
    return web.Response(status=204)


@routes.post("/compute-envs/{computeEnvId}/primary")
async def primary_compute_env(request: web.Request) -> web.Response:
    await request.app[_OPS].make_primary(
        principal(request), request.match_info["computeEnvId"], query_workspace(request)
    )
    return web.Response(status=204)


@routes.post("/compute-envs/{computeEnvId}/validate")
async def validate_compute_env(request: web.Request) -> web.Response:
    env = await request.app[_OPS].validate(
        principal(request), request.match_info["computeEnvId"], query_workspace(request)
    )
    # Nothing to probe from here (see ComputeEnvOps.validate): never a transient error.
    return json_response({"status": env.status, "transientError": False})


def query_workspace(request: web.Request) -> int | None:
    """`workspaceId` of a single environment: absent means the environment's own."""
    return query_int(request, "workspaceId", minimum=1, maximum=2**63 - 1)
