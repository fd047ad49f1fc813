"""REST handlers for `/labels` (Seqera's shapes).

The decisions are `controller.labels_service`'s; this module parses requests and gives
the results the reference's shapes (LabelDbDto, CreateLabelResponse, UpdateLabelResponse).
"""

from __future__ import annotations

from aiohttp import web

from controller.db import Database
from controller.labels_service import LabelPage, LabelService
from controller.requests import CreateLabelRequest, UpdateLabelRequest
from controller.responses import CreateLabelResponse, ListLabelsResponse, UpdateLabelResponse
from controller.views import label_dto
from controller.web_app import json_response, parse_body, path_id, principal, query_bool, query_int

__all__ = ["routes", "setup"]

routes = web.RouteTableDef()

MAX_PAGE_SIZE = 1000
_LABELS = web.AppKey("labels_service", LabelService)


def setup(app: web.Application, db: Database) -> None:
    app[_LABELS] = LabelService(db)


def _workspace(request: web.Request) -> int | None:
    return query_int(request, "workspaceId", minimum=1, maximum=2**63 - 1)


@routes.get("/labels")
async def list_labels(request: web.Request) -> web.Response:
    is_default = query_bool(request, "isDefault", False) if request.query.get("isDefault") else None
    labels, total = await request.app[_LABELS].list(
        principal(request),
        _workspace(request),
        search=request.query.get("search") or None,
        label_type=request.query.get("type") or None,
        is_default=is_default,
        page=LabelPage(
            max=query_int(request, "max", maximum=MAX_PAGE_SIZE),
            offset=query_int(request, "offset") or 0,
        ),
    )
    return json_response(
        ListLabelsResponse(labels=[label_dto(label) for label in labels], total_size=total)
    )


@routes.post("/labels")
async def create_label(request: web.Request) -> web.Response:
    body = await parse_body(request, CreateLabelRequest)
    assert body is not None
    label = await request.app[_LABELS].create(
        principal(request),
        _workspace(request),
        name=body.name,
        value=body.value,
        resource=body.resource,
        is_default=body.is_default,
    )
    dto = label_dto(label)
    return json_response(
        CreateLabelResponse(
            id=dto.id,
            name=dto.name,
            value=dto.value,
            resource=dto.resource,
            is_default=dto.is_default,
        )
    )


@routes.put("/labels/{labelId}")
async def update_label(request: web.Request) -> web.Response:
    label_id = path_id(request, "labelId")
    body = await parse_body(request, UpdateLabelRequest)
    assert body is not None
    label = await request.app[_LABELS].update(
        principal(request),
        label_id,
        _workspace(request),
        name=body.name,
        value=body.value,
        is_default=body.is_default,
    )
    dto = label_dto(label)
    return json_response(
        UpdateLabelResponse(id=dto.id, name=dto.name, value=dto.value, is_default=dto.is_default)
    )


@routes.delete("/labels/{labelId}")
async def delete_label(request: web.Request) -> web.Response:
    label_id = path_id(request, "labelId")
    await request.app[_LABELS].delete(principal(request), label_id, _workspace(request))
    return web.Response(status=204)
