"""Authentication (bearer tokens) and authorisation (workspace roles).

Roles, highest first: owner, admin, maintain, launch, connect, view
(reference/studio-roles.md). A permission names the lowest role that holds it
(`MINIMUM_ROLE` is that table). A user's role in a workspace is the highest of
their direct participant role and the roles of the teams they belong to. A
user without a role in a workspace sees nothing of it: callers answer 404, not
403.

Private studios (`check_studio_access`): connecting needs the connect role
*and* being the creator or one of `allowedUserIds` (admins and owners
included: they cannot connect either). Start, stop, edit, delete and clone of
a private studio need the role of the action and, below admin, also being the
creator or an allowed user; admins and owners may start, stop, edit and
delete any private studio. What `studios_service` adds on top (widening
`allowedUserIds`, clones of private studios) and the team rule of
`workspaces_service`: docs/contract-notes.md, "Authorization rules beyond roles".
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from controller.errors import BadRequest, Forbidden, NotFound, Unauthorized
from controller.models import (
    ApiToken,
    Participant,
    Studio,
    TeamMember,
    User,
    as_utc,
    utcnow,
)

__all__ = [
    "MINIMUM_ROLE",
    "Permission",
    "Principal",
    "Role",
    "authenticate",
    "check_studio_access",
    "hash_token",
    "new_token",
    "parse_bearer",
    "require",
    "studio_access_denial",
    "workspace_role",
    "workspace_role_or_404",
    "workspace_roles",
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
    """What an endpoint needs (a row of studio-roles.md). The value is for messages."""

    READ = "view studios and their checkpoints"
    CONNECT = "connect to a studio"
    WRITE = "add, edit or delete a studio"
    EXECUTE = "start or stop a studio"
    CLONE = "add a studio as new"
    RENAME_CHECKPOINT = "rename a checkpoint"
    LABELS = "edit studio resource labels"
    SETTINGS = "edit workspace Studios settings"
    ADMIN = "add, rename or delete compute environments"
    DATA_LINKS = "add, edit or remove data-links"
    PARTICIPANTS = "add or remove participants or change their role"
    # An addition (no row of the reference table): the connection audit.
    AUDIT = "list who connected to a studio"


# The lowest role holding each permission (studio-roles.md).
MINIMUM_ROLE: dict[Permission, Role] = {
    Permission.READ: Role.VIEW,
    Permission.CONNECT: Role.CONNECT,
    Permission.WRITE: Role.MAINTAIN,
    Permission.EXECUTE: Role.MAINTAIN,
    Permission.CLONE: Role.MAINTAIN,
    Permission.RENAME_CHECKPOINT: Role.MAINTAIN,
    Permission.LABELS: Role.MAINTAIN,
    Permission.SETTINGS: Role.ADMIN,
    Permission.ADMIN: Role.ADMIN,
    Permission.DATA_LINKS: Role.MAINTAIN,
    Permission.PARTICIPANTS: Role.MAINTAIN,
    Permission.AUDIT: Role.ADMIN,
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


# RFC 6750's b64token, as long as any token of ours can be (join tokens are the longest).
# `lastUsed` of an API token is kept to this precision: writing it on every request
# would turn each read (GET /studios, a long-poll) into a write transaction, which
# serialises them on SQLite and costs a WAL flush each on PostgreSQL.
LAST_USED_PRECISION = timedelta(minutes=1)


def mark_token_used(token: ApiToken) -> None:
    """Record the token's use, at most once per `LAST_USED_PRECISION`."""
    now = utcnow()
    last = as_utc(token.last_used)
    if last is None or now - last >= LAST_USED_PRECISION:
        token.last_used = now


_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]{1,512}=*")


