"""Response bodies of `/credentials`: the reference's schemas (`seqera-orgs-openapi.yaml`),
camelCase, a field without a value omitted (the reference declares none of these nullable).

What is never here: `keys`. The reference's `Credentials.keys` would carry the access key
id (only `secretKey` is write-only there); this controller returns neither, so a listing
or a describe cannot leak a key to a participant who may read but not manage credentials.
`GET /credentials/{id}/keys` (`GetCredentialsKeysResponse`) answers only what is not secret
(`keys_view`). The sealed keys leave the controller only in the desired state an agent
receives for the studio that mounts them (`controller.desired`).

Only the web layer builds these (`controller.web_datalinks`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Literal

from controller.models import Credentials, as_utc
from controller.response_model import ResponseModel as _Response

__all__ = [
    "CreateCredentialsResponse",
    "CredentialsConflict",
    "CredentialsDto",
    "DeleteCredentialsConflictResponse",
    "DescribeCredentialsResponse",
    "GetCredentialsKeysResponse",
    "ListCredentialsResponse",
    "credentials_dto",
    "keys_view",
]


class CredentialsDto(_Response):
    """The reference's `Credentials`, without `keys` (see the module docstring)."""

    id: str
    name: str
    description: str | None = None
    provider: str
    base_url: str | None = None
    # Not in the reference: the store's default region.
    region: str | None = None
    category: str = "cloud"
    # Never probed against the provider: the reference says AVAILABLE until a probe fails.
    status: Literal["AVAILABLE", "INVALID"] = "AVAILABLE"
    # Deleted credentials are gone, never listed.
    deleted: bool = False
    date_created: str
    last_updated: str
    last_used: str | None = None


class CreateCredentialsResponse(_Response):
    credentials_id: str


class DescribeCredentialsResponse(_Response):
    credentials: CredentialsDto


class ListCredentialsResponse(_Response):
    credentials: list[CredentialsDto]


class GetCredentialsKeysResponse(_Response):
    # A JSON document as a string, as the reference has it (`keys: string`).
    keys: str


class CredentialsConflict(_Response):
    """One user of the credentials: the reference's `DeleteCredentialsConflictResponse.Conflict`."""

    id: str
    name: str
    # "dataLink" or "studio".
    type: str


class DeleteCredentialsConflictResponse(_Response):
    """The reference's 409 body, plus our `message` (every error of this API has one)."""

    message: str
    credentials_id: str
    conflicts: list[CredentialsConflict]


def _iso(value: datetime | None) -> str | None:
    # As every date of this API (controller.views.iso): RFC 3339, UTC, milliseconds.
    stamp = as_utc(value)
    if stamp is None:
        return None
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def credentials_dto(cred: Credentials) -> CredentialsDto:
    return CredentialsDto(
        id=cred.id,
        name=cred.name,
        # "" is stored by an update that clears it: no value, no field.
        description=cred.description or None,
        provider=cred.provider,
        base_url=cred.base_url,
        region=cred.region,
        date_created=_iso(cred.date_created) or "",
        last_updated=_iso(cred.last_updated) or "",
        last_used=_iso(cred.last_used),
    )


def keys_view(cred: Credentials) -> GetCredentialsKeysResponse:
    """What `GET /credentials/{id}/keys` answers.

    The reference returns the keys there encrypted for a pairing key of Seqera's Tower
    Agent (`pairingId`). This controller has no such pairing (its agents get keys in their
    desired state, over their mutual-TLS link), and anything that can be decrypted is a
    secret in an API answer, so the document holds only the non-secret parts of the
    reference's `AwsSecurityKeys`: which kind of keys these are, never `accessKey` or
    `secretKey`.
    """
    return GetCredentialsKeysResponse(
        keys=json.dumps({"discriminator": cred.provider, "mode": "keys"}, separators=(",", ":"))
    )
