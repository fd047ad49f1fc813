"""Response bodies of the REST API (pydantic v2), the reference's shapes.

Field names follow the reference API (camelCase on the wire). Only the web
layer builds them (`controller.views`, `controller.datalink_views`); services
return rows and domain results.

A field without a value is omitted, never `null` (issue 14): clients generated
from the reference's schemas break on a `null` where it declares an object, a
string or an enum. The exceptions are the fields the reference declares
nullable and where `null` says something (`KEEP_NULL` of a model).
"""

from __future__ import annotations

from typing import Any

from controller.response_model import ResponseModel as _Response

__all__ = [
    "AccessTokenDto",
    "ActiveConnection",
    "AddParticipantResponse",
    "AddTeamMemberResponse",
    "AgentDto",
    "AgentsListResponse",
    "CheckpointDto",
    "ComputeEnvCreateResponse",
    "ComputeEnvDto",
    "ComputeEnvsListResponse",
    "CreateAccessTokenResponse",
    "CreateLabelResponse",
    "DataLinkCredentialsDto",
    "DataLinkDto",
    "DataLinkResponse",
    "DataLinksListResponse",
    "DataStudioComputeEnvDto",
    "DataStudioCreateResponse",
    "DataStudioDto",
    "DataStudioListCheckpointsResponse",
    "DataStudioListResponse",
    "DataStudioMountedLinksResponse",
    "DataStudioProgressStep",
    "DataStudioStartResponse",
    "DataStudioStatusInfo",
    "DataStudioStopResponse",
    "DataStudioTemplate",
    "DataStudioTemplatesListResponse",
    "DataStudioWorkspaceSettingsResponse",
    "DescribeUserResponse",
    "LabelDbDto",
    "ListAccessTokensResponse",
    "ListLabelsResponse",
    "ListParticipantsResponse",
    "MemberDto",
    "ParentCheckpoint",
    "ParticipantDto",
    "StudioConnectionDto",
    "StudioConnectionUser",
    "StudioConnectionsListResponse",
    "TeamDto",
    "TeamResponse",
    "TeamsListResponse",
    "UnknownUser",
    "UpdateLabelResponse",
    "UserInfo",
    "UserResponseDto",
]


class UserInfo(_Response):
    id: int
    user_name: str
    email: str
    avatar: str | None = None


class UnknownUser(_Response):
    """A user whose record is gone: only the id, when known (the reference requires the
    field, e.g. a checkpoint's `author`, but none of UserInfo's properties)."""

    id: int | None = None


class ActiveConnection(UserInfo):
    last_active: str | None = None


class DataStudioTemplate(_Response):
    repository: str
    tool: str
    status: str | None = None
    icon: str | None = None


class DataStudioComputeEnvDto(_Response):
    id: str
    name: str
    platform: str
    work_dir: str
    region: str | None = None
    credentials_id: str | None = None


class DataStudioStatusInfo(_Response):
    status: str
    message: str | None = None
    last_update: str | None = None
    stop_reason: str | None = None


class DataStudioProgressStep(_Response):
    message: str
    status: str
    warnings: list[str] = []


class ParentCheckpoint(_Response):
    checkpoint_id: int
    checkpoint_name: str
    session_id: str
    studio_name: str


class DataStudioDto(_Response):
    session_id: str
    workspace_id: int
    user: UserInfo
    name: str
    description: str | None = None
    template: DataStudioTemplate
    custom_image: bool
    compute_env: DataStudioComputeEnvDto | None
    configuration: dict[str, Any]
    date_created: str
    last_updated: str
    last_started: str | None = None
    status_info: DataStudioStatusInfo
    studio_url: str
    wave_build_url: str | None = None
    progress: list[DataStudioProgressStep]
    active_connections: list[ActiveConnection] = []
    is_private: bool
    allowed_users: list[UserInfo] | None = None
    effective_lifespan_hours: int
    parent_checkpoint: ParentCheckpoint | None = None
    mounted_data_links: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] | None = None


class DataStudioCreateResponse(_Response):
    studio: DataStudioDto


class DataStudioListResponse(_Response):
    studios: list[DataStudioDto]
    total_size: int


class DataStudioStartResponse(_Response):
    job_submitted: bool
    session_id: str
    status_info: DataStudioStatusInfo


class DataStudioStopResponse(DataStudioStartResponse):
    pass


class DataStudioTemplatesListResponse(_Response):
    templates: list[DataStudioTemplate]
    total_size: int


class CheckpointDto(_Response):
    id: int
    name: str
    path: str
    status: str
    author: UserInfo | UnknownUser
    date_created: str
    date_saved: str


class DataStudioListCheckpointsResponse(_Response):
    checkpoints: list[CheckpointDto]
    total_size: int


class StudioConnectionUser(_Response):
    id: int
    user_name: str


