"""REST handlers under /studios.

The decisions are `controller.studios_service`'s; this module parses requests
and gives the results their REST shape (`controller.views`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from controller.errors import BadRequest
from controller.idempotency import Idempotency, header_key
from controller.lifecycle import Status
from controller.requests import (
    CheckpointUpdateRequest,
    DataStudioCreateRequest,
    DataStudioStartRequest,
    DataStudioUpdateRequest,
)
from controller.responses import (
    ComputeEnvsListResponse,
    DataStudioCreateResponse,
    DataStudioDto,
    DataStudioListCheckpointsResponse,
    DataStudioMountedLinksResponse,
    DataStudioTemplate,
    DataStudioTemplatesListResponse,
    StudioConnectionsListResponse,
)
from controller.studios_service import DEFAULT_WORKSPACE_ID, Page, StudioDetails, StudioService
from controller.views import (
    build_dto,
    checkpoint_dto,
    compatible_env_dtos,
    connection_dto,
    label_dto,
    start_response,
    stop_response,
    studio_dto,
    studio_json,
)
from controller.web_app import (
    DB_KEY,
    SERVICES_KEY,
    json_response,
    parse_body,
    path_id,
    principal,
    query_bool,
    query_int,
    read_body,
)

__all__ = ["routes"]

routes = web.RouteTableDef()

MAX_PAGE_SIZE = 1000
# The longest long-poll of GET /studios/{sessionId}?wait= (seconds).
MAX_WAIT_SECONDS = 60


def _service(request: web.Request) -> StudioService:
    return request.app[SERVICES_KEY].studios  # type: ignore[no-any-return]


def _public_url(request: web.Request) -> str:
    return _service(request).public_url


def _workspace(request: web.Request) -> int | None:
    return query_int(request, "workspaceId", minimum=1, maximum=2**63 - 1)


def _page(request: web.Request) -> Page:
    """`max` (0..1000) and `offset` (>= 0); an offset past the end gives an empty page."""
    return Page(
        max=query_int(request, "max", maximum=MAX_PAGE_SIZE),
        offset=query_int(request, "offset") or 0,
    )


# The reference's DataStudioQueryAttribute values.
_ATTRIBUTES = ("labels",)


def _wants_labels(request: web.Request) -> bool:
    """`attributes=labels` (comma-separated or repeated): the studios' labels are shown;
    without it `labels` is absent (the reference: empty when not asked for)."""
    wanted = [
        a.strip() for value in request.query.getall("attributes", []) for a in value.split(",")
    ]
    for attribute in wanted:
        if attribute and attribute not in _ATTRIBUTES:
            raise BadRequest(
                f"attributes: must be among {', '.join(_ATTRIBUTES)}, got {attribute!r}"
            )
    return "labels" in wanted


def _studio(details: StudioDetails, public_url: str, *, labels: bool) -> DataStudioDto:
    dto = studio_dto(details, public_url)
    if labels:
        dto.labels = [label_dto(label).dump() for label in details.labels]
    return dto


# Registered before /studios/{sessionId} so that "templates" is not a session id.
@routes.get("/studios/templates")
async def list_templates(request: web.Request) -> web.Response:
    _workspace(request)
    page = _page(request)
    items = [
        DataStudioTemplate(repository=t.repository, tool=t.tool, status=t.status, icon=t.icon)
        for t in _service(request).catalogue.templates
    ]
    window = items[page.offset :]
    if page.max is not None:
        window = window[: page.max]
    return json_response(DataStudioTemplatesListResponse(templates=window, total_size=len(items)))


@routes.get("/studios/validate")
async def validate_name(request: web.Request) -> web.Response:
    await _service(request).validate_name(
        principal(request), _workspace(request), request.query.get("name")
    )
    return web.Response(status=204)


@routes.get("/studios/data-links")
async def mounted_data_links(request: web.Request) -> web.Response:
    ids = await _service(request).mounted_data_links(
        principal(request),
        _workspace(request),
        query_int(request, "orgId", minimum=1, maximum=2**63 - 1),
        request.query.get("status") or None,
        request.query.get("exclude") or None,
    )
    return json_response(DataStudioMountedLinksResponse(data_link_ids=ids))


async def _idempotent(
    request: web.Request,
    operation: str,
    workspace_id: int,
    handler: Callable[[], Awaitable[web.Response]],
) -> web.Response:
    """`handler`'s answer, or the first answer to this request's Idempotency-Key."""
    key = header_key(request)
    if key is None:
        return await handler()
    return await Idempotency(request.app[DB_KEY]).run(
        user_id=principal(request).user_id,
        workspace_id=workspace_id,
        operation=operation,
        key=key,
        body=await read_body(request),
        query=request.query_string,
        handler=handler,
    )


@routes.post("/studios")
async def create_studio(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    auto_start = query_bool(request, "autoStart", True)

    async def create() -> web.Response:
        body = await parse_body(request, DataStudioCreateRequest)
        assert body is not None
        details = await _service(request).create(
            principal(request), workspace_id, body, auto_start=auto_start
        )
        return json_response(
            DataStudioCreateResponse(studio=studio_dto(details, _public_url(request)))
        )

    return await _idempotent(request, "create", workspace_id or DEFAULT_WORKSPACE_ID, create)


@routes.get("/studios")
async def list_studios(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    page = _page(request)
    labels = _wants_labels(request)
    studios, total = await _service(request).list(
        principal(request), workspace_id, request.query.get("search"), page, with_labels=labels
    )
    public_url = _public_url(request)
    # DataStudioListResponse's JSON, built without its models (views.studio_json).
    return json_response(
        {
            "studios": [studio_json(s, public_url, labels=labels) for s in studios],
            "totalSize": total,
        }
    )


def _wait_for(request: web.Request) -> frozenset[Status]:
    """`wait`: a comma-separated list of statuses (the API's names)."""
    wanted: set[Status] = set()
    for value in request.query.getall("wait", []):
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            try:
                wanted.add(Status(name))
            except ValueError:
                raise BadRequest(
                    f"wait: {name!r} is not a status (one or more of "
                    f"{', '.join(s.value for s in Status)}, comma-separated)"
                ) from None
    return frozenset(wanted)


@routes.get("/studios/{sessionId}")
async def get_studio(request: web.Request) -> web.Response:
    labels = _wants_labels(request)
    wait_for = _wait_for(request)
    timeout = query_int(request, "timeout", maximum=MAX_WAIT_SECONDS)
    if timeout is not None and not wait_for:
        raise BadRequest("timeout: only with wait=STATUS[,STATUS...]")
    details = await _service(request).get(
        principal(request),
        request.match_info["sessionId"],
        _workspace(request),
        wait_for=wait_for,
        wait_seconds=float(timeout if timeout is not None else 30) if wait_for else 0.0,
    )
    return json_response(_studio(details, _public_url(request), labels=labels))


@routes.put("/studios/{sessionId}")
async def update_studio(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    body = await parse_body(request, DataStudioUpdateRequest)
    assert body is not None
    details = await _service(request).update(
        principal(request), request.match_info["sessionId"], workspace_id, body
    )
    return json_response(studio_dto(details, _public_url(request)))


@routes.get("/studios/{sessionId}/compatible-ce")
async def compatible_compute_envs(request: web.Request) -> web.Response:
    compatible = await _service(request).compatible_compute_envs(
        principal(request), request.match_info["sessionId"], _workspace(request)
    )
    return json_response(ComputeEnvsListResponse(compute_envs=compatible_env_dtos(compatible)))


@routes.post("/studios/{sessionId}/lifespan")
async def extend_lifespan(request: web.Request) -> web.Response:
    details = await _service(request).extend_lifespan(
        principal(request), request.match_info["sessionId"], _workspace(request)
    )
    return json_response(studio_dto(details, _public_url(request)))


@routes.put("/studios/{sessionId}/start")
async def start_studio(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    session_id = request.match_info["sessionId"]

    async def start() -> web.Response:
        body = await parse_body(request, DataStudioStartRequest, optional=True)
        run = await _service(request).start(principal(request), session_id, workspace_id, body)
        return json_response(start_response(session_id, run))

    return await _idempotent(request, f"start:{session_id[:32]}", workspace_id or 0, start)


@routes.post("/studios/{sessionId}/cancel")
async def cancel_studio(request: web.Request) -> web.Response:
    """Cancel a start in progress (an addition): the stop answer's shape."""
    session_id = request.match_info["sessionId"]
    run = await _service(request).cancel(principal(request), session_id, _workspace(request))
    return json_response(stop_response(session_id, run))


@routes.put("/studios/{sessionId}/stop")
async def stop_studio(request: web.Request) -> web.Response:
    session_id = request.match_info["sessionId"]
    run = await _service(request).stop(principal(request), session_id, _workspace(request))
    return json_response(stop_response(session_id, run))


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
    rows, total = await _service(request).checkpoints(
        principal(request),
        request.match_info["sessionId"],
        workspace_id,
        page,
        request.query.get("search"),
    )
    items = [checkpoint_dto(r) for r in rows]
    return json_response(DataStudioListCheckpointsResponse(checkpoints=items, total_size=total))


@routes.get("/studios/{sessionId}/checkpoints/{checkpointId}")
async def get_checkpoint(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    row = await _service(request).get_checkpoint(
        principal(request),
        request.match_info["sessionId"],
        workspace_id,
        path_id(request, "checkpointId", minimum=0),
    )
    return json_response(checkpoint_dto(row))


@routes.put("/studios/{sessionId}/checkpoints/{checkpointId}")
async def rename_checkpoint(request: web.Request) -> web.Response:
    workspace_id = _workspace(request)
    checkpoint_id = path_id(request, "checkpointId", minimum=0)
    body = await parse_body(request, CheckpointUpdateRequest)
    assert body is not None
    row = await _service(request).rename_checkpoint(
        principal(request), request.match_info["sessionId"], workspace_id, checkpoint_id, body.name
    )
    return json_response(checkpoint_dto(row))


@routes.get("/studios/{sessionId}/connections")
async def list_connections(request: web.Request) -> web.Response:
    """The connection audit (an addition): admins and owners only."""
    workspace_id = _workspace(request)
    page = _page(request)
    rows, total = await _service(request).connections(
        principal(request), request.match_info["sessionId"], workspace_id, page
    )
    return json_response(
        StudioConnectionsListResponse(
            connections=[connection_dto(r) for r in rows], total_size=total
        )
    )


@routes.get("/studios/{sessionId}/build")
async def get_build(request: web.Request) -> web.Response:
    """The custom environment's build and, when it failed, its log (an addition)."""
    studio, build = await _service(request).build(
        principal(request), request.match_info["sessionId"], _workspace(request)
    )
    return json_response(build_dto(studio, build))


@routes.get("/studios/{sessionId}/connect")
async def connect_studio(request: web.Request) -> web.Response:
    location = await _service(request).connect_url(
        principal(request), request.match_info["sessionId"], _workspace(request)
    )
    raise web.HTTPFound(location=location)
