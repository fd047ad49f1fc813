"""Request and response bodies of the REST API (pydantic v2).

Field names follow the reference API (camelCase on the wire). Unknown fields
of a request body are ignored, as the reference's clients send fields this
controller does not implement (labels, spot, remoteConfig, ...). Validation
errors become 400 with a message naming the field (`validation_message`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

__all__ = [
    "ActiveConnection",
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
    "DataStudioComputeEnvDto",
    "DataStudioConfiguration",
    "DataStudioCreateRequest",
    "DataStudioCreateResponse",
    "DataStudioDto",
    "DataStudioListCheckpointsResponse",
    "DataStudioListResponse",
    "DataStudioProgressStep",
    "DataStudioStartRequest",
    "DataStudioStartResponse",
    "DataStudioStatusInfo",
    "DataStudioStopResponse",
    "DataStudioTemplate",
    "DataStudioTemplatesListResponse",
    "MountData",
    "UserInfo",
    "validation_message",
]


class _Request(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", str_strip_whitespace=False
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

    def stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class DataStudioCreateRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=80)]
    compute_env_id: Annotated[str, Field(min_length=1)]
    data_studio_tool_url: str | None = None
    description: Annotated[str, Field(max_length=2048)] | None = None
    configuration: DataStudioConfiguration | None = None
    is_private: bool | None = None


class DataStudioStartRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    description: Annotated[str, Field(max_length=2048)] | None = None
    configuration: DataStudioConfiguration | None = None


class CheckpointUpdateRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=255)]


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
    effective_lifespan_hours: int
    parent_checkpoint: dict[str, Any] | None = None
    mounted_data_links: list[dict[str, Any]] = []


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


class ComputeEnvConfig(_Request):
    work_dir: Annotated[str, Field(min_length=1, max_length=2048)]
    boot_disk_size_gb: Annotated[int, Field(ge=1, le=65536)] = 30
    allowed_buckets: list[str] = []
    file_system_mounts: list[str] = []


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
