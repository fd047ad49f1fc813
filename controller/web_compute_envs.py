"""REST handlers for compute environments and agents (no Seqera counterpart).

The decisions are `controller.compute_envs_service`'s; this module parses
requests and gives the results their REST shape.
"""

from __future__ import annotations

from aiohttp import web

from controller.compute_envs_service import PLATFORM, ComputeEnvService
from controller.requests import ComputeEnvCreateRequest
from controller.responses import (
    AgentsListResponse,
    ComputeEnvCreateResponse,
    ComputeEnvsListResponse,
)
from controller.studios_service import DEFAULT_WORKSPACE_ID
from controller.views import agent_dto, compute_env_dto, gc_run_json
from controller.web_app import SERVICES_KEY, json_response, parse_body, principal, query_int

__all__ = ["PLATFORM", "routes"]

routes = web.RouteTableDef()


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
    listing = await _service(request).list_envs(principal(request), _workspace(request))
    items = [compute_env_dto(e, listing.workspace_name) for e in listing.envs]
    data = ComputeEnvsListResponse(compute_envs=items).dump()
    # The last checkpoint garbage collection of each environment's store (or null).
    for entry in data["computeEnvs"]:
        entry["checkpointGc"] = gc_run_json(listing.gc_runs.get(entry["id"]))
    return json_response(data)


@routes.get("/agents")
async def list_agents(request: web.Request) -> web.Response:
    """Agents of the workspace's compute environments."""
    listing = await _service(request).agents(principal(request), _workspace(request))
    return json_response(
        AgentsListResponse(agents=[agent_dto(a.agent, a.connected) for a in listing])
    )
