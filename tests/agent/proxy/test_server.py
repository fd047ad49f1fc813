"""The connect proxy: host routing, single-use tokens, the cookie, streaming, WebSockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from studios_shared.connect_token import sign_connect_token
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    agent_fixture,
    controller_fixture,
)
from tests.fake_controller import FakeController, desired

SID = "abcdef01"
ECHO = "abcdef02"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No cookie jar: tests pass cookies by hand, as the Host header is not the URL's host.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


@pytest.fixture
async def sessions(controller: FakeController, agent: Agent) -> Agent:
    controller.push(desired(SID), desired(ECHO, image="test/echo:1"))
    obs = await controller.wait_status(SID, pb.SESSION_STATUS_RUNNING)
    (Path(obs.root_dir) / "hello.txt").write_text("hello from the tool")
    await controller.wait_status(ECHO, pb.SESSION_STATUS_RUNNING)
    return agent


def _token(key: bytes, sid: str = SID, **kw: object) -> str:
    args: dict[str, object] = {"session_id": sid, "user_id": 7, "user_name": "alice"}
    args.update(kw)
    return sign_connect_token(key, **args)  # type: ignore[arg-type]


async def _get(
    http: aiohttp.ClientSession,
    agent: Agent,
    path: str,
    sid: str = SID,
    cookie: str | None = None,
    **kw: object,
) -> aiohttp.ClientResponse:
    headers = dict(kw.pop("headers", {}) or {})  # type: ignore[call-overload]
    headers["Host"] = f"{sid}.localhost:{agent.proxy_port}"
    if cookie is not None:
        headers["Cookie"] = f"studios-connect={cookie}"
    return await http.get(
        f"http://127.0.0.1:{agent.proxy_port}{path}",
        headers=headers,
        allow_redirects=False,
        **kw,  # type: ignore[arg-type]
    )


def _copies(pairs: list[list[str]], name: str) -> list[str]:
    """Every value of header `name` (any case) the echo tool received, in order."""
    return [v for k, v in pairs if k.lower() == name.lower()]


def _one(pairs: list[list[str]], name: str) -> str:
    """The value of header `name`, which must have reached the tool exactly once."""
    values = _copies(pairs, name)
    assert len(values) == 1, (name, values)
    return values[0]


def _assert_identity(pairs: list[list[str]], user: str) -> None:
    """Exactly one copy of each header the proxy owns reached the tool (the proxy's),
    and none of their underscore spellings."""
    assert _one(pairs, "X-Studios-User") == user
    for name in ("X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-For"):
        _one(pairs, name)
    owned = {"x_studios_user", "x_forwarded_host", "x_forwarded_proto", "x_forwarded_for"}
    assert not [k for k, _v in pairs if k.lower() in owned], pairs


async def _sign_in(http: aiohttp.ClientSession, agent: Agent, key: bytes, sid: str = SID) -> str:
    resp = await _get(http, agent, f"/?studio-token={_token(key, sid)}", sid=sid)
    assert resp.status == 302, await resp.text()
    return resp.cookies["studios-connect"].value


async def test_without_a_token_401(sessions: Agent, http: aiohttp.ClientSession) -> None:
    resp = await _get(http, sessions, "/hello.txt")
    assert resp.status == 401
    assert "not signed in" in await resp.text()


@pytest.mark.parametrize("case", ["tampered", "expired", "other-session", "wrong-key", "cookie"])
async def test_bad_tokens_401(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController, case: str
) -> None:
    key = controller.key
    if case == "tampered":
        token = _token(key)
        body, mac = token.split(".")
        token = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + mac
    elif case == "expired":
        token = _token(key, now=time.time() - 3600)
    elif case == "other-session":
        token = _token(key, sid="99999999")
    elif case == "wrong-key":
        token = _token(b"x" * 32)
    else:  # a cookie token is not a connect token
        token = _token(key, purpose="cookie")
    resp = await _get(http, sessions, f"/hello.txt?studio-token={token}")
    assert resp.status == 401, case
    assert "connect token refused" in await resp.text()
    if case != "cookie":
        # The same bad token as a cookie is refused too.
        resp = await _get(http, sessions, "/hello.txt", cookie=token)
        assert resp.status == 401
    else:
        # A connect token (purpose "connect") is not a cookie.
        resp = await _get(http, sessions, "/hello.txt", cookie=_token(key))
        assert resp.status == 401


async def test_good_token_sets_cookie_and_serves_the_tool(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    token = _token(controller.key)
    resp = await _get(http, sessions, f"/hello.txt?a=1&studio-token={token}")
    assert resp.status == 302
    assert resp.headers["Location"] == "/hello.txt?a=1"
    set_cookie = resp.headers["Set-Cookie"]
    assert "studios-connect=" in set_cookie
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    cookie = resp.cookies["studios-connect"].value

    resp = await _get(http, sessions, "/hello.txt?a=1", cookie=cookie)
    assert resp.status == 200
    assert await resp.text() == "hello from the tool"

    # Single use: the same connect token is refused the second time.
    resp = await _get(http, sessions, f"/hello.txt?studio-token={token}")
    assert resp.status == 401
    assert "already been used" in await resp.text()

    # The cookie is bound to its session.
    resp = await _get(http, sessions, "/headers", sid=ECHO, cookie=cookie)
    assert resp.status == 401


async def test_user_header_is_set_by_the_proxy_only(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    cookie = await _sign_in(http, sessions, controller.key, sid=ECHO)
    resp = await _get(
        http,
        sessions,
        "/headers",
        sid=ECHO,
        cookie=cookie,
        headers={"X-Studios-User": "mallory", "Cookie": "other=1"},
    )
    assert resp.status == 200
    pairs = await resp.json()
    _assert_identity(pairs, "alice")
    # The proxy's own credential is not passed on to the tool.
    assert not [c for c in _copies(pairs, "Cookie") if "studios-connect" in c]


async def test_bodies_stream_both_ways(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    cookie = await _sign_in(http, sessions, controller.key, sid=ECHO)
    payload = bytes(range(256)) * 8192  # 2 MiB

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    resp = await http.post(
        f"http://127.0.0.1:{sessions.proxy_port}/echo",
        data=chunks(),
        headers={"Host": f"{ECHO}.localhost", "Cookie": f"studios-connect={cookie}"},
    )
    assert resp.status == 200
    assert await resp.read() == payload


async def test_websocket_both_ways(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    cookie = await _sign_in(http, sessions, controller.key, sid=ECHO)
    async with http.ws_connect(
        f"http://127.0.0.1:{sessions.proxy_port}/ws",
        headers={"Host": f"{ECHO}.localhost", "Cookie": f"studios-connect={cookie}"},
    ) as ws:
        await ws.send_str("ping")
        assert (await ws.receive()).data == "echo:ping"
        await ws.send_bytes(b"abc")
        assert (await ws.receive()).data == b"cba"
        connections = sessions.proxy.connections(ECHO)  # type: ignore[union-attr]
        assert connections[0]["userName"] == "alice" and connections[0]["connections"] == 1


async def test_unknown_and_not_running_sessions(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    resp = await _get(http, sessions, "/", sid="00000000")
    assert resp.status == 404
    assert "no session 00000000" in await resp.text()
    resp = await http.get(f"http://127.0.0.1:{sessions.proxy_port}/", headers={"Host": "localhost"})
    assert resp.status == 404

    cookie = await _sign_in(http, sessions, controller.key)
    controller.push(desired(SID, status=pb.DESIRED_STATUS_STOPPED))
    await controller.wait_status(SID, pb.SESSION_STATUS_STOPPED)
    resp = await _get(http, sessions, "/hello.txt", cookie=cookie)
    assert resp.status == 503
    assert "is not running (stopped)" in await resp.text()


async def _raw(
    sessions: Agent, data: bytes, until: int = 1, timeout: float = 5.0
) -> tuple[list[bytes], asyncio.StreamReader, asyncio.StreamWriter]:
    """Send raw bytes on one connection; read `until` complete responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sessions.proxy_port)
    writer.write(data)
    await writer.drain()
    responses = []
    for _ in range(until):
        responses.append(await asyncio.wait_for(_read_response(reader), timeout))
    return responses, reader, writer


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def _req(path: str, sid: str, cookie: str | None, extra: str = "", body: bytes = b"") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {sid}.localhost"]
    if cookie is not None:
        lines.append(f"Cookie: a=1; studios-connect={cookie}; b=2")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_every_request_on_a_connection_is_rewritten(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    """Keep-alive and pipelined requests: each head gets the proxy's identity and loses
    the proxy's cookie and any impersonation (also the underscore spelling)."""
    cookie = await _sign_in(http, sessions, controller.key, sid=ECHO)
    body = b"x" * 70000
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    data = (
        _req("/headers", ECHO, cookie, "X-Studios-User: mallory\r\nX_Studios_User: eve")
        + _req("/echo", ECHO, cookie, f"Content-Length: {len(body)}", body).replace(b"GET", b"POST")
        + _req("/echo", ECHO, cookie, "Transfer-Encoding: chunked", chunked).replace(
            b"GET", b"POST"
        )
        + _req("/headers", ECHO, cookie, "x-studios-user: mallory")
    )
    responses, _r, writer = await _raw(sessions, data, until=4)
    writer.close()
    for i in (0, 3):
        head, _sep, payload = responses[i].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        pairs = json.loads(payload)
        _assert_identity(pairs, "alice")
        assert _copies(pairs, "Cookie") == ["a=1; b=2"]
    assert responses[1].endswith(b"\r\n\r\n" + body)
    assert responses[2].endswith(b"\r\n\r\nhello")


async def test_later_requests_are_authenticated_too(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    cookie = await _sign_in(http, sessions, controller.key, sid=ECHO)
    other = await _sign_in(http, sessions, controller.key, sid=SID)
    bob = sign_connect_token(
        controller.key,
        session_id=ECHO,
        user_id=8,
        user_name="bob",
        ttl_seconds=600,
        purpose="cookie",
    )
    # 2nd: another user's cookie for this session; 3rd: no cookie; 4th never sent upstream.
    data = (
        _req("/headers", ECHO, cookie)
        + _req("/headers", ECHO, bob)
        + _req("/headers", ECHO, None)
        + _req("/headers", ECHO, cookie)
    )
    responses, _r, writer = await _raw(sessions, data, until=3)
    writer.close()
    _assert_identity(json.loads(responses[0].partition(b"\r\n\r\n")[2]), "alice")
    _assert_identity(json.loads(responses[1].partition(b"\r\n\r\n")[2]), "bob")
    assert responses[2].startswith(b"HTTP/1.1 401")

    # A connection bound to one session never reaches another, whatever the Host says;
    # the other session's cookie is refused there.
    responses, _r, writer = await _raw(
        sessions, _req("/headers", ECHO, cookie) + _req("/headers", SID, other), until=2
    )
    writer.close()
    assert responses[1].startswith(b"HTTP/1.1 401"), responses[1]

    # A new connect token on a bound connection is exchanged by the proxy, not passed on.
    token = _token(controller.key, ECHO)
    responses, _r, writer = await _raw(
        sessions,
        _req("/headers", ECHO, cookie) + _req(f"/x?studio-token={token}", ECHO, cookie),
        until=2,
    )
    writer.close()
    assert responses[1].startswith(b"HTTP/1.1 302"), responses[1]


@pytest.mark.parametrize(
    ("target", "location"),
    [
        ("//evil.example/x?studio-token=T", "/evil.example/x"),
        ("/\\evil.example?studio-token=T&a=b", "/evil.example?a=b"),
        ("http://evil.example/y?studio-token=T", "/y"),
        ("/lab?a=1&studio-token=T", "/lab?a=1"),
    ],
)
async def test_sign_in_redirects_stay_on_the_session_host(
    sessions: Agent, controller: FakeController, target: str, location: str
) -> None:
    target = target.replace("T", _token(controller.key))
    responses, _r, writer = await _raw(sessions, _req(target, SID, None))
    writer.close()
    head = responses[0].decode()
    assert head.startswith("HTTP/1.1 302"), head
    assert f"\r\nLocation: {location}\r\n" in head


async def test_malformed_and_oversized_heads(sessions: Agent) -> None:
    responses, _r, writer = await _raw(sessions, b"GARBAGE\r\n\r\n")
    writer.close()
    assert responses[0].startswith(b"HTTP/1.1 400")
    reader, writer = await asyncio.open_connection("127.0.0.1", sessions.proxy_port)
    writer.write(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000)
    assert (await asyncio.wait_for(_read_response(reader), 5)).startswith(b"HTTP/1.1 431")
    writer.close()


async def test_stopping_a_session_ends_its_websockets_and_lists_who_is_connected(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    cookie = await _sign_in(http, sessions, controller.key, sid=ECHO)
    proxy = sessions.proxy
    assert proxy is not None
    async with http.ws_connect(
        f"http://127.0.0.1:{sessions.proxy_port}/ws",
        headers={"Host": f"{ECHO}.localhost", "Cookie": f"studios-connect={cookie}"},
    ) as ws:
        await ws.send_str("ping")
        assert (await ws.receive()).data == "echo:ping"
        msg = proxy.connections_message(ECHO)
        assert [(c.user_id, c.user_name, c.connections) for c in msg.connections] == [
            (7, "alice", 1)
        ]
        assert msg.connections[0].last_active >= time.time() - 5
        # The agent reports it to the controller.
        reported = await controller.wait_for(lambda: _reported(controller, ECHO))
        assert [c.user_name for c in reported.connections] == ["alice"]

        started = time.monotonic()
        controller.push(desired(ECHO, image="test/echo:1", status=pb.DESIRED_STATUS_STOPPED))
        closed = await asyncio.wait_for(ws.receive(), 15)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert time.monotonic() - started < 15
    await controller.wait_for(
        lambda: (r := _reported(controller, ECHO)) is not None and not r.connections
    )
    assert proxy.connections(ECHO) == []


def _reported(controller: FakeController, sid: str) -> pb.SessionConnections | None:
    mine = [c for c in controller.messages("connections") if c.session_id == sid]
    return mine[-1] if mine else None


async def test_users_who_leave_are_no_longer_listed(
    sessions: Agent, http: aiohttp.ClientSession, controller: FakeController
) -> None:
    proxy = sessions.proxy
    assert proxy is not None
    proxy.active_seconds = 1.0
    cookie = await _sign_in(http, sessions, controller.key, sid=ECHO)
    async with http.ws_connect(
        f"http://127.0.0.1:{sessions.proxy_port}/ws",
        headers={"Host": f"{ECHO}.localhost", "Cookie": f"studios-connect={cookie}"},
    ) as ws:
        await ws.send_str("ping")
        await ws.receive()
        await asyncio.sleep(2.5)
        # An open WebSocket keeps its user listed, however quiet.
        assert [c["userName"] for c in proxy.connections(ECHO)] == ["alice"]
    await controller.wait_for(lambda: not proxy.connections(ECHO), timeout=10)
    await controller.wait_for(
        lambda: (r := _reported(controller, ECHO)) is not None and not r.connections
    )
