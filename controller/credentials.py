"""Credentials for data-links, in the shape of Seqera's `/credentials` API.

`POST /credentials {"credentials": {"name", "provider": "aws", "keys":
{"accessKey", "secretKey"}, "baseUrl"?, "region"?, "description"?}}` answers
`{"credentialsId"}`; `PUT /credentials/{id}` with the same object (every
field optional, `provider` only the current one) renames, moves the endpoint
or rotates the keys (204). `baseUrl` is the endpoint of an S3-compatible store
(absent for AWS). `GET /credentials/validate?name=` says whether a name is
free (204), taken (409) or not a name (400).

The keys are sealed with `controller.secret_box` bound to the credentials id
and never leave the controller except inside the desired state sent to the
agent that mounts them: no API response carries them, not even the access key
id (`controller.credential_responses`).

Roles: reference/studio-roles.md has no row for credentials; here they exist
only for data-links, so its data-links row applies: maintain and above add,
edit and delete credentials and read `/keys` (which holds nothing secret, but
is the reference's way to the keys); any participant lists and describes them
and validates a name. Another workspace's credentials are 404. Credentials
still used by a data-link cannot be deleted (409 naming the data-links and the
studios that mount them: deleting would leave those data-links unmountable).
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
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
from controller.credential_requests import (
    CreateCredentialsRequest,
    CredentialsKeys,
    UpdateCredentialsRequest,
    name_refusal,
)
from controller.db import Database
from controller.errors import BadRequest, Conflict, NotFound
from controller.models import Credentials, DataLink, Studio, utcnow
from controller.mounts import mount_entries
from controller.secret_box import SecretBox

__all__ = [
    "PROVIDERS",
    "CredentialsInUse",
    "CredentialsService",
    "CredentialsUser",
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


def _taken(name: str, field: str = "credentials.name") -> Conflict:
    return Conflict(f"{field}: credentials named {name!r} already exist in the workspace")


def _check_kind(keys: CredentialsKeys, provider: str) -> None:
    """400 for keys of another kind than the reference's `AwsSecurityKeys` with `mode: keys`."""
    if keys.discriminator is not None and keys.discriminator != provider:
        raise BadRequest(
            f"credentials.keys.discriminator: must be the provider {provider!r}, "
            f"got {keys.discriminator!r}"
        )
    if keys.mode not in (None, "keys") or keys.assume_role_arn:
        raise BadRequest(
            "credentials.keys.mode: only 'keys' (an access key and a secret key) is supported; "
            "IAM roles are not"
        )


def _keys(keys: CredentialsKeys, provider: str) -> dict[str, str]:
    """The secret to seal (400 naming a missing key)."""
    _check_kind(keys, provider)
    if keys.access_key is None:
        raise BadRequest("credentials.keys.accessKey: Field required")
    if keys.secret_key is None:
        raise BadRequest("credentials.keys.secretKey: Field required")
    return {"accessKey": keys.access_key, "secretKey": keys.secret_key}


@dataclass(frozen=True, slots=True)
class CredentialsUser:
    """What keeps credentials from being deleted: a data-link, or a studio mounting one."""

    id: str
    name: str
    # "dataLink" or "studio" (the reference's conflict `type` is free text).
    type: str


class CredentialsInUse(Conflict):
    """409 of DELETE: the web layer answers the reference's conflict body with `users`."""

    def __init__(self, credentials_id: str, users: list[CredentialsUser]) -> None:
        links = ", ".join(u.name for u in users if u.type == "dataLink")
        studios = ", ".join(u.name for u in users if u.type == "studio")
        message = f"credentials {credentials_id} are used by data-links: {links}"
        if studios:
            message += f" (mounted by studios: {studios})"
        super().__init__(message + "; delete them or give them other credentials first")
        self.credentials_id = credentials_id
        self.users = users


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
        secret = _keys(given.keys, given.provider)
        base_url = check_base_url(given.base_url, "credentials.baseUrl")
        region = check_region(given.region, "credentials.region")
        taken = _taken(given.name)
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
                        secret=self.box.seal(secret, cred_id),
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
        # "" clears the endpoint or region; absent keeps it.
        base_url = check_base_url(given.base_url, "credentials.baseUrl")
        region = check_region(given.region, "credentials.region")
        taken = _taken(given.name or "")
        try:
            async with self.db.transaction() as session:
                cred = await self._credentials(
                    session, principal, credentials_id, workspace_id, Permission.DATA_LINKS
                )
                if given.provider is not None and given.provider != cred.provider:
                    raise BadRequest(
                        f"credentials.provider: cannot change ({cred.provider!r}, "
                        f"got {given.provider!r}); add new credentials instead"
                    )
                # Keys without either key (a client sending back {"discriminator": "aws"})
                # keep the stored ones; with one, both are needed.
                secret = None
                if given.keys is not None:
                    _check_kind(given.keys, cred.provider)
                    if given.keys.access_key is not None or given.keys.secret_key is not None:
                        secret = _keys(given.keys, cred.provider)
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
                if secret is not None:
                    cred.secret = self.box.seal(secret, cred.id)
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
            links = (
                await session.scalars(
                    select(DataLink)
                    .where(DataLink.credentials_id == cred.id)
                    .order_by(DataLink.name)
                )
            ).all()
            if links:
                raise CredentialsInUse(cred.id, await _users(session, cred.workspace_id, links))
            await session.delete(cred)

    async def validate_name(
        self, principal: Principal, workspace_id: int | None, name: str | None
    ) -> None:
        """None when `name` is free in the workspace; 400 when it is no name, 409 when taken."""
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        async with self.db.transaction() as session:
            await workspace_access(session, principal, workspace_id, Permission.READ)
            if name is None:
                raise BadRequest("name: required (GET /credentials/validate?name=...)")
            reason = name_refusal(name)
            if reason is not None:
                raise BadRequest(f"name: {reason}")
            if await session.scalar(
                select(Credentials.id).where(
                    Credentials.workspace_id == workspace_id, Credentials.name == name
                )
            ):
                raise _taken(name, "name")

    async def keys(
        self, principal: Principal, credentials_id: str, workspace_id: int | None
    ) -> Credentials:
        """The credentials behind `GET /credentials/{id}/keys`: only those who manage them
        may ask for their keys, though the answer holds nothing secret (see
        controller.credential_responses.keys_view)."""
        async with self.db.transaction() as session:
            return await self._credentials(
                session, principal, credentials_id, workspace_id, Permission.DATA_LINKS
            )


async def _users(
    session: AsyncSession, workspace_id: int, links: Sequence[DataLink]
) -> list[CredentialsUser]:
    """The data-links and, after them, the live studios of the workspace that mount one."""
    users = [CredentialsUser(link.id, link.name, "dataLink") for link in links]
    ids = {link.id for link in links}
    studios = (
        await session.scalars(
            select(Studio)
            .where(Studio.workspace_id == workspace_id, Studio.deleted.is_(False))
            .order_by(Studio.name)
        )
    ).all()
    users += [
        CredentialsUser(studio.session_id, studio.name, "studio")
        for studio in studios
        if any(link_id in ids for link_id, _ in mount_entries(studio.configuration))
    ]
    return users
