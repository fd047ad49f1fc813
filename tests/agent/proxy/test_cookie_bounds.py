"""Connect cookies and tokens have a lifetime the proxy bounds, whoever signed them.

Whoever holds an agent's connect key (the agent itself, or a client that once got
it) can sign a cookie with any expiry. The proxy refuses a cookie that lives
longer than the controller's browser session cookie (`Welcome.
connect_cookie_max_seconds`, 12 h when not sent) from its issue time or from now,
an expired one, and a connect token valid for longer than
`CONNECT_TOKEN_MAX_SECONDS`; each is a 401 through the proxy's own answer, also
when the cookie arrives on a connection already bound to the tool.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.proxy import ConnectProxy
from studios_shared.connect_token import (
    CONNECT_TOKEN_MAX_SECONDS,
    DEFAULT_COOKIE_MAX_SECONDS,
    sign_connect_token,
)
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    agent_fixture,
    controller_fixture,
    proxy_in_front_of,
)

KEY = b"b" * 32
SID = "c00c1e01"
ALICE = 7
YEAR = 365 * 24 * 3600


class _Tool:
    """A small HTTP tool that remembers what reached it."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        # Every header line as received (a dict keeps one copy of a repeated header).
        self.raw: list[list[tuple[str, str]]] = []
        self.app = web.Application()
        self.app.router.add_get("/hello", self.hello)
        self.app.router.add_get("/ws", self.ws)

    async def hello(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        self.raw.append(
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        )
        return web.Response(text="hello " + request.headers.get("X-Studios-User", "?"))

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append(dict(request.headers))
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str("echo:" + msg.data)
        return sock


@pytest.fixture
def tool() -> _Tool:
    return _Tool()


@pytest.fixture
async def proxy(tool: _Tool) -> AsyncIterator[tuple[ConnectProxy, int]]:
    async with proxy_in_front_of(tool.app, SID, KEY) as (p, port, _handle):
        yield p, port


def _cookie(ttl: float, *, now: float | None = None, key: bytes = KEY, sid: str = SID) -> str:
    return sign_connect_token(
        key,
        session_id=sid,
        user_id=ALICE,
        user_name="alice",
        ttl_seconds=ttl,
        purpose="cookie",
        now=now,
    )


def _forged(payload: dict[str, object], key: bytes = KEY) -> str:
    """A cookie with exactly these claims, signed with the right key."""
    import hashlib
    import hmac

    body = json.dumps(payload, separators=(",", ":")).encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(body)}.{b64(mac)}"


def _claims(cookie: str) -> dict[str, object]:
    body = cookie.split(".", 1)[0]
    result: dict[str, object] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return result


