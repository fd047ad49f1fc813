"""Request bodies of the REST API (pydantic v2).

Field names follow the reference API (camelCase on the wire).

Unknown fields of a request body are *ignored*, everywhere and consistently:
the reference's clients send fields this controller does not implement
(spot, remoteConfig, sshEnabled, ...). `labelIds` names resource labels
(controller.labels_service).

Known fields are validated strictly: a wrong JSON type (a string for an
integer, a number for a boolean, ...) is refused, not coerced. Validation
errors become 400 with a message naming the field (`validation_message`).

No string field takes control characters (C0: NUL, CR, LF, ESC, ...; DEL):
names, identifiers, paths and URLs are one line (`SafeStr`); descriptions and
the conda environment are free text of several lines, so they take TAB and LF
but nothing else (`MultiLine`; CR neither: send LF line endings).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from studios_shared.environment import environment_refusal

__all__ = [
    "CONTROL_CHARACTERS",
    "AddParticipantRequest",
    "AddTeamMemberRequest",
    "CheckpointUpdateRequest",
    "ComputeEnvConfig",
    "ComputeEnvCreateBody",
    "ComputeEnvCreateRequest",
    "CreateAccessTokenRequest",
    "CreateLabelRequest",
    "DataLinkCreateRequest",
    "DataLinkUpdateRequest",
    "DataStudioConfiguration",
    "DataStudioCreateRequest",
    "DataStudioStartRequest",
    "DataStudioUpdateRequest",
    "DataStudioWorkspaceSettingsRequest",
    "FileSystemMountBody",
    "MountData",
    "MultiLine",
    "SafeStr",
    "TeamCreateBody",
    "TeamCreateRequest",
    "UpdateComputeEnvRequest",
    "UpdateLabelRequest",
    "UpdateParticipantRoleRequest",
    "control_name",
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


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """A one-line message naming the first failing field, e.g. "name: Field required"."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request body"


# A regular expression class: C0 control characters and DEL.
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f]"
_CONTROL = re.compile(CONTROL_CHARACTERS)
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL_NAMES = {0x00: "NUL", 0x09: "TAB", 0x0A: "LF", 0x0D: "CR", 0x1B: "ESC", 0x7F: "DEL"}


def control_name(char: str) -> str:
    """A control character as people name it: "NUL", "LF", "U+0001"."""
    return _CONTROL_NAMES.get(ord(char), f"U+{ord(char):04X}")


def _refuse(pattern: re.Pattern[str]) -> AfterValidator:
    def check(value: str) -> str:
        found = pattern.search(value)
        if found is not None:
            raise PydanticCustomError(
                "control_character",
                "control character {what} at position {at} is not allowed",
                {"what": control_name(found.group()), "at": found.start()},
            )
        return value

    return AfterValidator(check)


# One line of text: names, identifiers, paths, URLs, keys. No control character at all.
SafeStr = Annotated[str, _refuse(_CONTROL)]
# Free text of several lines (descriptions, the conda environment): TAB and LF, no other.
MultiLine = Annotated[str, _refuse(_CONTROL_IN_TEXT)]


NonNegInt = Annotated[int, Field(ge=0, le=2**31 - 1)]


Id = Annotated[int, Field(ge=1, le=2**63 - 1)]


Name = Annotated[SafeStr, Field(min_length=1, max_length=80)]


Description = Annotated[MultiLine, Field(max_length=2048)]


class MountData(_Request):
    data_link_id: SafeStr
    path: SafeStr | None = None


