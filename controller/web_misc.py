"""Small endpoints: this API's own spec."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/openapi.yaml")
async def openapi(_request: web.Request) -> web.Response:
    text = resources.files("controller").joinpath("openapi.yaml").read_text()
    return web.Response(text=text, content_type="application/yaml")
