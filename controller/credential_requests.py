"""Request bodies of `/credentials` (the reference's `Credentials` and its `keys`).

As `controller.requests`: camelCase, unknown fields ignored, known fields strict, no
control characters. The reference's read-only fields a client may send back from a
describe (`id`, `category`, `dateCreated`, `status`, ...) are ignored like any unknown one.

`keys` is the reference's `SecurityKeys` oneOf, of which this controller takes the `aws`
member with `mode: keys` (an access key and a secret key): `discriminator`, when sent, must
name the credentials' provider; `mode: role` and `assumeRoleArn` are refused (400) rather
than ignored, since credentials that silently lose their role would not work.

Lengths are the reference's where it gives one (`name` 100, `baseUrl` 200): an answer
echoing a longer value would violate the reference's schema. The reference gives credential
names no pattern (organisation and workspace names have one; credentials do not), so a name
is 1 to 100 characters on one line, not blank; spaces are allowed, as before.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from controller.requests import Description, SafeStr

__all__ = [
    "NAME_MAX_LENGTH",
    "CreateCredentialsRequest",
    "CredentialsBody",
    "CredentialsKeys",
    "CredentialsUpdateBody",
    "UpdateCredentialsRequest",
    "name_refusal",
]

NAME_MAX_LENGTH = 100
BASE_URL_MAX_LENGTH = 200


def name_refusal(name: str) -> str | None:
    """Why `name` cannot name credentials (None: it can). Shared by create, update and
    `GET /credentials/validate`, so the three agree."""
    if not name.strip():
        return "must not be blank"
    if len(name) > NAME_MAX_LENGTH:
        return f"must be at most {NAME_MAX_LENGTH} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "must not contain control characters"
    return None


def _check_name(name: str) -> str:
    reason = name_refusal(name)
    if reason is not None:
        raise PydanticCustomError("credentials_name", reason)
    return name


CredentialsName = Annotated[SafeStr, AfterValidator(_check_name)]


class _Request(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        str_strip_whitespace=False,
        strict=True,
    )


class CredentialsKeys(_Request):
    """The reference's `AwsSecurityKeys`: stored sealed, never returned.

    Both keys are optional here so that an update can send `keys` without them (a client
    echoing `{"discriminator": "aws"}`); the service says which one is missing when a create
    or a rotation lacks one."""

    discriminator: Annotated[SafeStr, Field(max_length=32)] | None = None
    mode: Annotated[SafeStr, Field(max_length=16)] | None = None
    access_key: Annotated[SafeStr, Field(min_length=1, max_length=256)] | None = None
    secret_key: Annotated[SafeStr, Field(min_length=1, max_length=1024)] | None = None
    assume_role_arn: Annotated[SafeStr, Field(max_length=2048)] | None = None


class CredentialsBody(_Request):
    name: CredentialsName
    provider: Annotated[SafeStr, Field(min_length=1, max_length=32)]
    description: Description | None = None
    # Endpoint of an S3-compatible store (SeaweedFS, MinIO, ...); absent for AWS.
    base_url: Annotated[SafeStr, Field(max_length=BASE_URL_MAX_LENGTH)] | None = None
    # Not in the reference: the region the store's buckets are in by default.
    region: Annotated[SafeStr, Field(max_length=64)] | None = None
    keys: CredentialsKeys


class CreateCredentialsRequest(_Request):
    credentials: CredentialsBody


class CredentialsUpdateBody(_Request):
    """The reference sends the whole `Credentials` object; here every field is optional:
    absent is kept, `keys` with both keys rotates them, `provider` may only repeat the
    current one."""

    name: CredentialsName | None = None
    provider: Annotated[SafeStr, Field(max_length=32)] | None = None
    description: Description | None = None
    base_url: Annotated[SafeStr, Field(max_length=BASE_URL_MAX_LENGTH)] | None = None
    region: Annotated[SafeStr, Field(max_length=64)] | None = None
    keys: CredentialsKeys | None = None


class UpdateCredentialsRequest(_Request):
    credentials: CredentialsUpdateBody
