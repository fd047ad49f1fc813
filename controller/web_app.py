"""The aiohttp application: middlewares, typed app keys, request helpers.

Every request but `GET /openapi.yaml` and the sign-in pages needs
``Authorization: Bearer <token>`` (401 otherwise); GET and HEAD also accept the
browser session cookie (`controller.signin`), and other methods the cookie with the
console's CSRF header from this controller's own origin (`controller.signin.check_csrf`).
Errors are ``{"message": "..."}`` with the status of the `controller.errors` leaf; anything
unexpected is logged and answered 500 without details: never a stack trace to a client. Bad input
never gets that far: bodies through `parse_body` (`controller.json_body`: size,
nesting, malformed JSON), control characters in the path or the query refused
by `input_middleware`, in body fields by the request models.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from controller import json_body
from controller.auth import Principal
from controller.db import Database
from controller.errors import BadRequest, PayloadTooLarge, StudiosError, Unauthorized
from controller.requests import CONTROL_CHARACTERS, control_name, validation_message
from controller.signin import authenticate_request, browser_sign_in_redirect

__all__ = [
    "CLOSING_KEY",
    "DB_KEY",
    "PUBLIC_PATHS",
    "PUBLIC_PREFIXES",
    "SERVICES_KEY",
    "json_response",
    "make_app",
    "parse_body",
    "path_id",
    "principal",
    "query_bool",
    "query_int",
    "read_body",
    "validate",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

DB_KEY = web.AppKey("db", Database)
# The services the handlers use (a `controller.app.Services`).
SERVICES_KEY: web.AppKey[Any] = web.AppKey("services", object)
# Set when the server begins to shut down: long-lived answers (the console's event stream)
# end then, instead of holding the shutdown for aiohttp's whole grace period.
CLOSING_KEY = web.AppKey("closing", asyncio.Event)
PUBLIC_PATHS = frozenset({"/openapi.yaml", "/", "/auth/sign-in", "/auth/sign-out"})
# The console's assets: static files with no secret in them (`controller.web_console`).
PUBLIC_PREFIXES = ("/console/assets/",)
_PRINCIPAL = web.RequestKey("principal", Principal)
_CONTROL = re.compile(CONTROL_CHARACTERS)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StudiosError as exc:
        return _error(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return _error(404, f"no such endpoint: {request.method} {request.path}")
        if exc.status == 405:
            return _error(405, f"method {request.method} is not allowed on {request.path}")
        return _error(exc.status, exc.reason)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error(500, "internal error")


def _control_character(text: str) -> str | None:
    """The first C0 control character or DEL in `text`, as a name (e.g. "NUL"), or None."""
    found = _CONTROL.search(text)
    return None if found is None else control_name(found.group())


@web.middleware
async def input_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Control characters in the path or the query: 400 naming the parameter, never stored."""
    what = _control_character(request.path)
    if what is not None:
        raise BadRequest(f"path: control character {what} is not allowed")
    for name, value in request.query.items():
        what = _control_character(name) or _control_character(value)
        if what is not None:
            label = repr(name) if _CONTROL.search(name) else name
            raise BadRequest(f"{label}: control character {what} is not allowed")
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in PUBLIC_PATHS and not request.path.startswith(PUBLIC_PREFIXES):
        try:
            async with request.app[DB_KEY].transaction() as session:
                request[_PRINCIPAL] = await authenticate_request(request, session)
        except Unauthorized:
            # A browser opening a studioUrl goes to the sign-in page instead.
            redirect = browser_sign_in_redirect(request)
            if redirect is None:
                raise
            return redirect
    return await handler(request)


def principal(request: web.Request) -> Principal:
    return request[_PRINCIPAL]


def make_app(db: Database, services: Any) -> web.Application:
    # The error middleware is outermost, so authentication errors are mapped too.
    app = web.Application(
        middlewares=[error_middleware, input_middleware, auth_middleware],
        # parse_body refuses bodies over json_body.MAX_BODY_BYTES with its own message.
        client_max_size=4 * json_body.MAX_BODY_BYTES,
    )
    app[DB_KEY] = db
    app[SERVICES_KEY] = services
    app[CLOSING_KEY] = asyncio.Event()

    async def closing(app: web.Application) -> None:
        app[CLOSING_KEY].set()

    app.on_shutdown.append(closing)
    return app


def json_response(body: BaseModel | dict[str, Any], status: int = 200) -> web.Response:
    data = body.dump() if hasattr(body, "dump") else body
    return web.json_response(data, status=status)


async def read_body(request: web.Request, limit: int = json_body.MAX_BODY_BYTES) -> bytes:
    """The raw request body, at most `limit` bytes (PayloadTooLarge otherwise)."""
    json_body.check_size(request.content_length, limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body too large (at most {limit} bytes)") from None
    json_body.check_size(len(raw), limit)
    return raw


async def parse_body(
    request: web.Request, model: type[M], *, optional: bool = False, prefix: str = ""
) -> M | None:
    """The request body validated as `model`; BadRequest naming the field.

    Every JSON body goes through here: size and nesting limits, malformed JSON
    (`controller.json_body`), then the model.
    """
    raw = await read_body(request)
    if not raw.strip():
        if optional:
            return None
        raise BadRequest("request body is required")
    data = json_body.loads(raw)
    if data is None and optional:
        return None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return validate(model, data, prefix)


def validate(model: type[M], data: Any, prefix: str = "") -> M:
    """`data` validated as `model`; BadRequest naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc, prefix)) from None


def path_id(request: web.Request, name: str, *, minimum: int = 1) -> int:
    """The integer id in the path's `{name}`; 400 naming it when it is not one."""
    text = request.match_info[name]
    if not text.isascii() or not text.isdigit() or len(text) > 18 or int(text) < minimum:
        raise BadRequest(f"{name}: must be a positive integer, got {text!r}")
    return int(text)


def query_int(
    request: web.Request, name: str, *, minimum: int | None = 0, maximum: int = 2**31 - 1
) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name}: must be an integer, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise BadRequest(f"{name}: must be at least {minimum}")
    if value > maximum:
        raise BadRequest(f"{name}: must be at most {maximum}")
    return value


def query_bool(request: web.Request, name: str, default: bool) -> bool:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name}: must be true or false, got {text!r}")
