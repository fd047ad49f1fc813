"""Request and response bodies of the REST API (pydantic v2).

Field names follow the reference API (camelCase on the wire).

Unknown fields of a request body are *ignored*, everywhere and consistently:
the reference's clients send fields this controller does not implement
(spot, remoteConfig, sshEnabled, ...). `labelIds` is accepted (its type is
checked) and ignored: there are no labels yet, responses carry `labels: null`.

Known fields are validated strictly: a wrong JSON type (a string for an
integer, a number for a boolean, ...) is refused, not coerced. Validation
errors become 400 with a message naming the field (`validation_message`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

__all__ = [
    "AccessTokenDto",
    "ActiveConnection",
    "AddParticipantRequest",
    "AddParticipantResponse",
    "AddTeamMemberRequest",
    "AddTeamMemberResponse",
    "AgentDto",
    "AgentsListResponse",
    "CheckpointDto",
    "CheckpointUpdateRequest",
    "ComputeEnvConfig",
    "ComputeEnvCreateBody",
    "ComputeEnvCreateRequest",
    "ComputeEnvCreateResponse",
    "ComputeEnvDto",
    "ComputeEnvsListResponse",
    "CreateAccessTokenRequest",
    "CreateAccessTokenResponse",
    "CreateCredentialsRequest",
    "CreateCredentialsResponse",
    "CredentialsBody",
    "CredentialsDto",
    "CredentialsKeys",
    "CredentialsListResponse",
    "CredentialsResponse",
    "CredentialsUpdateBody",
    "DataLinkCreateRequest",
    "DataLinkCredentialsDto",
    "DataLinkDto",
    "DataLinkResponse",
    "DataLinkUpdateRequest",
    "DataLinksListResponse",
    "DataStudioComputeEnvDto",
    "DataStudioConfiguration",
    "DataStudioCreateRequest",
    "DataStudioCreateResponse",
    "DataStudioDto",
    "DataStudioListCheckpointsResponse",
    "DataStudioListResponse",
    "DataStudioMountedLinksResponse",
    "DataStudioProgressStep",
    "DataStudioStartRequest",
    "DataStudioStartResponse",
    "DataStudioStatusInfo",
    "DataStudioStopResponse",
    "DataStudioTemplate",
    "DataStudioTemplatesListResponse",
    "DataStudioUpdateRequest",
    "DataStudioWorkspaceSettingsRequest",
    "DataStudioWorkspaceSettingsResponse",
    "DescribeUserResponse",
    "FileSystemMountBody",
    "ListAccessTokensResponse",
    "ListParticipantsResponse",
    "MemberDto",
    "MountData",
    "ParentCheckpoint",
    "ParticipantDto",
    "TeamCreateBody",
    "TeamCreateRequest",
    "TeamDto",
    "TeamResponse",
    "TeamsListResponse",
    "UpdateCredentialsRequest",
    "UpdateParticipantRoleRequest",
    "UserInfo",
    "UserResponseDto",
    "validation_message",
]


class _Request(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        str_strip_whitespace=False,
        strict=True,
    )


class _Response(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """A one-line message naming the first failing field, e.g. "name: Field required"."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request body"


NonNegInt = Annotated[int, Field(ge=0, le=2**31 - 1)]
Id = Annotated[int, Field(ge=1, le=2**63 - 1)]
Name = Annotated[str, Field(min_length=1, max_length=80)]
Description = Annotated[str, Field(max_length=2048)]


class MountData(_Request):
    data_link_id: str
    path: str | None = None


class DataStudioConfiguration(_Request):
    cpu: NonNegInt | None = None
    gpu: NonNegInt | None = None
    # MiB
    memory: NonNegInt | None = None
    environment: dict[str, str] | None = None
    lifespan_hours: NonNegInt | None = None
    conda_environment: Annotated[str, Field(max_length=2048)] | None = None
    mount_data_v2: list[MountData] | None = None
    # Deprecated in the reference (data-link ids); kept as given.
    mount_data: list[str] | None = None

    def stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class DataStudioCreateRequest(_Request):
    name: Name
    compute_env_id: Annotated[str, Field(min_length=1, max_length=64)]
    data_studio_tool_url: Annotated[str, Field(max_length=1024)] | None = None
    description: Description | None = None
    configuration: DataStudioConfiguration | None = None
    is_private: bool | None = None
    allowed_user_ids: list[Id] | None = None
    label_ids: list[Id] | None = None
    initial_checkpoint_id: Id | None = None


class DataStudioStartRequest(_Request):
    name: Name | None = None
    description: Description | None = None
    configuration: DataStudioConfiguration | None = None
    allowed_user_ids: list[Id] | None = None
    label_ids: list[Id] | None = None


class DataStudioUpdateRequest(_Request):
    name: Name | None = None
    description: Description | None = None
    compute_env_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    configuration: DataStudioConfiguration | None = None
    label_ids: list[Id] | None = None


class CheckpointUpdateRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=200)]


class DataStudioWorkspaceSettingsRequest(_Request):
    lifespan_hours: NonNegInt | None = None
    private_studio_by_default: bool | None = None
    container_repository: str | None = None
    name_strategy: str | None = None


class CreateAccessTokenRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=50)]


class AddParticipantRequest(_Request):
    member_id: Id | None = None
    team_id: Id | None = None
    user_name_or_email: Annotated[str, Field(min_length=1, max_length=255)] | None = None


class UpdateParticipantRoleRequest(_Request):
    role: Annotated[str, Field(min_length=1, max_length=16)]


class TeamCreateBody(_Request):
    name: Name
    description: Description | None = None


class TeamCreateRequest(_Request):
    team: TeamCreateBody


class AddTeamMemberRequest(_Request):
    user_name_or_email: Annotated[str, Field(min_length=1, max_length=255)]


class UserInfo(_Response):
    id: int
    user_name: str
    email: str
    avatar: str | None = None


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
    author: UserInfo | None
    date_created: str
    date_saved: str


class DataStudioListCheckpointsResponse(_Response):
    checkpoints: list[CheckpointDto]
    total_size: int


class FileSystemMountBody(_Request):
    """A host directory (EFS-like shared volume) seen at `mountPath` in sessions."""

    host_path: Annotated[str, Field(min_length=1, max_length=4096)]
    mount_path: Annotated[str, Field(min_length=1, max_length=4096)]
    read_only: bool = False


class ComputeEnvConfig(_Request):
    work_dir: Annotated[str, Field(min_length=1, max_length=2048)]
    boot_disk_size_gb: Annotated[int, Field(ge=1, le=65536)] = 30
    allowed_buckets: list[str] = []
    file_system_mounts: list[FileSystemMountBody] = []


class ComputeEnvCreateBody(_Request):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    platform: str = "studio-agent"
    config: ComputeEnvConfig
    description: str | None = None


class ComputeEnvCreateRequest(_Request):
    compute_env: ComputeEnvCreateBody


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


class AgentsListResponse(_Response):
    agents: list[AgentDto]


class DataStudioMountedLinksResponse(_Response):
    data_link_ids: list[str]


class DataStudioWorkspaceSettingsResponse(_Response):
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


# ------------------------------------------------------------ credentials, data-links

Text100 = Annotated[str, Field(min_length=1, max_length=100)]


class CredentialsKeys(_Request):
    """The secret part: stored encrypted, never returned."""

    access_key: Annotated[str, Field(min_length=1, max_length=256)]
    secret_key: Annotated[str, Field(min_length=1, max_length=1024)]


class CredentialsBody(_Request):
    name: Text100
    provider: Annotated[str, Field(min_length=1, max_length=32)]
    description: Description | None = None
    # Endpoint of an S3-compatible store (SeaweedFS, MinIO, ...); absent for AWS.
    base_url: Annotated[str, Field(max_length=2048)] | None = None
    region: Annotated[str, Field(max_length=64)] | None = None
    keys: CredentialsKeys


class CreateCredentialsRequest(_Request):
    credentials: CredentialsBody


class CredentialsUpdateBody(_Request):
    """Absent fields are kept; `keys` replaces both keys; the provider cannot change."""

    name: Text100 | None = None
    description: Description | None = None
    base_url: Annotated[str, Field(max_length=2048)] | None = None
    region: Annotated[str, Field(max_length=64)] | None = None
    keys: CredentialsKeys | None = None


class UpdateCredentialsRequest(_Request):
    credentials: CredentialsUpdateBody


class CreateCredentialsResponse(_Response):
    credentials_id: str


class CredentialsDto(_Response):
    id: str
    name: str
    description: str | None = None
    provider: str
    base_url: str | None = None
    region: str | None = None
    category: str = "cloud"
    date_created: str
    last_updated: str
    last_used: str | None = None


class CredentialsResponse(_Response):
    credentials: CredentialsDto


class CredentialsListResponse(_Response):
    credentials: list[CredentialsDto]


class DataLinkCreateRequest(_Request):
    name: Text100
    resource_ref: Annotated[str, Field(min_length=1, max_length=1024)]
    description: Description | None = None
    provider: Annotated[str, Field(max_length=32)] | None = None
    type: Annotated[str, Field(max_length=32)] | None = None
    credentials_id: Annotated[str, Field(max_length=64)] | None = None
    public_accessible: bool | None = None
    # Not in the reference request: the bucket's region (default the credentials').
    region: Annotated[str, Field(max_length=64)] | None = None


class DataLinkUpdateRequest(_Request):
    name: Text100 | None = None
    description: Description | None = None
    credentials_id: Annotated[str, Field(max_length=64)] | None = None


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
