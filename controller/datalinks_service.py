"""Data-links: create, list and search, describe, update, delete; and the
checks and views studios need of them.

Shapes follow the reference (`/data-links`, DataLinkDto). Provider `aws`
(S3 and S3-compatible stores through the credentials' `baseUrl`), type
`bucket`, `resourceRef` "s3://bucket" or "s3://bucket/sub/dir" (validated
and normalised by `controller.mounts`). Names are unique in a workspace.
`workspaceId` omitted: the default workspace for create and list, the
data-link's own workspace for a single one; another workspace's data-link
is 404. Roles: maintain and above add, edit and delete; any participant
lists and describes.

List search: whitespace-separated terms, all must match; `region:R` and
`provider:P` are keywords, other terms are case-insensitive substrings of
the name.

Deleting a data-link that studios mount is allowed (as in Seqera): a running
session keeps its mount until it stops; the next start skips it and says so.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.auth import Permission, Principal
from controller.credentials import PROVIDERS, check_region, workspace_access, workspace_object
from controller.db import Database, escape_like
from controller.errors import BadRequest, Conflict, NotFound
from controller.models import Credentials, DataLink, utcnow
from controller.mounts import normalize_resource_ref
from controller.requests import DataLinkCreateRequest, DataLinkUpdateRequest
from controller.studios_service import Page, parse_search

__all__ = ["DataLinkRow", "DataLinkService"]

DEFAULT_WORKSPACE_ID = 1
DEFAULT_PAGE_SIZE = 50
_KEYWORDS = {"region": "region", "provider": "provider"}


def _contains(column: Any, word: str) -> Any:
    """Case-insensitive substring match, LIKE wildcards in `word` taken literally."""
    return func.lower(column).like(f"%{escape_like(word.lower())}%", escape="\\")


@dataclass(frozen=True, slots=True)
class DataLinkRow:
    """A data-link and its credentials (None for a public bucket)."""

    link: DataLink
    credentials: Credentials | None


def _check_name(name: str, field: str) -> str:
    if not name.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadRequest(f"{field}: must not be blank or contain control characters")
    return name


class DataLinkService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def _link(
        self,
        session: AsyncSession,
        principal: Principal,
        link_id: str,
        workspace_id: int | None,
        permission: Permission,
    ) -> DataLink:
        return await workspace_object(
            session, principal, DataLink, link_id, "data-link", workspace_id, permission
        )

    @staticmethod
    async def _credentials(
        session: AsyncSession, workspace_id: int, credentials_id: str | None
    ) -> Credentials | None:
        if not credentials_id:
            return None
        cred = await session.get(Credentials, credentials_id)
        if cred is None or cred.workspace_id != workspace_id:
            raise NotFound(f"credentials {credentials_id} not found")
        return cred

    @staticmethod
    async def _name_taken(
        session: AsyncSession, workspace_id: int, name: str, exclude: str | None = None
    ) -> bool:
        query = select(DataLink.id).where(
            DataLink.workspace_id == workspace_id, DataLink.name == name
        )
        if exclude:
            query = query.where(DataLink.id != exclude)
        return (await session.scalar(query)) is not None

    async def create(
        self, principal: Principal, workspace_id: int | None, body: DataLinkCreateRequest
    ) -> DataLinkRow:
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        name = _check_name(body.name, "name")
        provider = body.provider or "aws"
        if provider not in PROVIDERS:
            raise BadRequest(
                f"provider: only 'aws' (S3 and S3-compatible stores) is supported, got {provider!r}"
            )
        if (body.type or "bucket") != "bucket":
            raise BadRequest(f"type: only 'bucket' is supported, got {body.type!r}")
        ref = normalize_resource_ref(body.resource_ref)
        region = check_region(body.region, "region")
        taken = Conflict(f"a data-link named {name!r} already exists in the workspace")
        try:
            async with self.db.transaction() as session:
                await workspace_access(session, principal, workspace_id, Permission.DATA_LINKS)
                cred = await self._credentials(session, workspace_id, body.credentials_id)
                if cred is not None and cred.provider != provider:
                    raise BadRequest(
                        f"credentialsId: credentials {cred.id} are for {cred.provider}, "
                        f"not {provider}"
                    )
                if await self._name_taken(session, workspace_id, name):
                    raise taken
                now = utcnow()
                link = DataLink(
                    id=f"v1-user-{secrets.token_hex(16)}",
                    workspace_id=workspace_id,
                    name=name,
                    description=body.description,
                    provider=provider,
                    type="bucket",
                    resource_ref=ref,
                    region=region,
                    credentials_id=cred.id if cred else None,
                    public_accessible=bool(body.public_accessible),
                    date_created=now,
                    last_updated=now,
                )
                session.add(link)
                await session.flush()
                return DataLinkRow(link, cred)
        except IntegrityError:
            raise taken from None

    async def list(
        self,
        principal: Principal,
        workspace_id: int | None,
        credentials_id: str | None,
        search: str | None,
        page: Page,
    ) -> tuple[list[DataLinkRow], int]:
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        words, keywords = parse_search(search, _KEYWORDS)
        async with self.db.transaction() as session:
            await workspace_access(session, principal, workspace_id, Permission.READ)
            query = select(DataLink).where(DataLink.workspace_id == workspace_id)
            if credentials_id:
                await self._credentials(session, workspace_id, credentials_id)
                query = query.where(DataLink.credentials_id == credentials_id)
            for word in words:
                query = query.where(_contains(DataLink.name, word))
            if "provider" in keywords:
                query = query.where(
                    func.lower(DataLink.provider).in_([v.lower() for v in keywords["provider"]])
                )
            if "region" in keywords:
                # The data-link's region, else its credentials'.
                regions = [v.lower() for v in keywords["region"]]
                by_creds = select(Credentials.id).where(func.lower(Credentials.region).in_(regions))
                query = query.where(
                    func.lower(DataLink.region).in_(regions)
                    | (DataLink.region.is_(None) & DataLink.credentials_id.in_(by_creds))
                )
            total = await session.scalar(
                select(func.count()).select_from(query.with_only_columns(DataLink.id).subquery())
            )
            query = (
                query.order_by(DataLink.name, DataLink.id)
                .offset(page.offset)
                .limit(page.max if page.max is not None else DEFAULT_PAGE_SIZE)
            )
            links = (await session.scalars(query)).all()
            cred_ids = {link.credentials_id for link in links if link.credentials_id}
            creds = (
                {
                    c.id: c
                    for c in (
                        await session.scalars(
                            select(Credentials).where(Credentials.id.in_(cred_ids))
                        )
                    ).all()
                }
                if cred_ids
                else {}
            )
            items = [DataLinkRow(link, creds.get(link.credentials_id or "")) for link in links]
            return items, int(total or 0)

    async def get(
        self,
        principal: Principal,
        link_id: str,
        workspace_id: int | None,
        credentials_id: str | None,
    ) -> DataLinkRow:
        async with self.db.transaction() as session:
            link = await self._link(session, principal, link_id, workspace_id, Permission.READ)
            if credentials_id:
                await self._credentials(session, link.workspace_id, credentials_id)
            cred = await session.get(Credentials, link.credentials_id or "")
            return DataLinkRow(link, cred)

    async def update(
        self,
        principal: Principal,
        link_id: str,
        workspace_id: int | None,
        body: DataLinkUpdateRequest,
    ) -> DataLinkRow:
        taken = Conflict(f"a data-link named {body.name!r} already exists in the workspace")
        try:
            async with self.db.transaction() as session:
                link = await self._link(
                    session, principal, link_id, workspace_id, Permission.DATA_LINKS
                )
                if body.name is not None and body.name != link.name:
                    _check_name(body.name, "name")
                    if await self._name_taken(session, link.workspace_id, body.name, link.id):
                        raise taken
                    link.name = body.name
                if body.description is not None:
                    link.description = body.description
                if body.credentials_id is not None:
                    # "" removes the credentials (a public bucket).
                    cred = await self._credentials(session, link.workspace_id, body.credentials_id)
                    link.credentials_id = cred.id if cred else None
                link.last_updated = utcnow()
                await session.flush()
                cred = await session.get(Credentials, link.credentials_id or "")
                return DataLinkRow(link, cred)
        except IntegrityError:
            raise taken from None

    async def delete(self, principal: Principal, link_id: str, workspace_id: int | None) -> None:
        async with self.db.transaction() as session:
            link = await self._link(
                session, principal, link_id, workspace_id, Permission.DATA_LINKS
            )
            await session.delete(link)
