"""REST handlers for the caller: `/user-info` and API tokens (`/tokens`).

The decisions are `controller.users_service`'s; this module parses requests
and gives the results their REST shape. Token names are 1-50 characters
(`CreateAccessTokenRequest`).
"""

from __future__ import annotations

from aiohttp import web

from controller.errors import BadRequest, NotFound
from controller.requests import CreateAccessTokenRequest
from controller.responses import (
    CreateAccessTokenResponse,
    DescribeUserResponse,
    ListAccessTokensResponse,
    UserResponseDto,
)
from controller.users_service import UserService
from controller.views import access_token_dto, iso
from controller.web_app import SERVICES_KEY, json_response, parse_body, principal

__all__ = ["routes"]

routes = web.RouteTableDef()


def _service(request: web.Request) -> UserService:
    service: UserService = request.app[SERVICES_KEY].users
    return service


@routes.get("/user-info")
async def user_info(request: web.Request) -> web.Response:
    summary = await _service(request).describe(principal(request))
    user = summary.user
    body = DescribeUserResponse(
        user=UserResponseDto(
            id=user.id,
            user_name=user.user_name,
            email=user.email,
            date_created=iso(user.date_created),
        ),
        need_consent=False,
        default_workspace_id=summary.default_workspace_id,
    )
    return json_response(body)


@routes.get("/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    tokens = await _service(request).tokens(principal(request))
    return json_response(ListAccessTokensResponse(tokens=[access_token_dto(t) for t in tokens]))


@routes.post("/tokens")
async def create_token(request: web.Request) -> web.Response:
    caller = principal(request)
    body = await parse_body(request, CreateAccessTokenRequest)
    assert body is not None
    created = await _service(request).create_token(caller, body.name)
    return json_response(
        CreateAccessTokenResponse(access_key=created.value, token=access_token_dto(created.token))
    )


@routes.delete("/tokens/{tokenId}")
async def delete_token(request: web.Request) -> web.Response:
    caller = principal(request)
    text = request.match_info["tokenId"]
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise BadRequest(f"tokenId: must be a positive integer, got {text!r}")
    if not await _service(request).delete_token(caller, int(text)):
        # Named as given: another user's token is as missing as an unknown one.
        raise NotFound(f"token {text} not found")
    return web.Response(status=204)
