"""Authentication (bearer tokens) and authorisation (workspace roles).

Roles, highest first: owner, admin, maintain, launch, connect, view
(`docs`: reference/studio-roles.md). A permission names the lowest role that
holds it; a user's role in a workspace comes from the participants table (a
team membership, later, adds candidates and the highest wins). A user without
a role in a workspace sees nothing of it: callers answer 404, not 403.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.errors import BadRequest, Forbidden, Unauthorized
from controller.models import ApiToken, EnrollmentToken, Participant, User, utcnow

__all__ = [
    "Permission",
    "Principal",
    "Role",
    "authenticate",
    "check_enrollment_token",
    "hash_token",
    "new_token",
    "parse_bearer",
    "require",
    "workspace_role",
]


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MAINTAIN = "maintain"
    LAUNCH = "launch"
    CONNECT = "connect"
    VIEW = "view"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text.lower())
        except ValueError:
            names = ", ".join(r.value for r in cls)
            raise BadRequest(f"role: unknown role {text!r} (one of {names})") from None


_RANK = {
    Role.VIEW: 0,
    Role.CONNECT: 1,
    Role.LAUNCH: 2,
    Role.MAINTAIN: 3,
    Role.ADMIN: 4,
    Role.OWNER: 5,
}


class Permission(StrEnum):
    """What an endpoint needs. The value is a readable name for messages."""

    READ = "view studios"
    CONNECT = "connect to a studio"
    WRITE = "add, edit or delete a studio"
    EXECUTE = "start or stop a studio"
    ADMIN = "manage compute environments and workspace settings"


# The lowest role holding each permission (studio-roles.md).
_MINIMUM_ROLE = {
    Permission.READ: Role.VIEW,
    Permission.CONNECT: Role.CONNECT,
    Permission.WRITE: Role.MAINTAIN,
    Permission.EXECUTE: Role.MAINTAIN,
    Permission.ADMIN: Role.ADMIN,
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a REST request."""

    user_id: int
    user_name: str
    email: str


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    return token.strip()


async def authenticate(session: AsyncSession, header: str | None) -> Principal:
    """The user owning the bearer token in `header`; Unauthorized otherwise."""
    token = parse_bearer(header)
    row = (
        await session.execute(
            select(ApiToken, User)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == hash_token(token))
        )
    ).first()
    if row is None:
        raise Unauthorized("invalid API token")
    api_token, user = row
    api_token.last_used = utcnow()
    return Principal(user_id=user.id, user_name=user.user_name, email=user.email)


async def check_enrollment_token(session: AsyncSession, token: str) -> bool:
    row = await session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token))
    )
    if row is None:
        return False
    row.last_used = utcnow()
    return True


async def workspace_role(session: AsyncSession, user_id: int, workspace_id: int) -> Role | None:
    """The user's highest role in the workspace, None when they have none."""
    roles = (
        await session.scalars(
            select(Participant.role).where(
                Participant.user_id == user_id, Participant.workspace_id == workspace_id
            )
        )
    ).all()
    parsed = [Role(r) for r in roles if r in Role._value2member_map_]
    return max(parsed, key=lambda r: r.rank, default=None)


def require(role: Role, permission: Permission) -> None:
    """Raise Forbidden unless `role` holds `permission`."""
    minimum = _MINIMUM_ROLE[permission]
    if role.rank < minimum.rank:
        raise Forbidden(f"role '{role}' may not {permission.value} (needs '{minimum}' or higher)")
