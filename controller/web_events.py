"""``GET /studios/events``: a workspace's studio changes as Server-Sent Events (the console).

Fed by `controller.studio_events` (every committed change of a studio's status, progress,
message, connected users or deletion, whichever controller's feed reported it). Each change
is read again and sent as the studio the caller would get from ``GET /studios/{id}``, so what
the stream shows is exactly what the caller may see, checked on every event: another
workspace's studios never appear (their ids are not even sent), and a caller who loses their
role in the workspace has the stream ended.

Events (``event:`` name, ``data:`` one JSON line):

- ``studio``: a DataStudioDto of a studio of the workspace that changed or was added;
- ``removed``: ``{"sessionId"}`` of a studio that was deleted;
- comments (``: keep-alive``) every `KEEP_ALIVE_SECONDS`, so proxies keep the connection.

A stream ends after `MAX_STREAM_SECONDS` (the browser's EventSource reconnects by itself,
with the ``retry`` it was given, and is authenticated again: a deleted token or an expired
cookie ends the live view) and when the controller shuts down. A change between the end
and the reconnection is not replayed: the console reloads its page of the list on every
(re)connection (the ``ready`` event).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from sqlalchemy import select

from controller.auth import workspace_role_or_404
from controller.errors import NotFound, StudiosError
from controller.models import Studio
from controller.studios_service import DEFAULT_WORKSPACE_ID, StudioService
from controller.views import studio_dto
from controller.web_app import CLOSING_KEY, DB_KEY, SERVICES_KEY, principal, query_int

__all__ = ["KEEP_ALIVE_SECONDS", "MAX_STREAM_SECONDS", "routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

KEEP_ALIVE_SECONDS = 15.0
MAX_STREAM_SECONDS = 600.0
# Changes that come within this long of one another are read and sent together.
_COALESCE_SECONDS = 0.05
_RETRY_MS = 1000


class NotAcceptable(StudiosError):
    status = 406


def _service(request: web.Request) -> StudioService:
    return request.app[SERVICES_KEY].studios  # type: ignore[no-any-return]


def _event(name: str, data: dict[str, Any]) -> bytes:
    # One JSON line: json.dumps never emits a raw newline, which would split the event.
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@routes.get("/studios/events")
async def studio_events(request: web.Request) -> web.StreamResponse:
    workspace_id = (
        query_int(request, "workspaceId", minimum=1, maximum=2**63 - 1) or DEFAULT_WORKSPACE_ID
    )
    # An event stream never ends by itself: only a client that asks for one gets it (an
    # ordinary GET would hang until MAX_STREAM_SECONDS).
    if "text/event-stream" not in request.headers.get("Accept", ""):
        raise NotAcceptable("this endpoint streams: send 'Accept: text/event-stream'")
    who = principal(request)
    db = request.app[DB_KEY]
    async with db.transaction() as session:
        await workspace_role_or_404(session, who.user_id, workspace_id)
    service = _service(request)
    closing = request.app[CLOSING_KEY]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            # nginx (several controllers behind one) must pass events on at once.
            "X-Accel-Buffering": "no",
        }
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_STREAM_SECONDS
    with service.events.subscribe_all() as changes:
        await response.prepare(request)
        try:
            await response.write(f"retry: {_RETRY_MS}\n\n".encode())
            await response.write(_event("ready", {"workspaceId": workspace_id}))
            while not closing.is_set():
                left = deadline - loop.time()
                if left <= 0:
                    break
                changed = await _next_changes(changes.wait, closing, min(left, KEEP_ALIVE_SECONDS))
                if changed is None:
                    await response.write(b": keep-alive\n\n")
                    continue
                await asyncio.sleep(_COALESCE_SECONDS)
                if not await _send(request, response, workspace_id, changed):
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            # The browser went away (or the server is stopping): nothing to answer.
            return response
    return response


async def _next_changes(
    wait: Callable[[], Awaitable[set[str]]], closing: asyncio.Event, seconds: float
) -> set[str] | None:
    """The next changed ids; None after `seconds` or once the server is closing."""
    changes = asyncio.ensure_future(wait())
    closed = asyncio.ensure_future(closing.wait())
    try:
        done, _ = await asyncio.wait(
            {changes, closed}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        closed.cancel()
    if changes in done:
        result: set[str] = changes.result()
        return result
    changes.cancel()
    return None


async def _send(
    request: web.Request, response: web.StreamResponse, workspace_id: int, changed: set[str]
) -> bool:
    """Writes the workspace's changed studios; False when the caller lost the workspace."""
    who = principal(request)
    db = request.app[DB_KEY]
    service = _service(request)
    async with db.transaction() as session:
        rows = (
            await session.execute(
                select(Studio.session_id, Studio.deleted).where(
                    Studio.session_id.in_(sorted(changed)), Studio.workspace_id == workspace_id
                )
            )
        ).all()
    for session_id, deleted in rows:
        if deleted:
            await response.write(_event("removed", {"sessionId": session_id}))
            continue
        try:
            details = await service.get(who, session_id, workspace_id)
        except NotFound:
            async with db.transaction() as session:
                try:
                    await workspace_role_or_404(session, who.user_id, workspace_id)
                except NotFound:
                    return False
            # Deleted between the two reads.
            await response.write(_event("removed", {"sessionId": session_id}))
            continue
        await response.write(_event("studio", studio_dto(details, service.public_url).dump()))
    return True