class StudioConnectionDto(_Response):
    """One visit of the connection audit (an addition); no `closedAt` while open."""

    id: int
    user: StudioConnectionUser
    client_address: str
    opened_at: str
    closed_at: str | None = None
    duration_seconds: int | None = None
    # "agentRestart": the close time is when the controller learned the visit had ended.
    closed_by: str | None = None


class StudioBuildDto(_Response):
    """A studio's custom environment build (an addition beside the reference's
    `waveBuildUrl`): `building` (with the build's last output line in `progress`),
    `pending` (not built yet: it builds at the next start), `succeeded` or `failed`;
    the ended build's image, or the failed one's log."""

    session_id: str
    status: str
    progress: str | None = None
    generation: int | None = None
    environment_hash: str | None = None
    image: str | None = None
    cached: bool | None = None
    duration_seconds: float | None = None
    finished_at: str | None = None
    log: str | None = None
    log_truncated: bool | None = None


class StudioConnectionsListResponse(_Response):
    connections: list[StudioConnectionDto]
    total_size: int


class ComputeEnvCreateResponse(_Response):
    compute_env_id: str


class ComputeEnvDto(_Response):
    id: str
    name: str
    platform: str
    status: str = "AVAILABLE"
    message: str | None = None
    work_dir: str
    workspace_name: str
    primary: bool = False
    date_created: str
    last_updated: str
    config: dict[str, Any]


class ComputeEnvsListResponse(_Response):
    compute_envs: list[ComputeEnvDto]


class AgentDto(_Response):
    id: str
    hostname: str
    compute_env_id: str
    runtime: str
    proxy_url: str
    agent_version: str
    connected: bool
    last_seen: str | None = None
    capacity: dict[str, Any]
    # `studio-agent drain`: no new placements; drain_mode "stop" or "wait" while draining.
    draining: bool = False
    drain_mode: str | None = None


class AgentsListResponse(_Response):
    agents: list[AgentDto]


class DataStudioMountedLinksResponse(_Response):
    data_link_ids: list[str]


class DataStudioWorkspaceSettingsResponse(_Response):
    # Null: the platform's default (the reference's nullable fields).
    KEEP_NULL = frozenset({"containerRepository", "nameStrategy"})

    org_id: int
    wsp_id: int
    lifespan_hours: int
    private_studio_by_default: bool
    container_repository: str | None = None
    name_strategy: str | None = None


class AccessTokenDto(_Response):
    id: int
    name: str
    date_created: str
    last_used: str | None = None


class CreateAccessTokenResponse(_Response):
    access_key: str
    token: AccessTokenDto


class ListAccessTokensResponse(_Response):
    tokens: list[AccessTokenDto]


class ParticipantDto(_Response):
    participant_id: int
    # MEMBER (a user) or TEAM
    type: str
    wsp_role: str
    member_id: int | None = None
    user_name: str | None = None
    email: str | None = None
    org_role: str | None = None
    team_id: int | None = None
    team_name: str | None = None


class AddParticipantResponse(_Response):
    participant: ParticipantDto


class ListParticipantsResponse(_Response):
    participants: list[ParticipantDto]
    total_size: int


class TeamDto(_Response):
    team_id: int
    name: str
    description: str | None = None
    members_count: int


class TeamResponse(_Response):
    team: TeamDto


class TeamsListResponse(_Response):
    teams: list[TeamDto]
    total_size: int


class MemberDto(_Response):
    member_id: int
    user_name: str
    email: str


class AddTeamMemberResponse(_Response):
    member: MemberDto


class UserResponseDto(_Response):
    id: int
    user_name: str
    email: str
    date_created: str | None = None


class DescribeUserResponse(_Response):
    user: UserResponseDto
    need_consent: bool
    default_workspace_id: int | None = None


class DataLinkCredentialsDto(_Response):
    id: str
    name: str
    provider: str


class DataLinkDto(_Response):
    id: str
    name: str
    description: str | None = None
    resource_ref: str
    type: str
    provider: str
    region: str | None = None
    credentials: list[DataLinkCredentialsDto]
    # VALID, or INVALID with `message` saying why.
    status: str
    message: str | None = None
    public_accessible: bool
    hidden: bool = False


class DataLinkResponse(_Response):
    data_link: DataLinkDto


class DataLinksListResponse(_Response):
    data_links: list[DataLinkDto]
    total_size: int


class LabelDbDto(_Response):
    id: int
    name: str
    # Resource labels only.
    value: str | None = None
    resource: bool
    is_default: bool
    date_created: str


class ListLabelsResponse(_Response):
    labels: list[LabelDbDto]
    total_size: int


class CreateLabelResponse(_Response):
    id: int
    name: str
    value: str | None = None
    resource: bool
    is_default: bool


class UpdateLabelResponse(_Response):
    id: int
    name: str
    value: str | None = None
    is_default: bool
