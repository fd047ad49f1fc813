"""Browser sign-in pages: ``GET|POST /auth/sign-in``, ``POST /auth/sign-out``, ``GET /``
(the console once signed in: `controller.web_console`).

The cookie itself is `controller.signin`. A browser that opens a studioUrl
without credentials is sent here with ``next=<that URL's path>``; after
signing in with an API token it is sent back there (only ever to a path of
this origin: `signin.safe_next`).

Content negotiation: a JSON body gets JSON answers (``{"message"}`` on
errors); a form post (what the page sends) gets a 303 on success, to the
signed-in page that continues to ``next`` (`_continue` says why not straight
there), and the form again, with the reason, on failure.

The two forms are the only state a browser can change with this controller
without a bearer token, so both refuse posts from other origins and sites
(`_check_same_origin`); the pages' referrer policy is chosen so that their own
posts carry the Origin that check reads.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from controller.auth import Principal
from controller.errors import BadRequest, Forbidden, StudiosError, Unauthorized
from controller.signin import (
    SIGN_IN_PATH,
    SIGNIN_KEY,
    SignInSettings,
    csrf_token,
    open_session,
    safe_next,
    verify_session,
)
from controller.web_app import DB_KEY, SERVICES_KEY, parse_body, read_body, validate
from controller.web_console import console_page

__all__ = ["routes"]

routes = web.RouteTableDef()

_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # No scripts, no framing (clickjacking), forms post only here.
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    # `same-origin`: the pages' own form posts carry their real Origin, which the same-origin
    # check needs (under `no-referrer` browsers send `Origin: null`, and null must stay
    # refused: it is what any page that hides its origin sends), while no other origin is ever
    # sent a Referer holding a `next` path. `strict-origin` would keep the Origin too, but
    # would also send it to the proxy's hosts, where tools run code nobody vetted.
    "Referrer-Policy": "same-origin",
}
_MAX_FORM_BYTES = 8192
# What a browser's form posts; aiohttp says octet-stream when there is no Content-Type.
_FORM_TYPES = ("application/x-www-form-urlencoded", "application/octet-stream")


class SignInRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    token: Annotated[str, Field(min_length=1, max_length=512)]
    next: Annotated[str, Field(max_length=2048)] | None = None


def _settings(request: web.Request) -> SignInSettings:
    return request.app[SIGNIN_KEY]


def _page(title: str, body: str, status: int = 200, head: str = "") -> web.Response:
    text = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title>{head}</head><body>\n{body}\n</body></html>\n"
    )
    return web.Response(text=text, status=status, content_type="text/html", headers=_PAGE_HEADERS)


def _form(next_path: str, message: str | None = None, status: int = 200) -> web.Response:
    error = f"<p role=alert>{html.escape(message)}</p>\n" if message else ""
    body = (
        "<h1>Sign in to Studios</h1>\n"
        f"{error}"
        f'<form method=post action="{SIGN_IN_PATH}">\n'
        "<label>API token <input type=password name=token autocomplete=off required></label>\n"
        f'<input type=hidden name=next value="{html.escape(next_path, quote=True)}">\n'
        "<button type=submit>Sign in</button>\n</form>\n"
        "<p>Create an API token with <code>POST /tokens</code> or "
        "<code>studio-controller user add</code>.</p>"
    )
    return _page("Sign in - Studios", body, status)


_SIGN_OUT_FORM = (
    '<form method=post action="/auth/sign-out"><button type=submit>Sign out</button></form>'
)


def _continue(who: Principal, next_path: str) -> web.Response:
    """The signed-in page that goes on to `next_path` by itself.

    A form sign-in ends here rather than redirecting straight to `next_path`: browsers check
    every redirect of a form's navigation against the page's `form-action 'self'`, and a
    studioUrl redirects on to the proxy's host, so the form's chain must stop on this origin.
    A meta refresh is a new navigation (no script: the policy allows none).
    """
    target = html.escape(next_path, quote=True)
    body = (
        f"<h1>Studios</h1>\n<p>Signed in as {html.escape(who.user_name)}. "
        f'Continuing to <a href="{target}">{target}</a>.</p>\n{_SIGN_OUT_FORM}'
    )
    head = f'<meta http-equiv=refresh content="0; url={target}">'
    return _page("Signed in - Studios", body, head=head)


async def _signed_in(request: web.Request) -> Principal | None:
    """Who this browser's session cookie signs in, if it is valid."""
    settings = _settings(request)
    cookie = request.cookies.get(settings.cookie_name)
    if cookie is None:
        return None
    try:
        async with request.app[DB_KEY].transaction() as session:
            return await verify_session(session, settings.key, cookie)
    except Unauthorized:
        return None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _check_same_origin(request: web.Request, what: str) -> None:
    """Refuse a form posted to `what` by a page of another origin.

    Sign-in: login CSRF (signing a victim in as the attacker, whose studios then get what the
    victim types). Sign-out: a foreign page must not end this browser's session either. Tools
    run untrusted code on `<sessionId>.<proxy domain>`, often the same site as the controller,
    so `same-site` is refused like `cross-site`. Browsers send Origin on every POST (`null`
    from a page that hides its origin, refused as not this controller); a request without
    Origin or Sec-Fetch-Site is not from a browser, and a forged one carries no victim's
    cookie.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("cross-site", "same-site"):
        raise Forbidden(f"{what} from another site is refused (Sec-Fetch-Site: {site})")
    origin = request.headers.get("Origin")
    if origin is None:
        return
    allowed = {f"{request.scheme}://{request.host}".lower()}
    if _settings(request).public_url:
        allowed.add(_origin(_settings(request).public_url))
    if origin.lower() not in allowed:
        raise Forbidden(f"{what} from origin {origin!r} is refused (not this controller)")


async def _read_sign_in(request: web.Request) -> tuple[SignInRequest, bool]:
    """(the request, whether it came from a form).

    A form is ``application/x-www-form-urlencoded`` (what a browser's form posts), read
    here strictly: UTF-8 and at most `_MAX_FORM_BYTES`, 400 otherwise.
    """
    if request.content_type == "application/json":
        body = await parse_body(request, SignInRequest)
        assert body is not None
        return body, False
    raw = await read_body(request, _MAX_FORM_BYTES)
    if request.content_type not in _FORM_TYPES:
        raise BadRequest(
            f"unsupported content type {request.content_type!r} "
            "(application/json or application/x-www-form-urlencoded)"
        )
    try:
        form = dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("malformed form: not UTF-8 URL-encoded") from None
    token, next_value = form.get("token", ""), form.get("next")
    if not token.strip():
        raise BadRequest("token: an API token is required")
    if len(token) > 512:
        raise BadRequest("token: too long to be an API token")
    return validate(SignInRequest, {"token": token.strip(), "next": next_value}), True


@routes.get(SIGN_IN_PATH)
async def sign_in_page(request: web.Request) -> web.Response:
    """The form; with a `next` and a valid cookie, the page that continues there."""
    next_path = safe_next(request.query.get("next"))
    if "next" in request.query:
        who = await _signed_in(request)
        if who is not None:
            return _continue(who, next_path)
    return _form(next_path)


@routes.post(SIGN_IN_PATH)
async def sign_in(request: web.Request) -> web.Response:
    settings = _settings(request)
    is_form = request.content_type != "application/json"
    next_path = safe_next(None)
    try:
        _check_same_origin(request, "sign-in")
        body, is_form = await _read_sign_in(request)
        next_path = safe_next(body.next)
        async with request.app[DB_KEY].transaction() as session:
            signed = await open_session(session, settings, body.token.strip())
    except StudiosError as exc:
        if not is_form:
            raise
        return _form(next_path, exc.message, exc.status)
    response: web.Response
    if is_form:
        # Post/redirect/get to the page that continues to `next` (see `_continue`).
        location = f"{SIGN_IN_PATH}?next={quote(next_path, safe='/')}"
        response = web.Response(status=303, headers={"Location": location, **_PAGE_HEADERS})
    else:
        answer: dict[str, Any] = {
            "userId": signed.user_id,
            "userName": signed.user_name,
            "expiresAt": datetime.fromtimestamp(signed.expires_at, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "next": next_path,
        }
        response = web.json_response(answer, headers={"Cache-Control": "no-store"})
    settings.set_cookie(response, signed.cookie)
    return response


@routes.post("/auth/sign-out")
async def sign_out(request: web.Request) -> web.Response:
    """Clears the cookie. Needs no credentials: it only drops what this browser holds."""
    settings = _settings(request)
    is_form = request.content_type != "application/json" and "text/html" in request.headers.get(
        "Accept", ""
    )
    try:
        _check_same_origin(request, "sign-out")
    except Forbidden as exc:
        if not is_form:
            raise
        body = (
            f"<h1>Studios</h1>\n<p role=alert>{html.escape(exc.message)}</p>\n"
            '<p>Nothing was changed. <a href="/">Studios</a></p>'
        )
        return _page("Sign-out refused - Studios", body, exc.status)
    if is_form:
        response = web.Response(status=303, headers={"Location": SIGN_IN_PATH, **_PAGE_HEADERS})
    else:
        response = web.Response(status=204)
    settings.clear_cookie(response)
    return response


@routes.get("/")
async def home(request: web.Request) -> web.Response:
    """The console once signed in (`controller.web_console`); else a link to sign in."""
    who = await _signed_in(request)
    if who is None:
        body = f'<h1>Studios</h1>\n<p>Not signed in. <a href="{SIGN_IN_PATH}">Sign in</a></p>'
        return _page("Studios", body)
    settings = _settings(request)
    cookie = request.cookies[settings.cookie_name]
    # The workspace switcher's data in the page itself: the list's first request need not
    # wait for two more round trips (the first paint of the list, issue 17's benchmark).
    services = request.app[SERVICES_KEY]
    rows = await services.orgs.user_workspaces(who, who.user_id)
    summary = await services.users.describe(who)
    boot = {
        "defaultWorkspaceId": summary.default_workspace_id,
        "orgsAndWorkspaces": [
            {
                "orgName": r.org.name,
                "workspaceId": r.workspace.id,
                "workspaceName": r.workspace.name,
                "roles": [r.role],
            }
            for r in rows
            if r.workspace is not None
        ],
    }
    return console_page(who, csrf_token(settings.key, cookie), _SIGN_OUT_FORM, boot)