def parse_bearer(header: str | None) -> str:
    """The token of ``Authorization: Bearer <token>``; Unauthorized for anything else.

    A token is printable ASCII of RFC 6750's alphabet: a header with non-ASCII
    bytes, control characters, spaces inside or an over-long token is refused
    here, before it is hashed or looked up.
    """
    if not header:
        raise Unauthorized("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    if not _BEARER_TOKEN.fullmatch(token):
        raise Unauthorized(
            "malformed bearer token (expected ASCII letters, digits and -._~+/, "
            "at most 512 characters)"
        )
    return token


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
    if row is None or row[1].deleted:
        # A deleted user's tokens are gone too; the check keeps it so whatever the order.
        raise Unauthorized("invalid API token")
    api_token, user = row
    mark_token_used(api_token)
    return Principal(user_id=user.id, user_name=user.user_name, email=user.email)


async def workspace_role(session: AsyncSession, user_id: int, workspace_id: int) -> Role | None:
    """The user's highest role in the workspace (direct or through a team), None if none."""
    return (await workspace_roles(session, workspace_id, [user_id])).get(user_id)


async def workspace_role_or_404(
    session: AsyncSession, user_id: int, workspace_id: int, not_found: str | None = None
) -> Role:
    """The user's highest role in the workspace; NotFound when they have none.

    Not Forbidden: someone outside a workspace is not told that it exists.
    """
    role = await workspace_role(session, user_id, workspace_id)
    if role is None:
        raise NotFound(not_found or f"workspace {workspace_id} not found")
    return role


async def workspace_roles(
    session: AsyncSession, workspace_id: int, user_ids: Iterable[int] | None = None
) -> dict[int, Role]:
    """{user id: highest role} of the workspace's users (all, or those of `user_ids`).

    The one place that combines direct and team roles: single checks
    (`workspace_role`) and the connect access list (`controller.access`) agree.
    """
    direct = select(Participant.user_id, Participant.role).where(
        Participant.workspace_id == workspace_id, Participant.user_id.is_not(None)
    )
    via_team = (
        select(TeamMember.user_id, Participant.role)
        .join(Participant, Participant.team_id == TeamMember.team_id)
        .where(Participant.workspace_id == workspace_id)
    )
    if user_ids is not None:
        wanted = list(user_ids)
        direct = direct.where(Participant.user_id.in_(wanted))
        via_team = via_team.where(TeamMember.user_id.in_(wanted))
    best: dict[int, Role] = {}
    # A compound select's rows are untyped; these are the two selected columns.
    user_id: int | None
    text: str
    for user_id, text in (await session.execute(union_all(direct, via_team))).all():
        if user_id is None or text not in Role._value2member_map_:
            continue
        role = Role(text)
        if user_id not in best or role.rank > best[user_id].rank:
            best[user_id] = role
    return best


def require(role: Role, permission: Permission) -> None:
    """Raise Forbidden unless `role` holds `permission`."""
    minimum = MINIMUM_ROLE[permission]
    if role.rank < minimum.rank:
        raise Forbidden(f"role '{role}' may not {permission.value} (needs '{minimum}' or higher)")


def check_studio_access(
    studio: Studio, role: Role, principal: Principal, permission: Permission
) -> None:
    """`require` plus the rules of private studios (see the module docstring)."""
    denial = studio_access_denial(studio, role, principal.user_id, permission)
    if denial is not None:
        raise Forbidden(denial)


def studio_access_denial(
    studio: Studio, role: Role, user_id: int, permission: Permission
) -> str | None:
    """Why `user_id` (holding `role`) may not do `permission` on `studio`; None if they may.

    The single rule behind both the REST checks and the connect access list
    that agents enforce (`controller.access`).
    """
    minimum = MINIMUM_ROLE[permission]
    if role.rank < minimum.rank:
        return f"role '{role}' may not {permission.value} (needs '{minimum}' or higher)"
    if not studio.is_private or permission == Permission.READ:
        return None
    if user_id == studio.user_id or user_id in (studio.allowed_user_ids or []):
        return None
    if permission == Permission.CONNECT:
        return (
            f"studio {studio.session_id} is private: only its creator and allowed users can connect"
        )
    if role.rank < Role.ADMIN.rank:
        return (
            f"studio {studio.session_id} is private: only its creator, allowed users, "
            f"admins and owners may {permission.value}"
        )
    return None
