"""Request framing through the connect proxy (RFC 9112), against request smuggling.

Only CRLF ends a line of a request head. A bare LF or CR anywhere in a head, an
obs-fold, whitespace before a colon, a field name that is not a token, a control
character in a value, a malformed request line, conflicting Content-Length /
Transfer-Encoding, a Transfer-Encoding whose final coding is not `chunked`, several
Host headers, a chunk size that is not plain hex and a malformed trailer line are
answered 400 by the proxy, which closes the connection and forwards nothing of the
request. The tool here is a raw TCP server that records every byte it receives, so a
lenient tool parser cannot hide what the proxy let through. Headers the proxy owns
reach the tool exactly once, with the proxy's value.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from agent.proxy import ConnectProxy, server
from studios_shared.connect_token import sign_connect_token

KEY = b"f" * 32
SID = "f4a3e001"


class _RawTool:
    """Answers each request head with the header lines it got, as [name, value] pairs
    (every copy); remembers every byte and every connection."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.heads: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    self.received += exc.partial
                    return
                self.received += head
                self.heads.append(head)
                if b"\r\ntransfer-encoding:" in head.lower():
                    # Not answered (so only the proxy answers): the rest is recorded.
                    while chunk := await reader.read(65536):
                        self.received += chunk
                    return
                pairs = []
                length = 0
                for line in head[:-4].split(b"\r\n")[1:]:
                    name, _colon, value = line.partition(b":")
                    pairs.append([name.decode("latin-1"), value.strip().decode("latin-1")])
                    if name.lower() == b"content-length":
                        length = int(value)
                if length:
                    self.received += await reader.readexactly(length)
                body = json.dumps(pairs).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()


@pytest.fixture
async def tool() -> AsyncIterator[_RawTool]:
    t = _RawTool()
    t.server = await asyncio.start_server(t.handle, "127.0.0.1", 0)
    yield t
    t.server.close()


@pytest.fixture
async def port(tool: _RawTool) -> AsyncIterator[int]:
    assert tool.server is not None
    handle = type(
        "H",
        (),
        {"status": "running", "port": tool.server.sockets[0].getsockname()[1], "proxy_secret": ""},
    )
    proxy = ConnectProxy(lookup=lambda sid: handle() if sid == SID else None, key=lambda: KEY)
    bound = await proxy.start("127.0.0.1", 0)
    try:
        yield bound
    finally:
        await proxy.close()


def _cookie(user: str = "alice") -> str:
    return sign_connect_token(
        KEY, session_id=SID, user_id=7, user_name=user, ttl_seconds=600, purpose="cookie"
    )


