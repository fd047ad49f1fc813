"""The connect proxy: host routing, single-use tokens, the cookie, streaming, WebSockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.connect_token import sign_connect_token
from agent.daemon import Agent
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
    seen = {k.lower(): v for k, v in (await resp.json()).items()}
    assert seen["x-studios-user"] == "alice"
    # The proxy's own credential is not passed on to the tool.
    assert "studios-connect" not in seen.get("cookie", "")


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
