"""REST handlers for `/credentials` and `/data-links` (Seqera shapes).

The services are built per application from its database and the
credentials key (`setup`), so handlers stay thin: parse, call, answer.
"""

from __future__ import annotations

from aiohttp import web

from controller.credential_requests import CreateCredentialsRequest, UpdateCredentialsRequest
from controller.credential_responses import (
    CreateCredentialsResponse,
    CredentialsConflict,
    DeleteCredentialsConflictResponse,
    DescribeCredentialsResponse,
    ListCredentialsResponse,
    credentials_dto,
    keys_view,
)
from controller.credentials import CredentialsInUse, CredentialsService
from controller.datalink_views import data_link_dto
from controller.datalinks_service import DataLinkService
from controller.db import Database
from controller.requests import DataLinkCreateRequest, DataLinkUpdateRequest
from controller.responses import DataLinkResponse, DataLinksListResponse
from controller.secret_box import SecretBox
from controller.studios_service import Page
from controller.web_app import json_response, parse_body, principal, query_int

__all__ = ["routes", "setup"]

routes = web.RouteTableDef()

MAX_PAGE_SIZE = 1000
_CREDENTIALS = web.AppKey("credentials_service", CredentialsService)
_DATA_LINKS = web.AppKey("data_links_service", DataLinkService)


def setup(app: web.Application, db: Database, box: SecretBox) -> None:
    app[_CREDENTIALS] = CredentialsService(db, box)
    app[_DATA_LINKS] = DataLinkService(db)


def _workspace(request: web.Request) -> int | None:
    return query_int(request, "workspaceId", minimum=1, maximum=2**63 - 1)


def _page(request: web.Request) -> Page:
    return Page(
        max=query_int(request, "max", maximum=MAX_PAGE_SIZE),
        offset=query_int(request, "offset") or 0,
    )


# ------------------------------------------------------------ credentials


@routes.post("/credentials")
async def create_credentials(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    body = await parse_body(request, CreateCredentialsRequest)
    assert body is not None
    cred_id = await request.app[_CREDENTIALS].create(principal(request), workspace_id, body)
    return json_response(CreateCredentialsResponse(credentials_id=cred_id))


@routes.get("/credentials")
async def list_credentials(request: web.Request) -> web.Response:
    items = await request.app[_CREDENTIALS].list(
        principal(request), _workspace(request), request.query.get("platformId") or None
    )
    return json_response(ListCredentialsResponse(credentials=[credentials_dto(c) for c in items]))


# Before /credentials/{credentialsId}: aiohttp matches routes in the order they are added.
@routes.get("/credentials/validate")
async def validate_credentials_name(request: web.Request) -> web.Response:
    await request.app[_CREDENTIALS].validate_name(
        principal(request), _workspace(request), request.query.get("name")
    )
    return web.Response(status=204)


@routes.get("/credentials/{credentialsId}")
async def get_credentials(request: web.Request) -> web.Response:
    cred = await request.app[_CREDENTIALS].get(
        principal(request), request.match_info["credentialsId"], _workspace(request)
    )
    return json_response(DescribeCredentialsResponse(credentials=credentials_dto(cred)))


@routes.get("/credentials/{credentialsId}/keys")
async def get_credentials_keys(request: web.Request) -> web.Response:
    cred = await request.app[_CREDENTIALS].keys(
        principal(request), request.match_info["credentialsId"], _workspace(request)
    )
    return json_response(keys_view(cred))


@routes.put("/credentials/{credentialsId}")
async def update_credentials(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    body = await parse_body(request, UpdateCredentialsRequest)
    assert body is not None
    await request.app[_CREDENTIALS].update(
        principal(request), request.match_info["credentialsId"], workspace_id, body
    )
    return web.Response(status=204)


@routes.delete("/credentials/{credentialsId}")
async def delete_credentials(request: web.Request) -> web.Response:
    try:
        await request.app[_CREDENTIALS].delete(
            principal(request), request.match_info["credentialsId"], _workspace(request)
        )
    except CredentialsInUse as exc:
        # The reference's DeleteCredentialsConflictResponse, with the message every error has.
        conflicts = [CredentialsConflict(id=u.id, name=u.name, type=u.type) for u in exc.users]
        body = DeleteCredentialsConflictResponse(
            message=exc.message, credentials_id=exc.credentials_id, conflicts=conflicts
        )
        return json_response(body, status=409)
    return web.Response(status=204)


# ------------------------------------------------------------ data-links


@routes.post("/data-links")
async def create_data_link(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    body = await parse_body(request, DataLinkCreateRequest)
    assert body is not None
    row = await request.app[_DATA_LINKS].create(principal(request), workspace_id, body)
    return json_response(data_link_dto(row.link, row.credentials))


@routes.get("/data-links")
async def list_data_links(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    page = _page(request)
    items, total = await request.app[_DATA_LINKS].list(
        principal(request),
        workspace_id,
        request.query.get("credentialsId") or None,
        request.query.get("search"),
        page,
    )
    dtos = [data_link_dto(r.link, r.credentials) for r in items]
    return json_response(DataLinksListResponse(data_links=dtos, total_size=total))


@routes.get("/data-links/{dataLinkId}")
async def get_data_link(request: web.Request) -> web.Response:
    row = await request.app[_DATA_LINKS].get(
        principal(request),
        request.match_info["dataLinkId"],
        _workspace(request),
        request.query.get("credentialsId") or None,
    )
    return json_response(DataLinkResponse(data_link=data_link_dto(row.link, row.credentials)))


@routes.put("/data-links/{dataLinkId}")
async def update_data_link(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    body = await parse_body(request, DataLinkUpdateRequest)
    assert body is not None
    row = await request.app[_DATA_LINKS].update(
        principal(request), request.match_info["dataLinkId"], workspace_id, body
    )
    return json_response(data_link_dto(row.link, row.credentials))


@routes.delete("/data-links/{dataLinkId}")
async def delete_data_link(request: web.Request) -> web.Response:
    await request.app[_DATA_LINKS].delete(
        principal(request), request.match_info["dataLinkId"], _workspace(request)
    )
    return web.Response(status=204)
