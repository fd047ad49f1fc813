"""The connect proxy: `<sessionId>.<anything>` -> the session's tool on 127.0.0.1.

Routing by host name gives every session its own origin, so any tool works
without a base-path setting. Authentication: the controller hands the browser a
short-lived, single-use `?studio-token=` signed for (session, user) with this
agent's key; the proxy trades it for an HttpOnly cookie of its own and redirects
to the clean URL. `X-Studios-User` is always set by the proxy, never passed on
from outside. Bodies are streamed both ways; WebSockets are relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from agent.connect_token import (
    ConnectClaims,
    InvalidConnectToken,
    sign_connect_token,
    verify_connect_token,
)
from agent.state import SessionHandle

__all__ = ["COOKIE_NAME", "TOKEN_PARAM", "USER_HEADER", "ConnectProxy", "UserActivity"]

log = logging.getLogger(__name__)

COOKIE_NAME = "studios-connect"
TOKEN_PARAM = "studio-token"
USER_HEADER = "X-Studios-User"
COOKIE_TTL_SECONDS = 12 * 3600

_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
    )
)


@dataclass
class UserActivity:
    user_id: int
    user_name: str
    connections: int = 0
    last_activity: float = 0.0


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


def _session_id_from_host(host: str) -> str | None:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    label, dot, _rest = name.partition(".")
    return label.lower() if dot and label else None


def _strip_our_cookie(value: str) -> str:
    """The tool must not see the proxy's own credential."""
    kept = [
        part.strip()
        for part in value.split(";")
        if part.strip() and part.strip().split("=", 1)[0].strip() != COOKIE_NAME
    ]
    return "; ".join(kept)


