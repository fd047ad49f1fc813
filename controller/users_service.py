"""The caller's own account: who they are, and their API tokens.

Tokens are the caller's own: listed without their value, created with the
value returned once (only its sha256 is stored), deleted by id (another
user's token is as missing as one that never existed). Names are unique per
user (409). Results are rows; `controller.web_users` gives them their REST
shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select

from controller.auth import Principal, hash_token, new_token
from controller.db import Database
from controller.errors import Conflict
from controller.models import ApiToken, Participant, TeamMember, User, utcnow

__all__ = ["NewToken", "UserService", "UserSummary"]


@dataclass(frozen=True, slots=True)
class UserSummary:
    user: User
    # The lowest-numbered workspace the user takes part in (directly or through
    # a team); None for a user of no workspace.
    default_workspace_id: int | None


@dataclass(frozen=True, slots=True)
class NewToken:
    token: ApiToken
    # The bearer value, shown to its owner this once; kept out of the repr.
    value: str = field(repr=False)


class UserService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def describe(self, principal: Principal) -> UserSummary:
        async with self.db.transaction() as session:
            user = await session.get(User, principal.user_id)
            assert user is not None  # authenticated a moment ago
            teams = select(TeamMember.team_id).where(TeamMember.user_id == user.id)
            default_workspace = await session.scalar(
                select(Participant.workspace_id)
                .where((Participant.user_id == user.id) | Participant.team_id.in_(teams))
                .order_by(Participant.workspace_id)
                .limit(1)
            )
            return UserSummary(user, default_workspace)

    async def tokens(self, principal: Principal) -> Sequence[ApiToken]:
        async with self.db.transaction() as session:
            return (
                await session.scalars(
                    select(ApiToken)
                    .where(ApiToken.user_id == principal.user_id)
                    .order_by(ApiToken.id)
                )
            ).all()

    async def create_token(self, principal: Principal, name: str) -> NewToken:
        value = new_token()
        async with self.db.transaction() as session:
            taken = await session.scalar(
                select(ApiToken.id).where(
                    ApiToken.user_id == principal.user_id, ApiToken.name == name
                )
            )
            if taken is not None:
                raise Conflict(f"you already have a token named {name!r}")
            token = ApiToken(
                user_id=principal.user_id,
                name=name,
                token_hash=hash_token(value),
                date_created=utcnow(),
            )
            session.add(token)
            await session.flush()
            return NewToken(token, value)

    async def delete_token(self, principal: Principal, token_id: int) -> bool:
        """False when the caller has no token `token_id`."""
        async with self.db.transaction() as session:
            token = await session.get(ApiToken, token_id)
            if token is None or token.user_id != principal.user_id:
                return False
            await session.delete(token)
            return True
