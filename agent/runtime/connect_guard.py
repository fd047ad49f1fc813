"""A guard in front of a tool that cannot check the connect proxy's secret itself.

`python3 -m studios_connect.connect_guard --tool-port 8081 -- TOOL [ARG ...]` (in an
image; `agent.runtime.connect_guard` here) takes `$CONNECT_PROXY_SECRET` out of its
environment, starts the tool as its child without it (`{tool_port}` in the tool's
arguments becomes the tool's port), and once the tool accepts connections on
127.0.0.1:<tool port> listens on 0.0.0.0:$CONNECT_TOOL_PORT (or `--port`). Each
connection's first request head is read strictly (CRLF line ends, at most
`MAX_HEAD_BYTES`, within `HEAD_TIMEOUT_SECONDS`) and checked with
`tool_guard.proxy_refusal`: without exactly one right `X-Studios-Proxy-Secret` and an
`X-Studios-User` it is answered 403 and closed; otherwise the guard connects to the
tool and splices bytes both ways, the head included, unchanged (a WebSocket upgrade
then just works: after the head the guard never looks at the bytes).

Only the first head of a connection is checked, on purpose: a connection that carries
the secret comes from the agent's proxy, which binds each client connection to one
session's tool for its lifetime and adds its secret and user to every head it
forwards (dropping any copies a client sent), so the later heads on that connection
are the proxy's too. Whoever else reaches the port does not know the secret and gets
no further than the first head.

SIGTERM, SIGINT and SIGHUP are passed to the tool; the guard stops listening when the
tool exits and exits with its status (128 + the signal's number when a signal ended
it). Without the secret in its environment the guard starts nothing and exits 2.

Copied into images as part of the `studios_connect` package with tool_guard.py, so it
depends on the standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence

# Relative: studio images carry this file and tool_guard.py as a package of their own
# (`studios_connect`, images/README.md), without the rest of the agent.
from .tool_guard import (
    MISSING_SECRET,
    PROXY_SECRET_HEADER,
    USER_HEADER,
    proxy_refusal,
    take_proxy_secret,
)

__all__ = [
    "HEAD_TIMEOUT_SECONDS",
    "MAX_HEAD_BYTES",
    "check_head",
    "main",
    "tool_argv",
]

# Enough for any browser's request head with its cookies (the proxy itself refuses
# larger ones), small enough that a stranger cannot make the guard hold much.
MAX_HEAD_BYTES = 64 * 1024
# The proxy sends the head at once; a connection that dribbles it is not the proxy.
HEAD_TIMEOUT_SECONDS = 10.0
# How long the tool may take to accept connections on its port before the guard
# listens: no limit of its own (the agent's start timeout ends a tool that never
# does), only the polling interval.
_POLL_SECONDS = 0.1
_CHUNK = 64 * 1024
_PLACEHOLDER = "{tool_port}"
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# RFC 9110 token characters (method and field names).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The request line: method, a target of visible ASCII, HTTP/1.x (the proxy forwards
# HTTP/1.1 only; 1.0 is harmless to accept).
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e]+ HTTP/1\.[01]")
# A field value: visible characters, spaces and tabs, and obs-text.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class BadHead(ValueError):
    """A request head that is not strict HTTP/1.1 (answered 400)."""


def check_head(head: bytes, secret: str) -> str:
    """Why the request whose head (up to and including the blank line) this is, is not
    believed ("" when it came through the proxy). Raises BadHead when it is not a
    well-formed head: the guard never guesses what a sloppy one meant."""
    if not head.endswith(b"\r\n\r\n"):
        raise BadHead("the head does not end with an empty CRLF line")
    lines = head[:-4].split(b"\r\n")
    for line in lines:
        # A bare CR or LF is a line end to some parsers and not to others: such a head
        # could mean one thing here and another to the tool.
        if b"\r" in line or b"\n" in line:
            raise BadHead("a line of the head does not end with CRLF")
    if not _REQUEST_LINE.fullmatch(lines[0]):
        raise BadHead("malformed request line")
    secrets_sent: list[str] = []
    users_sent: list[str] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # No obs-fold (a line starting with white space) and no space before the colon:
        # both let a header hide from one parser and not another (RFC 9112, 5.1, 5.2).
        if not colon or not _TOKEN.fullmatch(name):
            raise BadHead("malformed header line")
        if not _FIELD_VALUE.fullmatch(value):
            raise BadHead("control character in a header value")
        lower = name.lower()
        text = value.strip(b" \t").decode("latin-1")
        if lower == PROXY_SECRET_HEADER.lower().encode():
            secrets_sent.append(text)
        elif lower == USER_HEADER.lower().encode():
            users_sent.append(text)
    return proxy_refusal(secret, secrets_sent, users_sent)


def tool_argv(argv: Sequence[str], tool_port: int) -> list[str]:
    """The tool's arguments with `{tool_port}` replaced (plain replacement, not
    str.format: other braces in the arguments stay as they are)."""
    return [arg.replace(_PLACEHOLDER, str(tool_port)) for arg in argv]


def _answer(status: str, body: str) -> bytes:
    data = (body + "\n").encode("utf-8")
    return (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii") + data


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies until EOF, then half-closes the other side, so that a peer that finished
    sending can still receive the answer."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        # One side went away: the finally of the connection closes both.
        writer.close()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


class Guard:
    """The listening side: one `handle` per client connection."""

    def __init__(self, secret: str, tool_port: int) -> None:
        self._secret = secret
        self._tool_port = tool_port

    async def _refuse(self, writer: asyncio.StreamWriter, status: str, body: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(_answer(status, body))
            await writer.drain()
        await _close(writer)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except Exception as exc:  # one connection's fault never ends the guard
            print(f"connect guard: {type(exc).__name__}: {exc}", file=sys.stderr)
            await _close(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), timeout=HEAD_TIMEOUT_SECONDS
            )
        except TimeoutError:
            await self._refuse(writer, "408 Request Timeout", "request head not sent in time")
            return
        except asyncio.LimitOverrunError:
            await self._refuse(
                writer, "431 Request Header Fields Too Large", "request head too large"
            )
            return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            # Closed before a whole head: nothing to answer.
            await _close(writer)
            return
        try:
            refusal = check_head(head, self._secret)
        except BadHead as exc:
            await self._refuse(writer, "400 Bad Request", f"bad request: {exc}")
            return
        if refusal:
            await self._refuse(writer, "403 Forbidden", refusal)
            return
        try:
            tool_reader, tool_writer = await asyncio.open_connection(
                "127.0.0.1", self._tool_port, limit=_CHUNK
            )
        except OSError as exc:
            await self._refuse(writer, "502 Bad Gateway", f"the tool does not answer: {exc}")
            return
        try:
            tool_writer.write(head)
            # Whatever the client sent after the head (a body, the next request) is
            # already in the reader's buffer: `_pipe` forwards it first.
            await asyncio.gather(_pipe(reader, tool_writer), _pipe(tool_reader, writer))
        finally:
            await _close(tool_writer)
            await _close(writer)


async def _wait_for_tool(proc: asyncio.subprocess.Process, port: int) -> bool:
    """Whether the tool came to accept connections on its port (False: it exited
    first). The guard listens only then, so that the agent's "answering" still means
    the tool answers."""
    while proc.returncode is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            # `wait` rather than sleep: an exit ends the waiting at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), _POLL_SECONDS)
            continue
        await _close(writer)
        return True
    return False


def _exit_status(code: int) -> int:
    # asyncio reports a death by signal N as -N; a shell would say 128 + N.
    return 128 - code if code < 0 else code


async def _run(secret: str, host: str, port: int, tool_port: int, argv: Sequence[str]) -> int:
    loop = asyncio.get_running_loop()
    # The environment without the secret (taken out before): the tool and everything it
    # starts (terminals, the user's code) never see it.
    proc = await asyncio.create_subprocess_exec(*argv, env=dict(os.environ))

    def forward(signum: int) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    for signum in _FORWARDED_SIGNALS:
        loop.add_signal_handler(signum, forward, signum)

    if not await _wait_for_tool(proc, tool_port):
        return _exit_status(await proc.wait())
    guard = Guard(secret, tool_port)
    try:
        server = await asyncio.start_server(guard.handle, host, port, limit=MAX_HEAD_BYTES)
    except OSError as exc:
        print(f"connect guard: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        forward(signal.SIGTERM)
        await proc.wait()
        return 1
    print(
        f"connect guard: {host}:{port} -> tool on 127.0.0.1:{tool_port} (pid {proc.pid})",
        file=sys.stderr,
        flush=True,
    )
    code = await proc.wait()
    # The tool is gone: open connections have nothing left to talk to (asyncio.run
    # cancels their tasks when this returns).
    server.close()
    return _exit_status(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connect_guard",
        description="Answer only requests from the Studios connect proxy, forward them to TOOL.",
    )
    parser.add_argument(
        "--tool-port",
        type=int,
        required=True,
        help="the port the tool listens on at 127.0.0.1 ({tool_port} in its arguments)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="where to listen (default: $CONNECT_TOOL_PORT)"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    parser.add_argument("tool", nargs=argparse.REMAINDER, help="-- TOOL [ARG ...]")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    parser = _parser()
    ns = parser.parse_args(args)
    argv = list(ns.tool)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        parser.error("no tool to start: give it after --")
    port = ns.port
    if port is None:
        try:
            port = int(os.environ["CONNECT_TOOL_PORT"])
        except (KeyError, ValueError):
            parser.error("--port or $CONNECT_TOOL_PORT (a number) is needed")
    if port == ns.tool_port:
        parser.error(f"--tool-port {ns.tool_port} is the port the guard listens on")
    # Taken out first, whatever happens next: nothing this process starts inherits it.
    secret = take_proxy_secret()
    if not secret:
        print(MISSING_SECRET, file=sys.stderr)
        return 2
    return asyncio.run(_run(secret, ns.host, port, ns.tool_port, tool_argv(argv, ns.tool_port)))


if __name__ == "__main__":
    sys.exit(main())