def _head(path: str, cookie: str | None, extra: tuple[str, ...] = ()) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {SID}.localhost", *extra]
    if cookie is not None:
        lines.append(f"Cookie: studios-connect={cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def _get(port: int, path: str, cookie: str | None) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_head(path, cookie))
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()


# ------------------------------------------------------------------ cookies


async def test_a_cookie_signed_with_the_right_key_for_a_year_is_refused(
    proxy: tuple[ConnectProxy, int], tool: _Tool
) -> None:
    _p, port = proxy
    head, body = await _get(port, "/hello", _cookie(YEAR))
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"session cookie refused" in body and b"beyond the 43200 s" in body, body
    assert b"open the studio URL again" in body
    assert tool.seen == []


async def test_a_cookie_whose_window_is_too_long_is_refused_even_if_little_is_left(
    proxy: tuple[ConnectProxy, int], tool: _Tool
) -> None:
    """Issued 11 h ago, valid for 22 h: its remaining 11 h are inside the bound, but
    its expiry lies beyond issued_at + 12 h."""
    _p, port = proxy
    now = time.time()
    cookie = _forged(
        {
            "sid": SID,
            "uid": ALICE,
            "un": "alice",
            "iat": now - 11 * 3600,
            "exp": now + 11 * 3600,
            "n": "x",
            "p": "cookie",
        }
    )
    head, body = await _get(port, "/hello", cookie)
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"valid for 79200 s, longer than the 43200 s" in body, body
    assert tool.seen == []


@pytest.mark.parametrize("case", ["infinity", "nan", "future-iat", "no-iat-a-year"])
async def test_odd_expiries_are_refused(
    proxy: tuple[ConnectProxy, int], tool: _Tool, case: str
) -> None:
    _p, port = proxy
    now = time.time()
    claims: dict[str, object] = {"sid": SID, "uid": ALICE, "un": "alice", "n": "x", "p": "cookie"}
    if case == "infinity":
        claims.update(iat=now, exp=float("inf"))
    elif case == "nan":
        claims.update(iat=now, exp=float("nan"))
    elif case == "future-iat":  # issued "tomorrow", so that exp - iat looks short
        claims.update(iat=now + YEAR - 60, exp=now + YEAR)
    else:  # an old-format cookie (no iat): bounded by what remains
        claims.update(exp=now + YEAR)
    head, body = await _get(port, "/hello", _forged(claims))
    assert head.startswith(b"HTTP/1.1 401"), (case, head)
    assert b"session cookie refused" in body, body
    assert tool.seen == []


async def test_an_expired_cookie_is_refused(proxy: tuple[ConnectProxy, int], tool: _Tool) -> None:
    _p, port = proxy
    expired = _cookie(DEFAULT_COOKIE_MAX_SECONDS, now=time.time() - DEFAULT_COOKIE_MAX_SECONDS - 5)
    head, body = await _get(port, "/hello", expired)
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"session cookie refused: cookie has expired" in body, body
    assert tool.seen == []


@pytest.mark.parametrize("ttl", [600, DEFAULT_COOKIE_MAX_SECONDS])
async def test_a_cookie_within_the_bound_is_served(
    proxy: tuple[ConnectProxy, int], tool: _Tool, ttl: int
) -> None:
    _p, port = proxy
    head, body = await _get(port, "/hello", _cookie(ttl))
    assert head.startswith(b"HTTP/1.1 200"), head
    assert body == b"hello alice"
    # The tool never sees the proxy's credential.
    assert "studios-connect" not in tool.seen[0].get("Cookie", "")


async def test_the_controllers_bound_replaces_the_default(
    proxy: tuple[ConnectProxy, int], tool: _Tool
) -> None:
    p, port = proxy
    p._cookie_max = lambda: 3600  # as Welcome.connect_cookie_max_seconds sets it
    assert p.cookie_max_seconds() == 3600
    head, body = await _get(port, "/hello", _cookie(7200))
    assert head.startswith(b"HTTP/1.1 401") and b"beyond the 3600 s" in body, body
    head, body = await _get(port, "/hello", _cookie(3600))
    assert head.startswith(b"HTTP/1.1 200"), head
    # 0 (an older controller) and None (not connected yet): the default.
    p._cookie_max = lambda: 0
    assert p.cookie_max_seconds() == DEFAULT_COOKIE_MAX_SECONDS
    p._cookie_max = lambda: None
    assert p.cookie_max_seconds() == DEFAULT_COOKIE_MAX_SECONDS


async def test_the_agent_takes_its_bound_from_welcome(agent: Agent) -> None:
    """The daemon's proxy reads the bound the link keeps from the last Welcome."""
    assert agent.proxy is not None and agent.link is not None
    # The fake controller, like an older one, does not send it: the default.
    assert agent.proxy.cookie_max_seconds() == DEFAULT_COOKIE_MAX_SECONDS
    agent.link._on_welcome(pb.Welcome(connect_cookie_max_seconds=1800))
    assert agent.proxy.cookie_max_seconds() == 1800
    agent.link._on_welcome(pb.Welcome())
    assert agent.proxy.cookie_max_seconds() == DEFAULT_COOKIE_MAX_SECONDS


# ------------------------------------------------------------------ what the proxy signs


async def _sign_in(
    port: int, token: str, scheme: str = "http", **kw: object
) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        resp = await http.get(
            f"{scheme}://127.0.0.1:{port}/hello?studio-token={token}",
            headers={"Host": f"{SID}.localhost"},
            allow_redirects=False,
            **kw,  # type: ignore[arg-type]
        )
        await resp.read()
        return resp


async def test_the_cookie_the_proxy_sets_is_bounded_and_carries_its_issue_time(
    proxy: tuple[ConnectProxy, int],
) -> None:
    p, port = proxy
    p._cookie_max = lambda: 5400
    token = sign_connect_token(KEY, session_id=SID, user_id=ALICE, user_name="alice")
    before = time.time()
    resp = await _sign_in(port, token)
    assert resp.status == 302
    set_cookie = resp.headers["Set-Cookie"]
    attrs = [a.strip() for a in set_cookie.split(";")]
    assert "Max-Age=5400" in attrs and "HttpOnly" in attrs and "SameSite=Lax" in attrs
    assert "Path=/" in attrs
    assert not any(a.lower().startswith("domain=") for a in attrs)  # host-only
    assert "Secure" not in attrs  # plain http
    expires = parsedate_to_datetime(
        next(a for a in attrs if a.startswith("Expires=")).split("=", 1)[1]
    )
    assert abs(expires.timestamp() - (before + 5400)) < 5
    claims = _claims(resp.cookies["studios-connect"].value)
    assert isinstance(claims["iat"], float) and isinstance(claims["exp"], float)
    assert claims["exp"] - claims["iat"] == pytest.approx(5400)
    assert before - 1 <= claims["iat"] <= time.time() + 1
    # And it admits its holder.
    head, body = await _get(port, "/hello", resp.cookies["studios-connect"].value)
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello alice"


async def test_a_connect_token_valid_for_too_long_is_refused(
    proxy: tuple[ConnectProxy, int],
) -> None:
    _p, port = proxy
    token = sign_connect_token(
        KEY,
        session_id=SID,
        user_id=ALICE,
        user_name="alice",
        ttl_seconds=CONNECT_TOKEN_MAX_SECONDS + 3600,
    )
    resp = await _sign_in(port, token)
    assert resp.status == 401
    assert "connect token refused: connect token expires in" in await resp.text()
    assert "Set-Cookie" not in resp.headers
    # The controller's own 60 s tokens pass.
    ok = sign_connect_token(KEY, session_id=SID, user_id=ALICE, user_name="alice")
    assert (await _sign_in(port, ok)).status == 302


def _self_signed(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxy.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return ctx


async def test_over_tls_the_cookie_is_secure(tool: _Tool, tmp_path: Path) -> None:
    runner = web.AppRunner(tool.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    tool_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    handle = type("H", (), {"status": "running", "port": tool_port, "proxy_secret": ""})()
    p = ConnectProxy(lookup=lambda sid: handle if sid == SID else None, key=lambda: KEY)
    try:
        port = await p.start("127.0.0.1", 0, tls=_self_signed(tmp_path))
        assert p.url.startswith("https://")
        token = sign_connect_token(KEY, session_id=SID, user_id=ALICE, user_name="alice")
        resp = await _sign_in(port, token, scheme="https", ssl=False)
        assert resp.status == 302
        attrs = [a.strip() for a in resp.headers["Set-Cookie"].split(";")]
        assert "Secure" in attrs and "HttpOnly" in attrs
    finally:
        await p.close()
        await runner.cleanup()


# ------------------------------------------------------------------ smuggling


async def test_a_forged_cookie_pipelined_behind_a_good_request_never_reaches_the_tool(
    proxy: tuple[ConnectProxy, int], tool: _Tool
) -> None:
    """One write: a request with a good cookie, then one with a year-long cookie signed
    with the right key. The first is served; the second is answered by the proxy
    (401) once the tool connection is closed, and the tool saw one request only."""
    _p, port = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_head("/hello", _cookie(600)) + _head("/hello?forged", _cookie(YEAR)))
        await writer.drain()
        head, body = await _read_response(reader)
        assert head.startswith(b"HTTP/1.1 200") and body == b"hello alice", head
        head, body = await _read_response(reader)
        assert head.startswith(b"HTTP/1.1 401"), head
        assert b"beyond the 43200 s" in body
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the refusal
    finally:
        writer.close()
    assert len(tool.seen) == 1


async def test_a_forged_cookie_on_a_bound_keepalive_connection_is_refused(
    proxy: tuple[ConnectProxy, int], tool: _Tool
) -> None:
    _p, port = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_head("/hello", _cookie(600)))
        await writer.drain()
        assert (await _read_response(reader))[0].startswith(b"HTTP/1.1 200")
        # A cookie past its expiry, on the same connection.
        writer.write(_head("/hello", _cookie(600, now=time.time() - 3600)))
        await writer.drain()
        head, body = await _read_response(reader)
        assert head.startswith(b"HTTP/1.1 401") and b"cookie has expired" in body, head
    finally:
        writer.close()
    assert len(tool.seen) == 1


async def test_a_forged_cookie_first_among_two_is_refused_and_a_second_one_never_reaches_the_tool(
    proxy: tuple[ConnectProxy, int], tool: _Tool
) -> None:
    _p, port = proxy
    both = f"{_cookie(YEAR)}; studios-connect={_cookie(600)}"
    head, _body = await _get(port, "/hello", both)
    assert head.startswith(b"HTTP/1.1 401"), head
    assert tool.seen == []
    # The good one first: served, and neither value (nor a forged header) reaches the tool.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            _head(
                "/hello",
                f"{_cookie(600)}; studios-connect={_cookie(YEAR)}",
                extra=("X-Studios-User: admin", "X_Studios_User: admin"),
            )
        )
        await writer.drain()
        head, body = await _read_response(reader)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello alice", head
    seen = tool.seen[-1]
    assert "studios-connect" not in seen.get("Cookie", "")
    raw = tool.raw[-1]
    assert [v for k, v in raw if k.lower() == "x-studios-user"] == ["alice"]
    assert not [k for k, _v in raw if k.lower() == "x_studios_user"]


async def test_a_websocket_upgrade_with_a_forged_cookie_is_refused(
    proxy: tuple[ConnectProxy, int], tool: _Tool
) -> None:
    _p, port = proxy
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(
                f"http://127.0.0.1:{port}/ws",
                headers={"Host": f"{SID}.localhost", "Cookie": f"studios-connect={_cookie(YEAR)}"},
            )
        assert err.value.status == 401
        # Within the bound it opens.
        sock = await http.ws_connect(
            f"http://127.0.0.1:{port}/ws",
            headers={"Host": f"{SID}.localhost", "Cookie": f"studios-connect={_cookie(600)}"},
        )
        await sock.send_str("hi")
        assert (await asyncio.wait_for(sock.receive(), 5)).data == "echo:hi"
        await sock.close()
    assert len(tool.seen) == 1
