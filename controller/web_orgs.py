"""REST handlers for organisations, their members and workspaces, a user's workspaces and
`/users/{userId}` (reference `seqera-orgs-openapi.yaml`).

The decisions are `controller.orgs_service`'s and `controller.users_service`'s; this
module parses requests and gives the results the reference's shapes
(`controller.org_responses`).
"""

from __future__ import annotations

from aiohttp import web

from controller.models import Organization, User
from controller.models import Workspace as WorkspaceRow
from controller.org_requests import (
    AddMemberRequest,
    CreateOrganizationRequest,
    CreateWorkspaceRequest,
    UpdateMemberRoleRequest,
    UpdateOrganizationRequest,
    UpdateWorkspaceRequest,
)
from controller.org_responses import (
    AddMemberResponse,
    CreateOrganizationResponse,
    CreateWorkspaceResponse,
    DescribeOrganizationResponse,
    DescribeUserResponse,
    DescribeWorkspaceResponse,
    ListMembersResponse,
    ListOrganizationsResponse,
    ListWorkspacesAndOrgResponse,
    ListWorkspacesResponse,
    OrgAndWorkspaceDto,
    OrganizationDbDto,
    UserResponseDto,
    Workspace,
    WorkspaceDbDto,
)
from controller.orgs_service import OrgRow, OrgService
from controller.users_service import UserService
from controller.views import iso, member_dto
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


def _orgs(request: web.Request) -> OrgService:
    service: OrgService = request.app[SERVICES_KEY].orgs
    return service


def _users(request: web.Request) -> UserService:
    service: UserService = request.app[SERVICES_KEY].users
    return service


def _org_dto(row: OrgRow, user_id: int) -> OrganizationDbDto:
    org = row.org
    return OrganizationDbDto(
        org_id=org.id,
        name=org.name,
        full_name=org.full_name or org.name,
        description=org.description,
        location=org.location,
        website=org.website,
        logo_id=org.logo_id,
        member_id=user_id,
        member_role=row.role.value,
    )


def _workspace(row: WorkspaceRow) -> Workspace:
    return Workspace(
        id=row.id,
        name=row.name,
        full_name=row.full_name or row.name,
        description=row.description,
        visibility="SHARED" if row.visibility == "SHARED" else "PRIVATE",
        date_created=iso(row.date_created),
        last_updated=iso(row.last_updated or row.date_created),
    )


def _workspace_db(row: WorkspaceRow) -> WorkspaceDbDto:
    return WorkspaceDbDto(
        id=row.id,
        name=row.name,
        full_name=row.full_name or row.name,
        description=row.description,
        visibility="SHARED" if row.visibility == "SHARED" else "PRIVATE",
    )


def _paging(request: web.Request) -> tuple[str | None, int | None, int]:
    return (
        request.query.get("search"),
        query_int(request, "max", maximum=1000),
        query_int(request, "offset") or 0,
    )


# ---------------------------------------------------------------- organisations
# /orgs/validate before /orgs/{orgId}: aiohttp tries routes in the order they are added.


@routes.get("/orgs/validate")
async def validate_org_name(request: web.Request) -> web.Response:
    principal(request)
    await _orgs(request).validate_org_name(request.query.get("name"))
    return web.Response(status=204)


@routes.get("/orgs")
async def list_orgs(request: web.Request) -> web.Response:
    caller = principal(request)
    rows = await _orgs(request).list_orgs(caller)
    wanted = request.query.get("role")
    if wanted:
        rows = [r for r in rows if r.role.value == wanted]
    return json_response(
        ListOrganizationsResponse(
            organizations=[_org_dto(r, caller.user_id) for r in rows], total_size=len(rows)
        )
    )


@routes.post("/orgs")
async def create_org(request: web.Request) -> web.Response:
    caller = principal(request)
    body = await parse_body(request, CreateOrganizationRequest)
    assert body is not None
    row = await _orgs(request).create_org(caller, body)
    return json_response(CreateOrganizationResponse(organization=_org_dto(row, caller.user_id)))


@routes.get("/orgs/{orgId}")
async def describe_org(request: web.Request) -> web.Response:
    caller = principal(request)
    row = await _orgs(request).describe_org(caller, path_id(request, "orgId"))
    return json_response(DescribeOrganizationResponse(organization=_org_dto(row, caller.user_id)))


@routes.put("/orgs/{orgId}")
async def update_org(request: web.Request) -> web.Response:
    org_id = path_id(request, "orgId")
    body = await parse_body(request, UpdateOrganizationRequest)
    assert body is not None
    await _orgs(request).update_org(principal(request), org_id, body)
    return web.Response(status=204)


@routes.delete("/orgs/{orgId}")
async def delete_org(request: web.Request) -> web.Response:
    await _orgs(request).delete_org(principal(request), path_id(request, "orgId"))
    return web.Response(status=204)


# ---------------------------------------------------------------- members


async def _list_members(request: web.Request, *, collaborators: bool) -> web.Response:
    search, max_, offset = _paging(request)
    rows, total = await _orgs(request).list_members(
        principal(request),
        path_id(request, "orgId"),
        collaborators=collaborators,
        search=search,
        max_=max_,
        offset=offset,
    )
    return json_response(
        ListMembersResponse(members=[member_dto(r) for r in rows], total_size=total)
    )


@routes.get("/orgs/{orgId}/members")
async def list_members(request: web.Request) -> web.Response:
    return await _list_members(request, collaborators=False)


