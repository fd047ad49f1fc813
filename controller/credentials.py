"""Credentials for data-links, in the shape of Seqera's `/credentials` API.

`POST /credentials {"credentials": {"name", "provider": "aws", "keys":
{"accessKey", "secretKey"}, "baseUrl"?, "region"?, "description"?}}` answers
`{"credentialsId"}`; `PUT /credentials/{id}` with the same object (every
field optional, `provider` ignored) renames, moves the endpoint or rotates
the keys (204). `baseUrl` is the endpoint of an S3-compatible store
(absent for AWS). The keys are sealed with `controller.secret_box` bound to
the credentials id and never leave the controller except inside the desired
state sent to the agent that mounts them: no API response carries them, not
even the access key id.

Roles: maintain and above add and delete credentials (the data-links row of
reference/studio-roles.md), any participant lists and describes them;
another workspace's credentials are 404. Credentials still used by a
data-link cannot be deleted (409 naming the data-links).
"""

from __future__ import annotations

import re
import secrets
import string
from typing import TypeVar
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.auth import (
    Permission,
    Principal,
    Role,
    require,
    workspace_role,
    workspace_role_or_404,
)
from controller.db import Database
from controller.errors import BadRequest, Conflict, NotFound
from controller.models import Credentials, DataLink, utcnow
from controller.requests import CreateCredentialsRequest, UpdateCredentialsRequest
from controller.secret_box import SecretBox

__all__ = [
    "PROVIDERS",
    "CredentialsService",
    "check_base_url",
    "check_region",
    "workspace_access",
]

DEFAULT_WORKSPACE_ID = 1
# S3 and S3-compatible stores (the only kind data-links mount for now).
PROVIDERS = ("aws",)
_ID_ALPHABET = string.ascii_letters + string.digits
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


_Owned = TypeVar("_Owned", Credentials, DataLink)


def _new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(22))


async def workspace_access(
    session: AsyncSession, principal: Principal, workspace_id: int, permission: Permission
) -> Role:
    """The caller's role in the workspace (404 without one, 403 below `permission`)."""
    role = await workspace_role_or_404(session, principal.user_id, workspace_id)
    require(role, permission)
    return role


async def workspace_object(
    session: AsyncSession,
    principal: Principal,
    model: type[_Owned],
    object_id: str,
    label: str,
    workspace_id: int | None,
    permission: Permission,
) -> _Owned:
    """A workspace-owned row the caller may use: 404 for another workspace's or an
    unknown one (never 403, so ids do not leak), 403 below `permission`."""
    row = await session.get(model, object_id)
    if row is None or (workspace_id is not None and row.workspace_id != workspace_id):
        raise NotFound(f"{label} {object_id} not found")
    if await workspace_role(session, principal.user_id, row.workspace_id) is None:
        raise NotFound(f"{label} {object_id} not found")
    await workspace_access(session, principal, row.workspace_id, permission)
    return row


def check_base_url(text: str | None, field: str) -> str | None:
    if text is None or not text.strip():
        return None
    url = text.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{field}: expected an http:// or https:// endpoint URL, got {url!r}")
    if parts.username or parts.password:
        raise BadRequest(f"{field}: must not contain a user name or password (use keys)")
    if any(c in url for c in "\x00\n\r\\ "):
        raise BadRequest(f"{field}: must not contain spaces, backslashes or control characters")
    return url.rstrip("/")


def check_region(text: str | None, field: str) -> str | None:
    if text is None or not text.strip():
        return None
    if not _REGION.match(text):
        raise BadRequest(f"{field}: expected a region name like 'eu-west-1', got {text!r}")
    return text


def _check_name(name: str) -> None:
    if not name.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadRequest("credentials.name: must not be blank or contain control characters")


