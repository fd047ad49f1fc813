"""REST handlers under /studios."""

from __future__ import annotations

from aiohttp import web

from controller.schemas import (
    DataStudioCreateRequest,
    DataStudioCreateResponse,
    DataStudioListCheckpointsResponse,
    DataStudioListResponse,
    DataStudioStartRequest,
    DataStudioTemplate,
    DataStudioTemplatesListResponse,
)
from controller.studios_service import Page, StudioService
from controller.templates import CATALOGUE
from controller.web_app import (
    SERVICES_KEY,
    json_response,
    parse_body,
    principal,
    query_bool,
    query_int,
)

__all__ = ["routes"]

routes = web.RouteTableDef()


def _service(request: web.Request) -> StudioService:
    return request.app[SERVICES_KEY].studios  # type: ignore[no-any-return]


def _workspace(request: web.Request) -> int | None:
    return query_int(request, "workspaceId", minimum=1, maximum=2**63 - 1)


def _page(request: web.Request) -> Page:
    return Page(max=query_int(request, "max"), offset=query_int(request, "offset") or 0)


# Registered before /studios/{sessionId} so that "templates" is not a session id.
@routes.get("/studios/templates")
async def list_templates(request: web.Request) -> web.Response:
    _workspace(request)
    page = _page(request)
    items = [
        DataStudioTemplate(repository=t.repository, tool=t.tool, status=t.status, icon=t.icon)
        for t in CATALOGUE
    ]
    window = items[page.offset :]
    if page.max is not None:
        window = window[: page.max]
    return json_response(DataStudioTemplatesListResponse(templates=window, total_size=len(items)))


@routes.post("/studios")
async def create_studio(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    auto_start = query_bool(request, "autoStart", True)
    body = await parse_body(request, DataStudioCreateRequest)
    assert body is not None
    dto = await _service(request).create(
        principal(request), workspace_id, body, auto_start=auto_start
    )
    return json_response(DataStudioCreateResponse(studio=dto))


@routes.get("/studios")
async def list_studios(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    page = _page(request)
    studios, total = await _service(request).list(
        principal(request), workspace_id, request.query.get("search"), page
    )
    return json_response(DataStudioListResponse(studios=studios, total_size=total))


@routes.get("/studios/{sessionId}")
async def get_studio(request: web.Request) -> web.Response:
    dto = await _service(request).get(
        principal(request), request.match_info["sessionId"], _workspace(request)
    )
    return json_response(dto)


@routes.put("/studios/{sessionId}/start")
async def start_studio(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    body = await parse_body(request, DataStudioStartRequest, optional=True)
    answer = await _service(request).start(
        principal(request), request.match_info["sessionId"], workspace_id, body
    )
    return json_response(answer)


@routes.put("/studios/{sessionId}/stop")
async def stop_studio(request: web.Request) -> web.Response:
    answer = await _service(request).stop(
        principal(request), request.match_info["sessionId"], _workspace(request)
    )
    return json_response(answer)


@routes.delete("/studios/{sessionId}")
async def delete_studio(request: web.Request) -> web.Response:
    await _service(request).delete(
        principal(request), request.match_info["sessionId"], _workspace(request)
    )
    return web.Response(status=204)


@routes.get("/studios/{sessionId}/checkpoints")
async def list_checkpoints(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    page = _page(request)
    items, total = await _service(request).checkpoints(
        principal(request), request.match_info["sessionId"], workspace_id, page
    )
    return json_response(DataStudioListCheckpointsResponse(checkpoints=items, total_size=total))


@routes.get("/studios/{sessionId}/connect")
async def connect_studio(request: web.Request) -> web.Response:
    location = await _service(request).connect_url(
        principal(request), request.match_info["sessionId"], _workspace(request)
    )
    raise web.HTTPFound(location=location)