@routes.get("/orgs/{orgId}/collaborators")
async def list_collaborators(request: web.Request) -> web.Response:
    return await _list_members(request, collaborators=True)


@routes.put("/orgs/{orgId}/members/add")
async def add_member(request: web.Request) -> web.Response:
    org_id = path_id(request, "orgId")
    body = await parse_body(request, AddMemberRequest)
    assert body is not None
    row = await _orgs(request).add_member(principal(request), org_id, body.user)
    return json_response(AddMemberResponse(member=member_dto(row)))


@routes.delete("/orgs/{orgId}/members/leave")
async def leave_org(request: web.Request) -> web.Response:
    await _orgs(request).leave(principal(request), path_id(request, "orgId"))
    return web.Response(status=204)


@routes.delete("/orgs/{orgId}/members/{memberId}")
async def delete_member(request: web.Request) -> web.Response:
    await _orgs(request).delete_member(
        principal(request), path_id(request, "orgId"), path_id(request, "memberId")
    )
    return web.Response(status=204)


@routes.put("/orgs/{orgId}/members/{memberId}/role")
async def update_member_role(request: web.Request) -> web.Response:
    org_id, member_id = path_id(request, "orgId"), path_id(request, "memberId")
    body = await parse_body(request, UpdateMemberRoleRequest)
    assert body is not None
    await _orgs(request).update_member_role(principal(request), org_id, member_id, body.role)
    return web.Response(status=204)


# ---------------------------------------------------------------- workspaces


@routes.get("/orgs/{orgId}/workspaces/validate")
async def validate_workspace_name(request: web.Request) -> web.Response:
    await _orgs(request).validate_workspace_name(
        principal(request), path_id(request, "orgId"), request.query.get("name")
    )
    return web.Response(status=204)


@routes.get("/orgs/{orgId}/workspaces")
async def list_workspaces(request: web.Request) -> web.Response:
    rows = await _orgs(request).list_workspaces(principal(request), path_id(request, "orgId"))
    return json_response(ListWorkspacesResponse(workspaces=[_workspace_db(w) for w in rows]))


@routes.post("/orgs/{orgId}/workspaces")
async def create_workspace(request: web.Request) -> web.Response:
    org_id = path_id(request, "orgId")
    body = await parse_body(request, CreateWorkspaceRequest)
    assert body is not None
    row = await _orgs(request).create_workspace(principal(request), org_id, body.workspace)
    return json_response(CreateWorkspaceResponse(workspace=_workspace(row)))


@routes.get("/orgs/{orgId}/workspaces/{workspaceId}")
async def describe_workspace(request: web.Request) -> web.Response:
    row = await _orgs(request).describe_workspace(
        principal(request), path_id(request, "orgId"), path_id(request, "workspaceId")
    )
    return json_response(DescribeWorkspaceResponse(workspace=_workspace(row)))


@routes.put("/orgs/{orgId}/workspaces/{workspaceId}")
async def update_workspace(request: web.Request) -> web.Response:
    org_id, workspace_id = path_id(request, "orgId"), path_id(request, "workspaceId")
    body = await parse_body(request, UpdateWorkspaceRequest)
    assert body is not None
    row = await _orgs(request).update_workspace(principal(request), org_id, workspace_id, body)
    return json_response(DescribeWorkspaceResponse(workspace=_workspace(row)))


@routes.delete("/orgs/{orgId}/workspaces/{workspaceId}")
async def delete_workspace(request: web.Request) -> web.Response:
    await _orgs(request).delete_workspace(
        principal(request), path_id(request, "orgId"), path_id(request, "workspaceId")
    )
    return web.Response(status=204)


# ---------------------------------------------------------------- users


def _org_and_workspace(
    org: Organization, workspace: WorkspaceRow | None, role: str
) -> OrgAndWorkspaceDto:
    if workspace is None:
        return OrgAndWorkspaceDto(org_id=org.id, org_name=org.name, roles=[role])
    return OrgAndWorkspaceDto(
        org_id=org.id,
        org_name=org.name,
        workspace_id=workspace.id,
        workspace_name=workspace.name,
        workspace_full_name=workspace.full_name or workspace.name,
        visibility="SHARED" if workspace.visibility == "SHARED" else "PRIVATE",
        roles=[role],
    )


@routes.get("/user/{userId}/workspaces")
async def user_workspaces(request: web.Request) -> web.Response:
    rows = await _orgs(request).user_workspaces(principal(request), path_id(request, "userId"))
    return json_response(
        ListWorkspacesAndOrgResponse(
            orgs_and_workspaces=[_org_and_workspace(r.org, r.workspace, r.role) for r in rows]
        )
    )


def _user_dto(user: User) -> UserResponseDto:
    return UserResponseDto(
        id=user.id,
        user_name=user.user_name,
        email=user.email,
        date_created=iso(user.date_created),
        deleted=user.deleted,
    )


@routes.get("/users/{userId}")
async def describe_user(request: web.Request) -> web.Response:
    summary = await _users(request).describe_user(principal(request), path_id(request, "userId"))
    return json_response(
        DescribeUserResponse(
            user=_user_dto(summary.user),
            need_consent=False,
            default_workspace_id=summary.default_workspace_id,
        )
    )


@routes.delete("/users/{userId}")
async def delete_user(request: web.Request) -> web.Response:
    await _users(request).delete_user(principal(request), path_id(request, "userId"))
    return web.Response(status=204)
