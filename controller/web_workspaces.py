"""REST handlers for workspace participants and Studios settings (teams: `controller.web_teams`)."""

from __future__ import annotations

from aiohttp import web

from controller.requests import (
    AddParticipantRequest,
    DataStudioWorkspaceSettingsRequest,
    UpdateParticipantRoleRequest,
)
from controller.responses import AddParticipantResponse, ListParticipantsResponse
from controller.views import participant_dto, workspace_settings_dto
from controller.web_app import (
    SERVICES_KEY,
    json_response,
    parse_body,
    path_id,
    principal,
    query_int,
)
from controller.workspaces_service import WorkspaceService

__all__ = ["routes"]

routes = web.RouteTableDef()

_WSP = "/orgs/{orgId}/workspaces/{workspaceId}"


def _service(request: web.Request) -> WorkspaceService:
    return request.app[SERVICES_KEY].workspaces  # type: ignore[no-any-return]


def _ids(request: web.Request) -> tuple[int, int]:
    return path_id(request, "orgId"), path_id(request, "workspaceId")


@routes.get(_WSP + "/participants")
async def list_participants(request: web.Request) -> web.Response:
    org_id, workspace_id = _ids(request)
    items, total = await _service(request).list_participants(
        principal(request),
        org_id,
        workspace_id,
        request.query.get("search"),
        query_int(request, "max", maximum=1000),
        query_int(request, "offset") or 0,
    )
    dtos = [participant_dto(r) for r in items]
    return json_response(ListParticipantsResponse(participants=dtos, total_size=total))


@routes.delete(_WSP + "/participants")
async def leave_workspace(request: web.Request) -> web.Response:
    org_id, workspace_id = _ids(request)
    await _service(request).leave(principal(request), org_id, workspace_id)
    return web.Response(status=204)


@routes.put(_WSP + "/participants/add")
async def add_participant(request: web.Request) -> web.Response:
    org_id, workspace_id = _ids(request)
    body = await parse_body(request, AddParticipantRequest)
    assert body is not None
    row = await _service(request).add_participant(principal(request), org_id, workspace_id, body)
    return json_response(AddParticipantResponse(participant=participant_dto(row)))


@routes.delete(_WSP + "/participants/{participantId}")
async def delete_participant(request: web.Request) -> web.Response:
    org_id, workspace_id = _ids(request)
    await _service(request).delete_participant(
        principal(request), org_id, workspace_id, path_id(request, "participantId")
    )
    return web.Response(status=204)


@routes.put(_WSP + "/participants/{participantId}/role")
async def update_participant_role(request: web.Request) -> web.Response:
    org_id, workspace_id = _ids(request)
    participant_id = path_id(request, "participantId")
    body = await parse_body(request, UpdateParticipantRoleRequest)
    assert body is not None
    await _service(request).update_role(
        principal(request), org_id, workspace_id, participant_id, body.role
    )
    return web.Response(status=204)


@routes.get(_WSP + "/settings/studios")
async def get_studio_settings(request: web.Request) -> web.Response:
    org_id, workspace_id = _ids(request)
    workspace = await _service(request).studio_settings(principal(request), org_id, workspace_id)
    return json_response(workspace_settings_dto(workspace))


@routes.put(_WSP + "/settings/studios")
async def update_studio_settings(request: web.Request) -> web.Response:
    org_id, workspace_id = _ids(request)
    body = await parse_body(request, DataStudioWorkspaceSettingsRequest)
    assert body is not None
    await _service(request).update_studio_settings(principal(request), org_id, workspace_id, body)
    return web.Response(status=204)
