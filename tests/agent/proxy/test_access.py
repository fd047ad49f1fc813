"""Access narrowing in the connect proxy, and who is connected after a reconnect.

`SessionDesired.access` lists the users who may use a session now: everyone else's
connections (WebSockets and keep-alives) end within seconds and their cookies and
tokens are refused with 403 from then on. After the agent reconnects to the
controller (which forgets active connections when a stream ends) it reports them
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.proxy import ConnectProxy
from studios_shared.connect_token import sign_connect_token
from tests.agent.proxy.raw_http import KeepAlive
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    agent_fixture,
    controller_fixture,
    proxy_in_front_of,
)
from tests.fake_controller import FakeController, desired

KEY = b"k" * 32
SID = "feed0002"
ECHO = "abcdef02"
ALICE, BOB = 7, 8


async def _tool_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello " + request.headers.get("X-Studios-User", "?"))

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str("echo:" + msg.data)
        return sock

    async def flood(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not sock.closed:
                await sock.send_bytes(b"z" * 65536)
        return sock

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/ws", ws)
    app.router.add_get("/flood", flood)
    return app


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ConnectProxy, int]]:
    async with proxy_in_front_of(await _tool_app(), SID, KEY) as (p, port, _handle):
        yield p, port


def _cookie(user_id: int, sid: str = SID, key: bytes = KEY) -> str:
    return sign_connect_token(
        key,
        session_id=sid,
        user_id=user_id,
        user_name=f"user{user_id}",
        ttl_seconds=600,
        purpose="cookie",
    )


async def _open(port: int) -> KeepAlive:
    return await KeepAlive.open(port, SID, timeout=5)


async def _ws(http: aiohttp.ClientSession, port: int, user: int) -> aiohttp.ClientWebSocketResponse:
    sock = await http.ws_connect(
        f"http://127.0.0.1:{port}/ws",
        headers={"Host": f"{SID}.localhost", "Cookie": f"studios-connect={_cookie(user)}"},
    )
    await sock.send_str("hi")
    assert (await sock.receive()).data == "echo:hi"
    return sock


async def test_a_removed_user_loses_websockets_and_keepalives_an_allowed_one_keeps_them(
    proxy: tuple[ConnectProxy, int],
) -> None:
    p, port = proxy
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        alice_ws, bob_ws = await _ws(http, port, ALICE), await _ws(http, port, BOB)
        alice_http, bob_http = await _open(port), await _open(port)
        assert (await alice_http.get("/hello", _cookie(ALICE)))[1] == b"hello user7"
        assert (await bob_http.get("/hello", _cookie(BOB)))[1] == b"hello user8"
        assert {c["userId"] for c in p.connections(SID)} == {ALICE, BOB}

        started = time.monotonic()
        d = pb.SessionDesired(session_id=SID, status=pb.DESIRED_STATUS_RUNNING, generation=1)
        d.access.user_ids.append(ALICE)
        p.apply_desired_access(False, [d])

        msg = await asyncio.wait_for(bob_ws.receive(), 2)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        assert await bob_http.closed_within(2)
        assert time.monotonic() - started < 2
        # Bob is no longer listed; a new request with his cookie is refused.
        assert [c["userId"] for c in p.connections(SID)] == [ALICE]
        refused = await _open(port)
        head, body = await refused.get("/hello", _cookie(BOB))
        assert head.startswith(b"HTTP/1.1 403"), head
        assert b"may no longer use session" in body and b"user8" in body
        refused.close()
        # His connect token too (a fresh sign-in).
        token = sign_connect_token(KEY, session_id=SID, user_id=BOB, user_name="user8")
        resp = await http.get(
            f"http://127.0.0.1:{port}/?studio-token={token}",
            headers={"Host": f"{SID}.localhost"},
            allow_redirects=False,
        )
        assert resp.status == 403, await resp.text()

        # Alice is untouched: her WebSocket and her keep-alive connection still work.
        await alice_ws.send_str("still")
        assert (await asyncio.wait_for(alice_ws.receive(), 2)).data == "echo:still"
        assert (await alice_http.get("/hello", _cookie(ALICE)))[1] == b"hello user7"

        # The same list again ends nothing; a wider one lets Bob back in.
        assert p.set_access(SID, [ALICE]) == 0
        d.access.user_ids.append(BOB)
        p.apply_desired_access(False, [d])
        again = await _open(port)
        assert (await again.get("/hello", _cookie(BOB)))[1] == b"hello user8"
        again.close()
        alice_http.close()
        bob_http.close()
        await alice_ws.close()
        await bob_ws.close()


async def test_a_bound_connection_is_refused_on_its_next_request_too(
    proxy: tuple[ConnectProxy, int],
) -> None:
    """Even before the close lands, a head on a connection of a removed user is not
    passed to the tool (the check runs on every request head)."""
    p, port = proxy
    conn = await _open(port)
    assert (await conn.get("/hello", _cookie(BOB)))[0].startswith(b"HTTP/1.1 200")
    p._access[SID] = frozenset({ALICE})  # narrowed without the immediate close
    head, body = await conn.get("/hello", _cookie(BOB))
    assert head.startswith(b"HTTP/1.1 403") and b"withdrawn" in body, head
    conn.close()


async def test_a_removed_user_who_stopped_reading_is_cut_off_too(
    proxy: tuple[ConnectProxy, int],
) -> None:
    """A graceful close never completes while the client leaves the proxy's buffer full:
    the proxy aborts such a connection a few seconds later."""
    p, port = proxy
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /flood HTTP/1.1\r\nHost: {SID}.localhost\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nCookie: studios-connect={_cookie(BOB)}\r\n\r\n"
        ).encode()
    )
    try:
        await asyncio.sleep(1.0)  # the tool floods; this client reads nothing
        assert [c.user_id() for c in p._clients] == [BOB]
        started = time.monotonic()
        p.set_access(SID, [ALICE])
        for _ in range(100):
            if not p._clients:
                break
            await asyncio.sleep(0.1)
        assert not p._clients
        assert time.monotonic() - started < 8
    finally:
        sock.close()


async def test_access_is_forgotten_with_the_session(proxy: tuple[ConnectProxy, int]) -> None:
    p, _port = proxy
    narrowed = pb.SessionDesired(session_id=SID, status=pb.DESIRED_STATUS_RUNNING)
    narrowed.access.SetInParent()  # present and empty: nobody
    p.apply_desired_access(False, [narrowed])
    assert not p.allowed(SID, ALICE)
    # An older controller (no access field) does not narrow.
    p.apply_desired_access(False, [pb.SessionDesired(session_id=SID)])
    assert p.allowed(SID, ALICE)
    p.apply_desired_access(False, [narrowed])
    p.apply_desired_access(
        False, [pb.SessionDesired(session_id=SID, status=pb.DESIRED_STATUS_DELETED)]
    )
    assert p.narrowed_sessions() == set()
    p.apply_desired_access(False, [narrowed])
    p.apply_desired_access(True, [])  # a full set without the session: it is gone
    assert p.narrowed_sessions() == set()


# ---------------------------------------------------------------- through the agent


@pytest.fixture
async def echo(controller: FakeController, agent: Agent) -> Agent:
    controller.push(desired(ECHO, image="test/echo:1"))
    await controller.wait_status(ECHO, pb.SESSION_STATUS_RUNNING)
    return agent


def _reported(
    controller: FakeController, sid: str, stream: int = 0
) -> pb.SessionConnections | None:
    mine = [
        m.connections
        for s, m in controller.received
        if s > stream
        and m.WhichOneof("message") == "connections"
        and m.connections.session_id == sid
    ]
    return mine[-1] if mine else None


async def _agent_ws(
    http: aiohttp.ClientSession, agent: Agent, key: bytes, user: int
) -> aiohttp.ClientWebSocketResponse:
    sock = await http.ws_connect(
        f"http://127.0.0.1:{agent.proxy_port}/ws",
        headers={
            "Host": f"{ECHO}.localhost",
            "Cookie": f"studios-connect={_cookie(user, ECHO, key)}",
        },
    )
    await sock.send_str("x")
    assert (await sock.receive()).data == "echo:x"
    return sock


async def test_desired_access_narrows_a_running_session_of_the_same_generation(
    echo: Agent, controller: FakeController
) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        alice = await _agent_ws(http, echo, controller.key, ALICE)
        bob = await _agent_ws(http, echo, controller.key, BOB)
        await controller.wait_for(
            lambda: (r := _reported(controller, ECHO)) is not None and len(r.connections) == 2
        )
        d = desired(ECHO, image="test/echo:1")  # same generation: only access changes
        d.access.user_ids.append(ALICE)
        started = time.monotonic()
        controller.push(d)
        msg = await asyncio.wait_for(bob.receive(), 2)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert time.monotonic() - started < 2
        await alice.send_str("y")
        assert (await alice.receive()).data == "echo:y"
        # The controller hears that only Alice is connected now.
        await controller.wait_for(
            lambda: (
                (r := _reported(controller, ECHO)) is not None
                and [c.user_id for c in r.connections] == [ALICE]
            ),
            timeout=5,
        )
        await alice.close()


async def test_connections_are_reported_again_after_a_reconnect(
    echo: Agent, controller: FakeController
) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        sock = await _agent_ws(http, echo, controller.key, ALICE)
        await controller.wait_for(lambda: _reported(controller, ECHO) is not None)
        port, streams = controller.port, controller.streams
        await controller.stop()
        assert echo.link is not None
        link = echo.link
        await controller.wait_for(lambda: not link.connected, timeout=10)
        await controller.start(port)
        # Nothing changed on the proxy, yet the new stream hears who is connected,
        # after the inventory.
        reported: Any = await controller.wait_for(
            lambda: _reported(controller, ECHO, stream=streams), timeout=15
        )
        assert [c.user_id for c in reported.connections] == [ALICE]
        kinds = [m.WhichOneof("message") for s, m in controller.received if s > streams]
        assert kinds.index("inventory") < kinds.index("connections")
        # The WebSocket itself never noticed the controller was away.
        await sock.send_str("z")
        assert (await sock.receive()).data == "echo:z"
        await sock.close()
