"""Request bodies of organisations, workspaces, members and teams (the reference's shapes).

As `controller.requests`: camelCase, unknown fields ignored, known fields strict, no
control characters. Names of organisations, workspaces and teams follow the reference's
pattern `^[a-zA-Z\\d](?:[a-zA-Z\\d]|[-_](?=[a-zA-Z\\d])){1,38}$`: 2 to 39 letters, digits,
and single dashes or underscores between them (`name_refusal`); fields and enums as the
reference's `Organization`, `Workspace`, `Team`, `OrgRole` and `Visibility`. Fields of the
reference this controller has nothing for (`paying`, `type`, `avatarId`, `idpGroupId`) are
ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from controller.requests import MultiLine, SafeStr

__all__ = [
    "NAME_PATTERN",
    "AddMemberRequest",
    "CreateOrganizationRequest",
    "CreateTeamMemberRequest",
    "CreateTeamRequest",
    "CreateWorkspaceRequest",
    "OrganizationBody",
    "TeamBody",
    "UpdateMemberRoleRequest",
    "UpdateOrganizationRequest",
    "UpdateTeamRequest",
    "UpdateWorkspaceRequest",
    "WorkspaceBody",
    "name_refusal",
]

# The reference's pattern (Python's re: pydantic's own engine has no lookahead).
NAME_PATTERN = r"^[a-zA-Z\d](?:[a-zA-Z\d]|[-_](?=[a-zA-Z\d])){1,38}$"
_NAME = re.compile(NAME_PATTERN)


def name_refusal(value: str) -> str | None:
    """Why `value` is not a valid name of an organisation, workspace or team; None if it is."""
    if len(value) > 40 or not _NAME.fullmatch(value):
        return (
            f"{value!r} is not a valid name: 2 to 39 letters and digits, with single '-' or "
            "'_' between them"
        )
    return None


def _check_name(value: str) -> str:
    refusal = name_refusal(value)
    if refusal is not None:
        raise PydanticCustomError("name", "{reason}", {"reason": refusal})
    return value


Name = Annotated[SafeStr, AfterValidator(_check_name)]
FullName = Annotated[SafeStr, Field(min_length=1, max_length=100)]
Description1000 = Annotated[MultiLine, Field(max_length=1000)]
Location = Annotated[SafeStr, Field(max_length=100)]
Website = Annotated[SafeStr, Field(max_length=2048)]
LogoId = Annotated[SafeStr, Field(max_length=64)]
Visibility = Literal["PRIVATE", "SHARED"]
OrgRoleText = Literal["owner", "member", "collaborator"]


class _Request(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", strict=True
    )


class OrganizationBody(_Request):
    name: Name
    full_name: FullName
    description: Description1000 | None = None
    location: Location | None = None
    website: Website | None = None


class CreateOrganizationRequest(_Request):
    organization: OrganizationBody
    logo_id: LogoId | None = None


class UpdateOrganizationRequest(_Request):
    name: Name | None = None
    full_name: FullName | None = None
    description: Description1000 | None = None
    location: Location | None = None
    website: Website | None = None
    logo_id: LogoId | None = None


class WorkspaceBody(_Request):
    name: Name
    full_name: FullName
    description: Description1000 | None = None
    visibility: Visibility = "PRIVATE"


class CreateWorkspaceRequest(_Request):
    workspace: WorkspaceBody


class UpdateWorkspaceRequest(_Request):
    name: Name | None = None
    full_name: FullName | None = None
    description: Description1000 | None = None
    visibility: Visibility | None = None


class AddMemberRequest(_Request):
    # A user name or an email address.
    user: Annotated[SafeStr, Field(min_length=1, max_length=255)]


class UpdateMemberRoleRequest(_Request):
    role: OrgRoleText


class TeamBody(_Request):
    name: Name
    description: Annotated[MultiLine, Field(max_length=250)] | None = None


class CreateTeamRequest(_Request):
    team: TeamBody


class UpdateTeamRequest(_Request):
    name: Name | None = None
    description: Annotated[MultiLine, Field(max_length=250)] | None = None


class CreateTeamMemberRequest(_Request):
    user_name_or_email: Annotated[SafeStr, Field(min_length=1, max_length=255)]
