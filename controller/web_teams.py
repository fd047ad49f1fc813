"""REST handlers for teams (`/orgs/{orgId}/teams...`, reference `seqera-orgs-openapi.yaml`).

The decisions are `controller.teams_service`'s; this module parses requests and gives the
results the reference's shapes (`controller.org_responses`).
"""

from __future__ import annotations

from aiohttp import web

from controller.org_requests import CreateTeamMemberRequest, CreateTeamRequest, UpdateTeamRequest
from controller.org_responses import (
    AddTeamMemberResponse,
    CreateTeamResponse,
    DescribeTeamResponse,
    ListMembersResponse,
    ListTeamResponse,
    ListWorkspacesByTeamResponse,
    TeamDbDto,
    WorkspaceParticipantResponseDto,
)
from controller.teams_service import TeamRow, TeamService, TeamWorkspaceRow
from controller.views import member_dto
from controller.web_app import (
    SERVICES_KEY,
    json_response,
    parse_body,
    path_id,
    principal,
    query_int,
)

__all__ = ["routes"]

routes = web.RouteTableDef()

_TEAM = "/orgs/{orgId}/teams/{teamId}"


def _service(request: web.Request) -> TeamService:
    service: TeamService = request.app[SERVICES_KEY].teams
    return service


def _ids(request: web.Request) -> tuple[int, int]:
    return path_id(request, "orgId"), path_id(request, "teamId")


def _paging(request: web.Request) -> tuple[str | None, int | None, int]:
    return (
        request.query.get("search"),
        query_int(request, "max", maximum=1000),
        query_int(request, "offset") or 0,
    )


def _team_dto(row: TeamRow) -> TeamDbDto:
    return TeamDbDto(
        team_id=row.team.id,
        name=row.team.name,
        description=row.team.description,
        members_count=row.members_count,
    )


def _workspace_dto(row: TeamWorkspaceRow) -> WorkspaceParticipantResponseDto:
    return WorkspaceParticipantResponseDto(
        org_id=row.workspace.org_id,
        org_name=row.org_name,
        workspace_id=row.workspace.id,
        workspace_name=row.workspace.name,
        workspace_full_name=row.workspace.full_name or row.workspace.name,
        participant_id=row.participant.id,
        participant_role=row.participant.role,
    )


# /teams/validate before /teams/{teamId}: aiohttp tries routes in the order they are added.
@routes.get("/orgs/{orgId}/teams/validate")
async def validate_team_name(request: web.Request) -> web.Response:
    await _service(request).validate_name(
        principal(request), path_id(request, "orgId"), request.query.get("name")
    )
    return web.Response(status=204)


@routes.get("/orgs/{orgId}/teams")
async def list_teams(request: web.Request) -> web.Response:
    search, max_, offset = _paging(request)
    rows, total = await _service(request).list_teams(
        principal(request), path_id(request, "orgId"), search, max_, offset
    )
    return json_response(ListTeamResponse(teams=[_team_dto(r) for r in rows], total_size=total))


@routes.post("/orgs/{orgId}/teams")
async def create_team(request: web.Request) -> web.Response:
    org_id = path_id(request, "orgId")
    body = await parse_body(request, CreateTeamRequest)
    assert body is not None
    row = await _service(request).create_team(principal(request), org_id, body.team)
    return json_response(CreateTeamResponse(team=_team_dto(row)))


@routes.get(_TEAM)
async def describe_team(request: web.Request) -> web.Response:
    org_id, team_id = _ids(request)
    row = await _service(request).describe_team(principal(request), org_id, team_id)
    return json_response(DescribeTeamResponse(team=_team_dto(row)))


@routes.put(_TEAM)
async def update_team(request: web.Request) -> web.Response:
    org_id, team_id = _ids(request)
    body = await parse_body(request, UpdateTeamRequest)
    assert body is not None
    await _service(request).update_team(principal(request), org_id, team_id, body)
    return web.Response(status=204)


@routes.delete(_TEAM)
async def delete_team(request: web.Request) -> web.Response:
    org_id, team_id = _ids(request)
    await _service(request).delete_team(principal(request), org_id, team_id)
    return web.Response(status=204)


@routes.get(_TEAM + "/members")
async def list_team_members(request: web.Request) -> web.Response:
    org_id, team_id = _ids(request)
    search, max_, offset = _paging(request)
    rows, total = await _service(request).list_members(
        principal(request), org_id, team_id, search, max_, offset
    )
    return json_response(
        ListMembersResponse(members=[member_dto(r) for r in rows], total_size=total)
    )


@routes.post(_TEAM + "/members")
async def add_team_member(request: web.Request) -> web.Response:
    org_id, team_id = _ids(request)
    body = await parse_body(request, CreateTeamMemberRequest)
    assert body is not None
    row = await _service(request).add_member(
        principal(request), org_id, team_id, body.user_name_or_email
    )
    return json_response(AddTeamMemberResponse(member=member_dto(row)))


@routes.delete(_TEAM + "/members/{memberId}/delete")
async def remove_team_member(request: web.Request) -> web.Response:
    org_id, team_id = _ids(request)
    await _service(request).remove_member(
        principal(request), org_id, team_id, path_id(request, "memberId")
    )
    return web.Response(status=204)


@routes.get(_TEAM + "/workspaces")
async def team_workspaces(request: web.Request) -> web.Response:
    org_id, team_id = _ids(request)
    search, max_, offset = _paging(request)
    rows, total = await _service(request).workspaces(
        principal(request), org_id, team_id, search, max_, offset
    )
    return json_response(
        ListWorkspacesByTeamResponse(workspaces=[_workspace_dto(r) for r in rows], total_size=total)
    )
