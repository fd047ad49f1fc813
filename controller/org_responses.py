"""Response bodies of organisations, members, workspaces, teams and users: the reference's
schemas (`seqera-orgs-openapi.yaml`) field for field, camelCase. A field without a value
is omitted, never null (`dump`). Only the web layer builds them (`controller.web_orgs`,
`controller.web_teams`).
"""

from __future__ import annotations

from typing import Literal

from controller.response_model import ResponseModel as _Response

__all__ = [
    "AddMemberResponse",
    "AddTeamMemberResponse",
    "CreateOrganizationResponse",
    "CreateTeamResponse",
    "CreateWorkspaceResponse",
    "DescribeOrganizationResponse",
    "DescribeTeamResponse",
    "DescribeUserResponse",
    "DescribeWorkspaceResponse",
    "ListMembersResponse",
    "ListOrganizationsResponse",
    "ListTeamResponse",
    "ListWorkspacesAndOrgResponse",
    "ListWorkspacesByTeamResponse",
    "ListWorkspacesResponse",
    "MemberDbDto",
    "OrgAndWorkspaceDto",
    "OrganizationDbDto",
    "TeamDbDto",
    "UserResponseDto",
    "Workspace",
    "WorkspaceDbDto",
    "WorkspaceParticipantResponseDto",
]

OrgRole = Literal["owner", "member", "collaborator"]
Visibility = Literal["PRIVATE", "SHARED"]


class OrganizationDbDto(_Response):
    org_id: int
    name: str
    full_name: str
    description: str | None = None
    location: str | None = None
    website: str | None = None
    logo_id: str | None = None
    member_id: int | None = None
    member_role: OrgRole | None = None


class CreateOrganizationResponse(_Response):
    organization: OrganizationDbDto


class DescribeOrganizationResponse(_Response):
    organization: OrganizationDbDto


class ListOrganizationsResponse(_Response):
    organizations: list[OrganizationDbDto]
    total_size: int


class MemberDbDto(_Response):
    member_id: int
    user_id: int
    user_name: str
    email: str
    role: OrgRole


class ListMembersResponse(_Response):
    members: list[MemberDbDto]
    total_size: int


class AddMemberResponse(_Response):
    member: MemberDbDto


class Workspace(_Response):
    id: int
    name: str
    full_name: str
    description: str | None = None
    visibility: Visibility
    date_created: str | None = None
    last_updated: str | None = None


class WorkspaceDbDto(_Response):
    id: int
    name: str
    full_name: str
    description: str | None = None
    visibility: Visibility


class CreateWorkspaceResponse(_Response):
    workspace: Workspace


class DescribeWorkspaceResponse(_Response):
    workspace: Workspace


class ListWorkspacesResponse(_Response):
    workspaces: list[WorkspaceDbDto]


class OrgAndWorkspaceDto(_Response):
    org_id: int
    org_name: str
    workspace_id: int | None = None
    workspace_name: str | None = None
    workspace_full_name: str | None = None
    visibility: Visibility | None = None
    roles: list[str]


class ListWorkspacesAndOrgResponse(_Response):
    orgs_and_workspaces: list[OrgAndWorkspaceDto]


class TeamDbDto(_Response):
    team_id: int
    name: str
    description: str | None = None
    members_count: int


class CreateTeamResponse(_Response):
    team: TeamDbDto


class DescribeTeamResponse(_Response):
    team: TeamDbDto


class ListTeamResponse(_Response):
    teams: list[TeamDbDto]
    total_size: int


class AddTeamMemberResponse(_Response):
    member: MemberDbDto


class WorkspaceParticipantResponseDto(_Response):
    org_id: int
    org_name: str
    workspace_id: int
    workspace_name: str
    workspace_full_name: str
    participant_id: int
    participant_role: str


class ListWorkspacesByTeamResponse(_Response):
    workspaces: list[WorkspaceParticipantResponseDto]
    total_size: int


class UserResponseDto(_Response):
    id: int
    user_name: str
    email: str
    date_created: str | None = None
    deleted: bool


class DescribeUserResponse(_Response):
    user: UserResponseDto
    need_consent: bool
    default_workspace_id: int | None = None