class ConnectProxy:
    def __init__(
        self,
        *,
        lookup: Callable[[str], SessionHandle | None],
        key: Callable[[], bytes | None],
    ) -> None:
        self._lookup = lookup
        self._key = key
        # Nonces of connect tokens already exchanged, until they expire (single use).
        self._used_nonces: dict[str, float] = {}
        self._activity: dict[str, dict[int, UserActivity]] = {}
        self._client: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int) -> int:
        # One client session for all upstream traffic; no client timeout, as tools
        # stream long responses and WebSockets stay open for hours.
        self._client = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        bound = int(sockets[0].getsockname()[1]) if sockets else port
        self.url = f"http://{host}:{bound}"
        return bound

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    def connections(self, session_id: str) -> list[dict[str, Any]]:
        return [
            {
                "userId": a.user_id,
                "userName": a.user_name,
                "connections": a.connections,
                "lastActivity": int(a.last_activity),
            }
            for a in self._activity.get(session_id, {}).values()
        ]

    # ------------------------------------------------------------ auth

    def _remember_nonce(self, claims: ConnectClaims) -> bool:
        now = time.time()
        for nonce, exp in list(self._used_nonces.items()):
            if exp < now:
                del self._used_nonces[nonce]
        if claims.nonce in self._used_nonces:
            return False
        self._used_nonces[claims.nonce] = claims.expires_at
        return True

    def _touch(self, sid: str, claims: ConnectClaims, delta: int = 0) -> None:
        users = self._activity.setdefault(sid, {})
        act = users.get(claims.user_id)
        if act is None:
            act = users[claims.user_id] = UserActivity(claims.user_id, claims.user_name)
        act.connections += delta
        act.last_activity = time.time()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        sid = _session_id_from_host(request.host)
        if sid is None:
            return _text(404, "no session in the host name: use <sessionId>.<proxy domain>")
        h = self._lookup(sid)
        if h is None:
            return _text(404, f"no session {sid} on this agent")
        key = self._key()
        if key is None:
            return _text(
                503, "this agent has no connect key yet: it has not reached the controller"
            )

        token = request.query.get(TOKEN_PARAM)
        if token is not None:
            try:
                claims = verify_connect_token(key, token, session_id=sid)
            except InvalidConnectToken as exc:
                return _text(401, f"connect token refused: {exc}")
            if not self._remember_nonce(claims):
                return _text(401, "connect token refused: it has already been used")
            cookie = sign_connect_token(
                key,
                session_id=sid,
                user_id=claims.user_id,
                user_name=claims.user_name,
                ttl_seconds=COOKIE_TTL_SECONDS,
                purpose="cookie",
            )
            query = {k: v for k, v in request.query.items() if k != TOKEN_PARAM}
            location = str(request.rel_url.with_query(query or None))
            resp = web.Response(status=302, headers={"Location": location})
            resp.set_cookie(
                COOKIE_NAME,
                cookie,
                max_age=COOKIE_TTL_SECONDS,
                path="/",
                httponly=True,
                samesite="Lax",
            )
            self._touch(sid, claims)
            return resp

        cookie_value = request.cookies.get(COOKIE_NAME)
        if not cookie_value:
            return _text(401, "not signed in to this session: open it through its studio URL")
        try:
            claims = verify_connect_token(key, cookie_value, session_id=sid, purpose="cookie")
        except InvalidConnectToken as exc:
            return _text(401, f"session cookie refused: {exc}; open the studio URL again")

        if h.status != "running" or not h.port:
            return _text(503, f"session {sid} is not running ({h.status})")
        self._touch(sid, claims)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, sid, h.port, claims)
        return await self._http(request, h.port, claims)

    # ------------------------------------------------------------ relaying

    def _upstream_headers(self, request: web.Request, claims: ConnectClaims) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lname = name.lower()
            if lname in _HOP_BY_HOP or lname == USER_HEADER.lower():
                continue
            if lname == "cookie":
                value = _strip_our_cookie(value)
                if not value:
                    continue
            headers.add(name, value)
        headers[USER_HEADER] = claims.user_name
        headers["X-Forwarded-Host"] = request.host
        headers["X-Forwarded-Proto"] = request.scheme
        if request.remote:
            headers["X-Forwarded-For"] = request.remote
        return headers

    async def _http(
        self, request: web.Request, port: int, claims: ConnectClaims
    ) -> web.StreamResponse:
        assert self._client is not None
        url = f"http://127.0.0.1:{port}{request.rel_url}"
        data = request.content.iter_chunked(64 * 1024) if request.body_exists else None
        try:
            upstream = await self._client.request(
                request.method,
                url,
                headers=self._upstream_headers(request, claims),
                data=data,
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            return _text(502, f"the session's tool did not answer: {exc}")
        async with upstream:
            headers: CIMultiDict[str] = CIMultiDict()
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    headers.add(name, value)
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            resp.headers.extend(headers)
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
            except (aiohttp.ClientError, ConnectionResetError) as exc:
                log.info("proxy: upstream body interrupted: %s", exc)
                return resp
            await resp.write_eof()
            return resp

    async def _websocket(
        self, request: web.Request, sid: str, port: int, claims: ConnectClaims
    ) -> web.StreamResponse:
        assert self._client is not None
        headers = self._upstream_headers(request, claims)
        for name in list(headers):
            if name.lower().startswith("sec-websocket-"):
                del headers[name]
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        url = f"ws://127.0.0.1:{port}{request.rel_url}"
        try:
            upstream = await self._client.ws_connect(
                url, headers=headers, protocols=protocols, autoping=False, max_msg_size=0
            )
        except (aiohttp.ClientError, aiohttp.WSServerHandshakeError) as exc:
            return _text(502, f"the session's tool refused the WebSocket: {exc}")
        server = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            autoping=False,
            max_msg_size=0,
        )
        await server.prepare(request)
        self._touch(sid, claims, +1)
        try:
            await _relay_websockets(server, upstream)
        finally:
            self._touch(sid, claims, -1)
            await upstream.close()
            await server.close()
        return server


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for msg in src:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == aiohttp.WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type == aiohttp.WSMsgType.PONG:
            await dst.pong(msg.data)
        else:
            break
    await dst.close()


async def _relay_websockets(
    server: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    tasks = [
        asyncio.create_task(_pump(server, upstream)),
        asyncio.create_task(_pump(upstream, server)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
