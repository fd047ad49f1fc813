"""The Studios console: the page at ``GET /`` once signed in, and its assets.

Stack: one server-rendered HTML shell (who is signed in, the session's CSRF token) and a
small vanilla JavaScript file that draws the list, the detail view and the forms from the
REST API the CLI and other clients use (`controller/openapi.yaml`), with live updates from
``GET /studios/events`` (`controller.web_events`). Why: the API already has every rule
(roles, private studios, inherited fields, validation), so the page only shows what it
answers and posts what a person chose; no template engine or front-end framework, so
nothing to build and nothing fetched at run time: the assets are package data
(`controller/console_assets/`), served from memory with a content hash in their URL.

Writes go through the same endpoints with the cookie, the ``X-Studios-CSRF`` header and the
page's own Origin (`controller.signin.check_csrf`).
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web

from controller.auth import Principal

__all__ = ["ASSET_PREFIX", "console_page", "routes"]

routes = web.RouteTableDef()

ASSET_PREFIX = "/console/assets/"
# Studios per page of the list (console.js's PAGE).
_PAGE = 50
_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
_HEADERS = {
    "Cache-Control": "no-store",
    # Scripts and styles from this origin only, no inline code; fetches and the event stream
    # to this origin only; no framing (clickjacking); forms post only here.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # As the sign-in pages: the console's own writes carry their real Origin.
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    version: str


@cache
def _asset(name: str) -> _Asset | None:
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _TYPES:
        return None
    path = resources.files("controller").joinpath("console_assets", name)
    if not path.is_file():
        return None
    body = path.read_bytes()
    return _Asset(body, _TYPES[suffix], hashlib.sha256(body).hexdigest()[:12])


def _url(name: str) -> str:
    asset = _asset(name)
    version = asset.version if asset is not None else "missing"
    return f"{ASSET_PREFIX}{name}?v={version}"


@routes.get(ASSET_PREFIX + "{name}")
async def console_asset(request: web.Request) -> web.Response:
    """A console asset; public (no secret in them), cached for good under its hashed URL."""
    name = request.match_info["name"]
    asset = _asset(name)
    if asset is None:
        raise web.HTTPNotFound()
    headers = {"X-Content-Type-Options": "nosniff", "ETag": f'"{asset.version}"'}
    if request.query.get("v") == asset.version:
        headers["Cache-Control"] = "public, max-age=31536000, immutable"
    else:
        headers["Cache-Control"] = "no-cache"
    if request.headers.get("If-None-Match") == f'"{asset.version}"':
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.content_type, headers=headers)


def console_page(
    who: Principal, csrf: str, sign_out_form: str, boot: dict[str, Any]
) -> web.Response:
    """The console's shell for `who`; the script fills `<main>` from the API.

    `boot`: what the script would otherwise ask first (``defaultWorkspaceId`` and
    ``orgsAndWorkspaces`` as ``GET /user-info`` and ``GET /user/{id}/workspaces`` answer).
    """
    user = json.dumps({"id": who.user_id, "userName": who.user_name, "email": who.email})
    boot_json = json.dumps(boot, separators=(",", ":"))
    # The list's first page, fetched while the script loads (the script asks for exactly this
    # URL when it opens the default workspace, and the browser hands it the preloaded answer).
    workspace = boot.get("defaultWorkspaceId")
    preload = (
        # crossorigin=anonymous: the credentials mode of the script's fetch (same-origin).
        "<link rel=preload as=fetch crossorigin=anonymous "
        f'href="/studios?workspaceId={int(workspace)}&amp;max={_PAGE}&amp;offset=0">'
        if workspace
        else ""
    )
    name = html.escape(who.user_name)
    text = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>Studios</title>
<link rel=icon href="data:,">
<meta name=studios-csrf content="{html.escape(csrf, quote=True)}">
<meta name=studios-user content="{html.escape(user, quote=True)}">
<meta name=studios-boot content="{html.escape(boot_json, quote=True)}">
{preload}
<link rel=stylesheet href="{_url("console.css")}">
<script src="{_url("console.js")}" defer></script>
</head><body>
<a class=skip href="#main">Skip to content</a>
<header class=top>
<h1><a href="#/">Studios</a></h1>
<label class=ws>Workspace <select id=workspace aria-describedby=role></select></label>
<span id=role class=muted></span>
<span class=who>Signed in as {name}</span>
{sign_out_form}
</header>
<div id=live class=sr-only aria-live=polite></div>
<main id=main tabindex=-1><p class=muted>Loading studios…</p></main>
<noscript><p>The console needs JavaScript; the REST API (<a href="/openapi.yaml">openapi.yaml</a>)
works without it.</p></noscript>
</body></html>
"""
    return web.Response(text=text, content_type="text/html", headers=_HEADERS)