class CredentialsService:
    def __init__(self, db: Database, box: SecretBox) -> None:
        self.db = db
        self.box = box

    async def _credentials(
        self,
        session: AsyncSession,
        principal: Principal,
        credentials_id: str,
        workspace_id: int | None,
        permission: Permission,
    ) -> Credentials:
        return await workspace_object(
            session, principal, Credentials, credentials_id, "credentials", workspace_id, permission
        )

    async def create(
        self, principal: Principal, workspace_id: int | None, body: CreateCredentialsRequest
    ) -> str:
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        given = body.credentials
        if given.provider not in PROVIDERS:
            raise BadRequest(
                f"credentials.provider: only 'aws' (S3 and S3-compatible stores) is supported, "
                f"got {given.provider!r}"
            )
        _check_name(given.name)
        base_url = check_base_url(given.base_url, "credentials.baseUrl")
        region = check_region(given.region, "credentials.region")
        taken = Conflict(f"credentials named {given.name!r} already exist in the workspace")
        try:
            async with self.db.transaction() as session:
                await workspace_access(session, principal, workspace_id, Permission.DATA_LINKS)
                if await session.scalar(
                    select(Credentials.id).where(
                        Credentials.workspace_id == workspace_id, Credentials.name == given.name
                    )
                ):
                    raise taken
                cred_id = _new_id()
                now = utcnow()
                session.add(
                    Credentials(
                        id=cred_id,
                        workspace_id=workspace_id,
                        name=given.name,
                        description=given.description,
                        provider=given.provider,
                        base_url=base_url,
                        region=region,
                        secret=self.box.seal(
                            {
                                "accessKey": given.keys.access_key,
                                "secretKey": given.keys.secret_key,
                            },
                            cred_id,
                        ),
                        date_created=now,
                        last_updated=now,
                    )
                )
        except IntegrityError:
            raise taken from None
        return cred_id

    async def list(
        self, principal: Principal, workspace_id: int | None, provider: str | None
    ) -> list[Credentials]:
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        async with self.db.transaction() as session:
            await workspace_access(session, principal, workspace_id, Permission.READ)
            query = select(Credentials).where(Credentials.workspace_id == workspace_id)
            if provider:
                query = query.where(Credentials.provider == provider)
            rows = (await session.scalars(query.order_by(Credentials.name))).all()
            return list(rows)

    async def get(
        self, principal: Principal, credentials_id: str, workspace_id: int | None
    ) -> Credentials:
        async with self.db.transaction() as session:
            cred = await self._credentials(
                session, principal, credentials_id, workspace_id, Permission.READ
            )
            return cred

    async def update(
        self,
        principal: Principal,
        credentials_id: str,
        workspace_id: int | None,
        body: UpdateCredentialsRequest,
    ) -> None:
        """Rename, re-describe, move the endpoint or rotate the keys.

        Running sessions keep the keys they were started with; the next start
        of a studio uses the new ones.
        """
        given = body.credentials
        if given.name is not None:
            _check_name(given.name)
        # "" clears the endpoint or region; absent keeps it.
        base_url = check_base_url(given.base_url, "credentials.baseUrl")
        region = check_region(given.region, "credentials.region")
        taken = Conflict(f"credentials named {given.name!r} already exist in the workspace")
        try:
            async with self.db.transaction() as session:
                cred = await self._credentials(
                    session, principal, credentials_id, workspace_id, Permission.DATA_LINKS
                )
                if given.name is not None and given.name != cred.name:
                    if await session.scalar(
                        select(Credentials.id).where(
                            Credentials.workspace_id == cred.workspace_id,
                            Credentials.name == given.name,
                        )
                    ):
                        raise taken
                    cred.name = given.name
                if given.description is not None:
                    cred.description = given.description
                if given.base_url is not None:
                    cred.base_url = base_url
                if given.region is not None:
                    cred.region = region
                if given.keys is not None:
                    cred.secret = self.box.seal(
                        {"accessKey": given.keys.access_key, "secretKey": given.keys.secret_key},
                        cred.id,
                    )
                cred.last_updated = utcnow()
                await session.flush()
        except IntegrityError:
            raise taken from None

    async def delete(
        self, principal: Principal, credentials_id: str, workspace_id: int | None
    ) -> None:
        async with self.db.transaction() as session:
            cred = await self._credentials(
                session, principal, credentials_id, workspace_id, Permission.DATA_LINKS
            )
            users = (
                await session.scalars(
                    select(DataLink.name)
                    .where(DataLink.credentials_id == cred.id)
                    .order_by(DataLink.name)
                )
            ).all()
            if users:
                raise Conflict(
                    f"credentials {cred.id} are used by data-links: {', '.join(users)}; "
                    "delete them or give them other credentials first"
                )
            await session.delete(cred)