class DataStudioConfiguration(_Request):
    cpu: NonNegInt | None = None
    gpu: NonNegInt | None = None
    # MiB
    memory: NonNegInt | None = None
    environment: dict[str, str] | None = None
    lifespan_hours: NonNegInt | None = None
    conda_environment: Annotated[MultiLine, Field(max_length=2048)] | None = None
    mount_data_v2: list[MountData] | None = None
    # Deprecated in the reference (data-link ids); kept as given.
    mount_data: list[SafeStr] | None = None

    @field_validator("environment")
    @classmethod
    def _environment_rule(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # The agent checks the same rule before it starts a tool (studios_shared.environment).
        refusal = environment_refusal(value) if value is not None else ""
        if refusal:
            raise PydanticCustomError("environment", "{reason}", {"reason": refusal})
        return value

    def stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class DataStudioCreateRequest(_Request):
    name: Name
    compute_env_id: Annotated[SafeStr, Field(min_length=1, max_length=64)]
    data_studio_tool_url: Annotated[SafeStr, Field(max_length=1024)] | None = None
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
    compute_env_id: Annotated[SafeStr, Field(min_length=1, max_length=64)] | None = None
    configuration: DataStudioConfiguration | None = None
    label_ids: list[Id] | None = None


class CheckpointUpdateRequest(_Request):
    name: Annotated[SafeStr, Field(min_length=1, max_length=200)]


class DataStudioWorkspaceSettingsRequest(_Request):
    lifespan_hours: NonNegInt | None = None
    private_studio_by_default: bool | None = None
    container_repository: SafeStr | None = None
    name_strategy: SafeStr | None = None


class CreateAccessTokenRequest(_Request):
    name: Annotated[SafeStr, Field(min_length=1, max_length=50)]


class AddParticipantRequest(_Request):
    member_id: Id | None = None
    team_id: Id | None = None
    user_name_or_email: Annotated[SafeStr, Field(min_length=1, max_length=255)] | None = None


class UpdateParticipantRoleRequest(_Request):
    role: Annotated[SafeStr, Field(min_length=1, max_length=16)]


class TeamCreateBody(_Request):
    name: Name
    description: Description | None = None


class TeamCreateRequest(_Request):
    team: TeamCreateBody


class AddTeamMemberRequest(_Request):
    user_name_or_email: Annotated[SafeStr, Field(min_length=1, max_length=255)]


class FileSystemMountBody(_Request):
    """A host directory (EFS-like shared volume) seen at `mountPath` in sessions."""

    host_path: Annotated[SafeStr, Field(min_length=1, max_length=4096)]
    mount_path: Annotated[SafeStr, Field(min_length=1, max_length=4096)]
    read_only: bool = False


class ComputeEnvConfig(_Request):
    work_dir: Annotated[SafeStr, Field(min_length=1, max_length=2048)]
    boot_disk_size_gb: Annotated[int, Field(ge=1, le=65536)] = 30
    # An addition (no counterpart in the reference): the most one session's volume may
    # grow to on a host, at most bootDiskSizeGb; None: the whole budget.
    session_disk_cap_gb: Annotated[int, Field(ge=1, le=65536)] | None = None
    allowed_buckets: list[SafeStr] = []
    file_system_mounts: list[FileSystemMountBody] = []


class ComputeEnvCreateBody(_Request):
    name: Annotated[SafeStr, Field(min_length=1, max_length=100)]
    platform: SafeStr = "studio-agent"
    config: ComputeEnvConfig
    description: Description | None = None


class ComputeEnvCreateRequest(_Request):
    compute_env: ComputeEnvCreateBody


Text100 = Annotated[SafeStr, Field(min_length=1, max_length=100)]


class DataLinkCreateRequest(_Request):
    name: Text100
    resource_ref: Annotated[SafeStr, Field(min_length=1, max_length=1024)]
    description: Description | None = None
    provider: Annotated[SafeStr, Field(max_length=32)] | None = None
    type: Annotated[SafeStr, Field(max_length=32)] | None = None
    credentials_id: Annotated[SafeStr, Field(max_length=64)] | None = None
    public_accessible: bool | None = None
    # Not in the reference request: the bucket's region (default the credentials').
    region: Annotated[SafeStr, Field(max_length=64)] | None = None


class DataLinkUpdateRequest(_Request):
    name: Text100 | None = None
    description: Description | None = None
    credentials_id: Annotated[SafeStr, Field(max_length=64)] | None = None


# Label names and values: the pattern is checked by controller.labels_service (400 naming
# the field); here only the type and a generous length.
LabelText = Annotated[SafeStr, Field(max_length=255)]


class CreateLabelRequest(_Request):
    name: LabelText | None = None
    value: LabelText | None = None
    resource: bool = False
    is_default: bool = False


class UpdateLabelRequest(_Request):
    name: LabelText | None = None
    value: LabelText | None = None
    is_default: bool | None = None


class UpdateComputeEnvRequest(_Request):
    """The reference's update: name and description (credentialsId and
    fusionMetricsCollectionEnabled have no meaning for our platform: ignored)."""

    name: Annotated[SafeStr, Field(max_length=255)] | None = None
    description: Annotated[MultiLine, Field(max_length=2000)] | None = None
