"""REST handlers for the caller: `/user-info` and API tokens (`/tokens`).

Tokens are the caller's own: listed without their value, created with the
value shown once (`accessKey`; only its sha256 is stored), deleted by id
(another user's token id is 404). Names are 1-50 characters and unique per
user (409).
"""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select

from controller.auth import hash_token, new_token
from controller.errors import BadRequest, Conflict, NotFound
from controller.models import ApiToken, Participant, TeamMember, User, utcnow
from controller.requests import CreateAccessTokenRequest
from controller.responses import (
    CreateAccessTokenResponse,
    DescribeUserResponse,
    ListAccessTokensResponse,
    UserResponseDto,
)
from controller.views import access_token_dto, iso
from controller.web_app import DB_KEY, json_response, parse_body, principal

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/user-info")
async def user_info(request: web.Request) -> web.Response:
    caller = principal(request)
    async with request.app[DB_KEY].transaction() as session:
        user = await session.get(User, caller.user_id)
        assert user is not None
        teams = select(TeamMember.team_id).where(TeamMember.user_id == user.id)
        default_workspace = await session.scalar(
            select(Participant.workspace_id)
            .where((Participant.user_id == user.id) | Participant.team_id.in_(teams))
            .order_by(Participant.workspace_id)
            .limit(1)
        )
        body = DescribeUserResponse(
            user=UserResponseDto(
                id=user.id,
                user_name=user.user_name,
                email=user.email,
                date_created=iso(user.date_created),
            ),
            need_consent=False,
            default_workspace_id=default_workspace,
        )
    return json_response(body)


@routes.get("/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    caller = principal(request)
    async with request.app[DB_KEY].transaction() as session:
        tokens = (
            await session.scalars(
                select(ApiToken).where(ApiToken.user_id == caller.user_id).order_by(ApiToken.id)
            )
        ).all()
        body = ListAccessTokensResponse(tokens=[access_token_dto(t) for t in tokens])
    return json_response(body)


@routes.post("/tokens")
async def create_token(request: web.Request) -> web.Response:
    caller = principal(request)
    body = await parse_body(request, CreateAccessTokenRequest)
    assert body is not None
    value = new_token()
    async with request.app[DB_KEY].transaction() as session:
        taken = await session.scalar(
            select(ApiToken.id).where(
                ApiToken.user_id == caller.user_id, ApiToken.name == body.name
            )
        )
        if taken is not None:
            raise Conflict(f"you already have a token named {body.name!r}")
        token = ApiToken(
            user_id=caller.user_id,
            name=body.name,
            token_hash=hash_token(value),
            date_created=utcnow(),
        )
        session.add(token)
        await session.flush()
        answer = CreateAccessTokenResponse(access_key=value, token=access_token_dto(token))
    return json_response(answer)


@routes.delete("/tokens/{tokenId}")
async def delete_token(request: web.Request) -> web.Response:
    caller = principal(request)
    text = request.match_info["tokenId"]
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise BadRequest(f"tokenId: must be a positive integer, got {text!r}")
    async with request.app[DB_KEY].transaction() as session:
        token = await session.get(ApiToken, int(text))
        if token is None or token.user_id != caller.user_id:
            raise NotFound(f"token {text} not found")
        await session.delete(token)
    return web.Response(status=204)
