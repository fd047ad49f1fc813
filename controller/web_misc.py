"""Small endpoints: this API's own spec and the caller's identity."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from controller.studios_service import DEFAULT_WORKSPACE_ID
from controller.web_app import principal

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/openapi.yaml")
async def openapi(_request: web.Request) -> web.Response:
    text = resources.files("controller").joinpath("openapi.yaml").read_text()
    return web.Response(text=text, content_type="application/yaml")


@routes.get("/user-info")
async def user_info(request: web.Request) -> web.Response:
    user = principal(request)
    return web.json_response(
        {
            "user": {"id": user.user_id, "userName": user.user_name, "email": user.email},
            "needConsent": False,
            "defaultWorkspaceId": DEFAULT_WORKSPACE_ID,
        }
    )