def _request(*extra: bytes, line: bytes = b"GET /x HTTP/1.1", body: bytes = b"") -> bytes:
    """A request signed in as alice; `extra` header lines are sent exactly as given."""
    lines = [
        line,
        f"Host: {SID}.localhost".encode(),
        f"Cookie: studios-connect={_cookie()}".encode(),
    ]
    return b"\r\n".join([*lines, *extra]) + b"\r\n\r\n" + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def _refused(port: int, data: bytes, *before: bytes) -> bytes:
    """Send `before` (each answered 200 by the tool) then `data` on one connection:
    `data` gets the proxy's 400 and the connection is closed. Returns the 400's body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for ok in before:
            writer.write(ok)
            await writer.drain()
            head, _body = await _read_response(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        head, body = await _read_response(reader)
        assert head.startswith(b"HTTP/1.1 400"), (head, body)
        assert b"Connection: close" in head
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
        return body
    finally:
        writer.close()


# (name, the refused request). Each is complete: a lenient proxy would forward it.
HEAD_CASES = [
    # The attack: a bare LF in a value, read as a line end by Tornado.
    ("issue-bare-lf-in-value", _request(b"Foo: a\nX-Studios-User: carol")),
    ("bare-cr-in-value", _request(b"Foo: a\rX-Studios-User: carol")),
    ("bare-lf-after-request-line", _request(line=b"GET /x HTTP/1.1\nX-Studios-User: carol")),
    ("bare-cr-in-request-line", _request(line=b"GET /x\r HTTP/1.1")),
    ("bare-lf-ending-the-head", _request(b"Foo: a\n\nGET /smuggled HTTP/1.1", b"Bar: b")),
    ("obs-fold-space", _request(b"Foo: a", b" X-Studios-User: carol")),
    ("obs-fold-tab", _request(b"Foo: a", b"\tb")),
    ("space-before-colon", _request(b"X-Studios-User : carol")),
    ("tab-before-colon", _request(b"Content-Length\t: 5")),
    ("space-in-name", _request(b"X Studios-User: carol")),
    ("non-token-name", _request(b"Fo(o): a")),
    ("empty-name", _request(b": a")),
    ("no-colon", _request(b"Foo a")),
    ("nul-in-value", _request(b"Foo: a\x00b")),
    ("ctl-in-value", _request(b"Foo: a\x1bb")),
    ("del-in-value", _request(b"Foo: a\x7fb")),
    ("double-space-request-line", _request(line=b"GET  /x HTTP/1.1")),
    ("tab-in-request-line", _request(line=b"GET\t/x HTTP/1.1")),
    ("bad-version", _request(line=b"GET /x HTTP/1.1x")),
    ("cl-and-te", _request(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n")),
    ("te-and-cl", _request(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n")),
    ("differing-cl", _request(b"Content-Length: 5", b"Content-Length: 6", body=b"hello")),
    ("cl-list", _request(b"Content-Length: 5, 5", body=b"hello")),
    ("cl-sign", _request(b"Content-Length: +5", body=b"hello")),
    ("te-not-final", _request(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n")),
    ("te-identity", _request(b"Transfer-Encoding: identity", body=b"0\r\n\r\n")),
    ("te-chunked-twice", _request(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n")),
    (
        "te-split-over-copies",
        _request(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", body=b"0\r\n\r\n"),
    ),
    ("te-misspelt", _request(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n")),
    (
        "te-on-http-1.0",
        _request(b"Transfer-Encoding: chunked", line=b"POST /x HTTP/1.0", body=b"0\r\n\r\n"),
    ),
    ("two-hosts", _request(b"Host: other.localhost")),
    ("quote-in-target", _request(line=b'GET /x"y HTTP/1.1')),
    ("raw-byte-in-target", _request(line=b"GET /\xe9 HTTP/1.1")),
    ("target-not-a-path", _request(line=b"GET x HTTP/1.1")),
    ("asterisk-not-options", _request(line=b"GET * HTTP/1.1")),
]


@pytest.mark.parametrize("data", [c[1] for c in HEAD_CASES], ids=[c[0] for c in HEAD_CASES])
async def test_a_malformed_head_is_refused_and_nothing_reaches_the_tool(
    port: int, tool: _RawTool, data: bytes
) -> None:
    await _refused(port, data)
    assert tool.connections == 0 and bytes(tool.received) == b""


@pytest.mark.parametrize("data", [c[1] for c in HEAD_CASES[:8]], ids=[c[0] for c in HEAD_CASES[:8]])
async def test_a_malformed_head_on_a_bound_connection_never_reaches_the_tool(
    port: int, tool: _RawTool, data: bytes
) -> None:
    await _refused(port, data, _request())
    assert len(tool.heads) == 1 and b"carol" not in tool.received
    assert b"smuggled" not in tool.received


async def test_an_unfinished_head_with_bare_lf_line_ends_is_refused_at_once(
    port: int, tool: _RawTool
) -> None:
    """LF-only line ends never make a CRLF CRLF: refused as soon as seen, not left
    waiting for the head timeout."""
    body = await _refused(port, f"GET /x HTTP/1.1\nHost: {SID}.localhost\n\n".encode())
    assert b"bare CR or LF" in body
    assert tool.connections == 0


CHUNK_CASES = [
    ("hex-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("sign", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("underscore", b"0_5\r\nhello\r\n0\r\n\r\n"),
    ("bare-lf-in-size-line", b"5\nX: y\r\nhello\r\n0\r\n\r\n"),
    ("too-long", b"1" * 17 + b"\r\nhello\r\n0\r\n\r\n"),
    ("bare-lf-in-trailer", b"0\r\nX: a\n\nGET /smuggled HTTP/1.1\r\nX-Studios-User: carol\r\n\r\n"),
    ("obs-fold-in-trailer", b"0\r\nX: a\r\n smuggled\r\n\r\n"),
    # A tool whose quoted-string scan ran past the CRLF would read another body.
    ("unbalanced-quote-in-extension", b'5;e="1\r\nhello\r\n0\r\n\r\n'),
    ("extension-without-name", b"5;\r\nhello\r\n0\r\n\r\n"),
    ("extension-value-with-space", b"5;e=a b\r\nhello\r\n0\r\n\r\n"),
    ("whitespace-after-size", b"5 \r\nhello\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("chunks", [c[1] for c in CHUNK_CASES], ids=[c[0] for c in CHUNK_CASES])
async def test_a_malformed_chunked_body_is_refused_and_its_bad_line_never_forwarded(
    port: int, tool: _RawTool, chunks: bytes
) -> None:
    # The head is valid, so it is forwarded; the bad line and what follows are not.
    await _refused(port, _request(b"Transfer-Encoding: chunked", body=chunks))
    assert len(tool.heads) <= 1
    assert b"smuggled" not in tool.received and b"carol" not in tool.received
    assert b"hello" not in tool.received


async def test_the_tool_sees_exactly_one_of_each_header_the_proxy_owns(
    port: int, tool: _RawTool
) -> None:
    """A client's own copies (any case, `_` spelling, several) are all dropped."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            _request(
                b"X-Studios-User: mallory",
                b"x-studios-user: carol",
                b"X_Studios_User: eve",
                b"X-Forwarded-For: 10.9.9.9",
                b"x_forwarded_host: evil",
                b"X-FORWARDED-PROTO: https",
            )
        )
        await writer.drain()
        head, body = await _read_response(reader)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    pairs = json.loads(body)

    def copies(name: str) -> list[str]:
        return [v for k, v in pairs if k.lower().replace("_", "-") == name]

    assert copies("x-studios-user") == ["alice"]
    assert copies("x-forwarded-for") == ["127.0.0.1"]
    assert copies("x-forwarded-host") == [f"{SID}.localhost"]
    assert copies("x-forwarded-proto") == ["http"]
    assert b"mallory" not in tool.received and b"carol" not in tool.received
    assert b"eve" not in tool.received and b"evil" not in tool.received


async def test_strict_but_valid_requests_still_pass(port: int, tool: _RawTool) -> None:
    """What RFC 9112 allows is forwarded: no space after the colon, tabs and obs-text
    inside a value, trailing whitespace, HTTP/1.0, the same Content-Length twice, a
    chunk extension and a trailer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in (
            _request(b"Foo:a", b"Bar: x\ty \xe9 z \t"),
            _request(
                b"Content-Length: 5", b"Content-Length: 5", line=b"POST /x HTTP/1.1", body=b"hello"
            ),
            _request(line=b"OPTIONS * HTTP/1.1"),
            _request(line=b"GET http://other.example/x?q=%C3%A9 HTTP/1.1"),
            _request(line=b"GET /x?q=1 HTTP/1.0"),
        ):
            writer.write(data)
            await writer.drain()
            head, _body = await _read_response(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
            if b"HTTP/1.0" in data:
                break  # the tool keeps it open, but the client may not
    finally:
        writer.close()
    assert b"Foo: a\r\n" in tool.received and b"Bar: x\ty \xe9 z\r\n" in tool.received
    # A chunked body with an extension and a trailer is forwarded whole.
    sent = b'5;ext=1 ; q = "a\\"b;c"\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request(b"Transfer-Encoding: chunked", line=b"POST /c HTTP/1.1", body=sent))
        await writer.drain()
        for _ in range(50):
            if bytes(tool.received).endswith(sent):
                break
            await asyncio.sleep(0.02)
    finally:
        writer.close()
    assert bytes(tool.received).endswith(sent)


async def test_a_chunk_line_that_never_ends_closes_the_connection(
    port: int, tool: _RawTool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bound connection trickling an endless chunk-size line is closed like a head
    that never ends, and the unfinished line never reaches the tool."""
    monkeypatch.setattr(server, "HEAD_TIMEOUT_SECONDS", 1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request(b"Transfer-Encoding: chunked", line=b"POST /c HTTP/1.1"))
        writer.write(b"5;name=")
        await writer.drain()
        started = time.monotonic()
        while time.monotonic() - started < 10:
            await asyncio.sleep(0.3)
            writer.write(b"v")  # traffic keeps coming, the line never ends
            await writer.drain()
            if reader.at_eof() or writer.is_closing():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                if await asyncio.wait_for(reader.read(1), 0.01) == b"":
                    break
        else:
            pytest.fail("the proxy kept a never-ending chunk line open")
    except ConnectionResetError:
        pass  # closed while we wrote: what the test waits for
    finally:
        writer.close()
    assert len(tool.heads) == 1 and b"name=" not in tool.received
