"""The connect proxy: `<sessionId>.<anything>` -> the session's tool on 127.0.0.1.

Routing by host name gives every session its own origin, so any tool works
without a base-path setting. Authentication: the controller hands the browser a
short-lived, single-use `?studio-token=` signed for (session, user) with this
agent's key; the proxy trades it for an HttpOnly cookie of its own and redirects
to the clean URL.

Bounds: a connect token may be valid for at most `CONNECT_TOKEN_MAX_SECONDS` and a
cookie for at most the controller's browser session cookie lifetime
(`Welcome.connect_cookie_max_seconds`, else 12 h), counted from its issue time
and from now, whoever signed it (`verify_connect_token(max_lifetime=...)`). The
cookie the proxy sets lives exactly that long (Max-Age and Expires), is HttpOnly,
SameSite=Lax, host-only, and Secure when the proxy serves TLS.

Relaying is a byte splice, not a re-issued request: the first authenticated
request on a client connection opens a TCP connection to the session's tool and
binds the client connection to that session for its lifetime (later requests go
to the same tool whatever their Host says, so nothing crosses sessions). The
proxy still reads every request head on the connection, following
Content-Length and chunked framing to find the next one, and on each head it
checks the cookie (a string compare when unchanged), drops any `X-Studios-User`
given from outside and sets its own, and removes its cookie. A plain request (no body,
no upgrade, none of the proxy's own headers, the bound cookie, fields already as the
proxy writes them) takes a fast path (`_Client._fast_head`): one match of the whole head
and a scan of its field names instead of a parse, the same bytes to the tool. Responses
are passed through untouched. A WebSocket upgrade answered with 101 turns the connection
into a plain two-way tunnel. A request the bound connection cannot carry (a new
connect token, a missing or foreign cookie, a stopped session) closes the tool
connection and is then answered by the proxy itself.

A sweep once a second ends the connections of sessions that are gone or no
longer running (WebSockets included), closes idle HTTP keep-alive connections,
and reports who is connected (`on_activity`).

Access narrowing: the controller sends the full list of users who may use a
session now (`SessionDesired.access`, applied by `apply_desired_access`). Everyone
else's connections to it end at once and their cookies and tokens are answered
with 403 until the list lets them in again; a session without a list admits any
valid cookie (the controller checked the right to connect when it signed it).

The connection audit (`on_visit`): a *visit* is a user's stay on a session from one
client address, from the first connection bound to the tool to the close of the
last one. A connection that opens within `visit_grace_seconds` of that close (a page
reload, a browser replacing an idle keep-alive) continues the visit, so the close is
reported once the grace has passed, with the time the last connection closed. Each
visit is reported twice as a `ConnectionVisit`: when it opens and when it closes (the
same random id; `instance_id` names this proxy's run, so that the controller can
close what a proxy that is gone left open). `close()` ends every visit at once.

Several processes (`--proxy-workers`, `agent.proxy.workers`): the agent's proxy and
worker processes listen on one port with SO_REUSEPORT (`start(reuse_port=True)`). A
worker's proxy asks the agent's whether a connect token's nonce is new
(`claim_nonce_remote`), and the agent's proxy lists the users of every process
(`set_remote_activity`) and counts their connections and bytes (`total_stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields
from email.utils import formatdate
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlencode

from studios.agent.v1 import agent_pb2 as pb

from agent.proxy.splice import SpliceTransport, splice_supported
from studios_shared.connect_token import (
    CONNECT_TOKEN_MAX_SECONDS,
    DEFAULT_COOKIE_MAX_SECONDS,
    ConnectClaims,
    InvalidConnectToken,
    sign_connect_token,
    verify_connect_token,
)

__all__ = [
    "COOKIE_NAME",
    "PROXY_SECRET_HEADER",
    "TOKEN_PARAM",
    "USER_HEADER",
    "ConnectProxy",
    "PortHeldError",
    "ProxiedSession",
    "ProxyStats",
    "UserActivity",
    "listen_reuse_port",
    "safe_location",
]

log = logging.getLogger(__name__)

COOKIE_NAME = "studios-connect"
TOKEN_PARAM = "studio-token"
USER_HEADER = "X-Studios-User"
# The per-session secret that proves a request came through this proxy: the tool is
# started with it ($CONNECT_PROXY_SECRET) and the shipped templates refuse requests
# without it, so a process on the host (or another session) that reaches the tool's
# port directly is not believed.
PROXY_SECRET_HEADER = "X-Studios-Proxy-Secret"
MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096
# An HTTP keep-alive connection with no traffic either way for this long is closed
# (so that users who left stop being listed); tunnels (WebSockets) are not.
IDLE_HTTP_SECONDS = 30.0
# A client connection that has not finished a request head in this long is closed.
HEAD_TIMEOUT_SECONDS = 30.0
SWEEP_SECONDS = 1.0
# Before the proxy answers a request itself on a connection bound to a tool, the tool
# connection is closed once quiet this long (at most REAUTH_WAIT_SECONDS).
REAUTH_QUIET = 0.05
REAUTH_WAIT_SECONDS = 5.0
# A user counts as connected with an open tunnel (WebSocket) or traffic this recent.
ACTIVE_SECONDS = 60.0
# A visit ends this long after its last connection closed unless another one opens:
# a reload or a browser's fresh keep-alive connection does not make a new visit.
VISIT_GRACE_SECONDS = 5.0
# A connection the proxy closed but whose peer does not read what is still buffered
# for it (so a graceful close never completes) is aborted after this long.
CLOSE_ABORT_SECONDS = 5.0
BUFFER_HIGH = 1024 * 1024

_TOKEN_BYTES = TOKEN_PARAM.encode() + b"="
_COOKIE_BYTES = COOKIE_NAME.encode()
_COOKIE_PAIR = _COOKIE_BYTES + b"="
# Headers the proxy owns: every copy a client sends is dropped, whatever its case and
# with `_` for `-` too (some servers read `X_Studios_User` as `X-Studios-User`).
_DROP = frozenset(
    {
        b"x-studios-user",
        b"x-studios-proxy-secret",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
    }
)
# RFC 9110/9112 syntax. A request head is CRLF lines only: the head is split on CRLF and
# no CR or LF may be left in any line (the control-character classes below exclude them),
# so a bare LF or CR anywhere, an obs-fold, whitespace before a colon, a field name that
# is not a token or a control character in a value refuse the request.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# The target: visible ASCII but `"` (no raw bytes >= 0x80: browsers percent-encode them),
# in one of RFC 9112's four forms (checked in `_parse_head`).
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([!#-~]+) (HTTP/1\.[0-9])")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):([^\x00-\x08\x0a-\x1f\x7f]*)")
# chunk-ext (RFC 9112 7.1.1): `; name[=token|quoted-string]`, whitespace around `;` and
# `=`. Anything else (an unbalanced quote, say) is refused: a tool whose quoted-string
# scan ran past the CRLF would read a different body than the proxy framed.
_QUOTED_STRING = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_EXT = (
    rb"(?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED_STRING
    + rb"))?)*"
)
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})" + _CHUNK_EXT)
# The fast path for a bound connection's next head (`_Client._fast_head`): the whole head
# checked in one match (possessive: no backtracking), a subset of what `_parse_head`
# accepts: origin-form targets, and field lines in the form `_rewrite` writes (`name:
# value`, one space), so that they can be forwarded as they are; `_fast_head` declines
# whitespace around a value. In the lowered head, `_FAST_NAMES` finds the field names
# that need the full path: framing (a body, an upgrade), the headers the proxy owns,
# and the cookie and host it reads.
_HEAD_FAST = re.compile(
    rb"(?:" + _TOKEN + rb") /[!#-~]* HTTP/1\.[0-9]\r\n"
    rb"(?:" + _TOKEN + rb": [^\x00-\x08\x0a-\x1f\x7f]*+\r\n)*+\r\n"
)
_FAST_NAMES = re.compile(
    rb"\r\n(cookie:|host:|transfer-encoding:|content-length:|upgrade:|x[-_]studios|x[-_]forwarded)"
)
_REASONS = {
    302: "Found",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass
class ProxyStats:
    """Running totals for the agent's metrics (read when scraped, never reset)."""

    # Client connections accepted.
    connections: int = 0
    # Bytes read from clients (request heads and bodies, WebSocket frames).
    bytes_from_clients: int = 0
    # Bytes of the tools relayed to clients (the proxy's own short answers are not).
    bytes_to_clients: int = 0
    # Of those, the bytes moved by os.splice straight into a client's socket (never in
    # Python); the rest of a spliced read waited in the client's transport.
    bytes_spliced: int = 0

    def add(self, other: ProxyStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class UserActivity:
    user_id: int
    user_name: str
    connections: int = 0
    last_activity: float = 0.0
    tunnels: int = 0


@dataclass(slots=True)
class _Visit:
    """One user's stay on a session from one client address (the connection audit)."""

    visit_id: str
    session_id: str
    user_id: int
    user_name: str
    address: str
    opened_at: float
    connections: int = 0
    # When the last connection closed; 0 while one is open.
    idle_since: float = 0.0

    def message(self, instance_id: str, closed_at: float = 0.0) -> pb.ConnectionVisit:
        return pb.ConnectionVisit(
            visit_id=self.visit_id,
            session_id=self.session_id,
            user_id=self.user_id,
            user_name=self.user_name,
            client_address=self.address,
            opened_at_ms=int(self.opened_at * 1000),
            closed_at_ms=int(closed_at * 1000) if closed_at else 0,
            proxy_instance_id=instance_id,
        )


def _client_address(peer: str) -> str:
    """The client's IP as the audit shows it: an IPv4-mapped IPv6 address as IPv4."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class _BadRequest(Exception):
    pass


@dataclass(slots=True)
class _Head:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes, bytes]]  # (lower name, name, value)
    raw: bytes

    def get(self, lname: bytes) -> bytes | None:
        for n, _name, value in self.headers:
            if n == lname:
                return value
        return None

    def cookie(self) -> str | None:
        for n, _name, value in self.headers:
            if n == b"cookie":
                for part in value.split(b";"):
                    k, _eq, v = part.strip().partition(b"=")
                    if k.strip() == _COOKIE_BYTES:
                        return v.strip().decode("latin-1")
        return None


def _line_error(line: bytes, what: str) -> str:
    """Why a line of a request head (or a chunk line, a trailer) is refused."""
    if b"\n" in line:
        return f"bare LF in the {what} (only CRLF ends a line)"
    if b"\r" in line:
        return f"bare CR in the {what} (only CRLF ends a line)"
    if line[:1] in (b" ", b"\t"):
        return f"obs-fold (a line starting with whitespace) in the {what}"
    name, colon, _value = line.partition(b":")
    if colon and name != name.rstrip(b" \t"):
        return f"whitespace before the colon in the {what}"
    if not colon or re.fullmatch(_TOKEN, name) is None:
        return f"malformed field name in the {what}"
    return f"control character in a field value in the {what}"


def _parse_field(line: bytes, what: str) -> tuple[bytes, bytes, bytes]:
    match = _FIELD_LINE.fullmatch(line)
    if match is None:
        raise _BadRequest(_line_error(line, what))
    name = match.group(1)
    return (name.lower(), name, match.group(2).strip(b" \t"))


def _parse_head(raw: bytes) -> _Head:
    """A request head ending in CRLF CRLF, parsed strictly (RFC 9112): anything a
    lenient server could read another way is a `_BadRequest` (400, connection closed)."""
    lines = raw[:-4].split(b"\r\n")
    first = _REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        line = lines[0]
        raise _BadRequest(
            _line_error(line, "request line")
            if b"\n" in line or b"\r" in line
            else "malformed request line"
        )
    method, target = first.group(1), first.group(2)
    if not (
        target.startswith(b"/")
        or _ABSOLUTE_FORM.match(target)
        or (method == b"CONNECT")
        or (target == b"*" and method == b"OPTIONS")
    ):
        raise _BadRequest("malformed request target")
    headers = [_parse_field(line, "request head") for line in lines[1:]]
    return _Head(method, target, first.group(3), headers, raw)


def _bare_cr_or_lf(data: bytes, start: int) -> bool:
    """An incomplete head `data[start:]` holds a CR or LF that is not part of a CRLF
    (a CR as its last byte may still be)."""
    crlf = data.count(b"\r\n", start)
    return data.count(b"\n", start) != crlf or data.count(b"\r", start, len(data) - 1) > crlf


def _session_id_from_host(host: str) -> str | None:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    label, dot, _rest = name.partition(".")
    return label.lower() if dot and label else None


def _strip_our_cookie(value: bytes) -> bytes:
    """The tool must not see the proxy's own credential."""
    kept = [
        part.strip()
        for part in value.split(b";")
        if part.strip() and part.strip().split(b"=", 1)[0].strip() != _COOKIE_BYTES
    ]
    return b"; ".join(kept)


def _split_cookie(value: bytes) -> tuple[bytes | None, bytes]:
    """A Cookie value's first `studios-connect` value (as `_Head.cookie` reads it) and the
    value without any of the proxy's cookies (as `_strip_our_cookie` leaves it)."""
    if value.startswith(_COOKIE_PAIR) and b";" not in value:
        ours = value.partition(b"=")[2].strip()
        return ours, b""
    found: bytes | None = None
    kept = []
    for part in value.split(b";"):
        part = part.strip()
        if not part:
            continue
        name, _eq, v = part.partition(b"=")
        if name.strip() == _COOKIE_BYTES:
            if found is None:
                found = v.strip()
        else:
            kept.append(part)
    return found, b"; ".join(kept)


def safe_location(target: str) -> str:
    """`target` without the connect token, as a same-origin path (never `//host`)."""
    path, _q, query = target.partition("?")
    if "://" in path[:16]:  # absolute-form request target: keep only its path
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    path = "/" + path.lstrip("/\\")
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != TOKEN_PARAM]
    return path + ("?" + urlencode(kept) if kept else "")


def _response(
    status: int, body: str = "", headers: Iterable[tuple[str, str]] = (), close: bool = True
) -> bytes:
    data = (body + "\n").encode() if body else b""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if data:
        lines.append("Content-Type: text/plain; charset=utf-8")
    lines.append(f"Content-Length: {len(data)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class _Upstream(asyncio.Protocol):
    __slots__ = ("await_status", "client", "pending", "transport")

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.await_status = False
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.last_io = client.last_up_io = time.monotonic()
        client.proxy.stats.bytes_to_clients += len(data)
        if self.await_status:
            self.pending += data
            if len(self.pending) < 12:
                return
            data, self.pending = self.pending, b""
            self.await_status = False
            client.upgrade_answered(data[9:12] == b"101")
        if client.transport is not None:
            client.transport.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(self)

    def pause_writing(self) -> None:
        self.client.pause("upstream-full")

    def resume_writing(self) -> None:
        self.client.resume("upstream-full")

    # The splice path (`SpliceTransport`): the tool's bytes go to the client's socket
    # in the kernel while nothing else is queued for it and nothing must be seen.

    def splice_fd(self) -> int | None:
        client = self.client
        t = client.transport
        if self.await_status or client.fd < 0 or t is None or t.is_closing():
            return None
        return None if t.get_write_buffer_size() else client.fd

    def spliced(self, nbytes: int) -> None:
        client = self.client
        client.last_io = client.last_up_io = time.monotonic()
        client.proxy.stats.bytes_to_clients += nbytes
        client.proxy.stats.bytes_spliced += nbytes

    def spliced_rest(self, data: bytes) -> None:
        # Counted by `spliced` already: it only waits behind what the kernel took.
        self.client.proxy.stats.bytes_spliced -= len(data)
        if self.client.transport is not None:
            self.client.transport.write(data)


class _Client(asyncio.Protocol):
    """One client connection: auth, head rewriting, splicing to the bound tool."""

    def __init__(self, proxy: ConnectProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        # The client socket's descriptor for splicing into (-1: not spliced into, TLS).
        self.fd = -1
        self.buf = bytearray()
        # "head" | "body" | "chunk-line" | "chunk-data" | "chunk-crlf" | "trailer" |
        # "upgrade-wait" | "tunnel" | "connecting" | "signin" | "reauth" | "refused" |
        # "closed"
        self.state = "head"
        self.remaining = 0
        self.upstream: _Upstream | None = None
        self.sid: str | None = None
        self.claims: ConnectClaims | None = None
        self.cookie = ""
        self.user_header = b""
        self.forwarded = b""
        self.paused: set[str] = set()
        self.bound: tuple[str, int] | None = None
        self.visit: _Visit | None = None
        self.tunnel_counted = False
        self.reauth_since = 0.0
        self.closing_since = 0.0
        self.last_up_io = 0.0
        self.last_io = time.monotonic()
        self.head_started = self.last_io
        # When the chunk-size or trailer line now held unfinished in buf began (0: none).
        self.line_started = 0.0

    # -------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=BUFFER_HIGH)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""
        sock = transport.get_extra_info("socket")
        if (
            self.proxy.splice
            and sock is not None
            and transport.get_extra_info("sslcontext") is None
        ):
            self.fd = sock.fileno()
        self.proxy._clients.add(self)
        self.proxy.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        self.proxy._clients.discard(self)
        self._unbind()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def eof_received(self) -> bool:
        up = self.upstream
        if up is not None and up.transport is not None and self.state != "reauth":
            if up.transport.can_write_eof():
                up.transport.write_eof()
            return True  # keep our side open for the rest of the response
        return False

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def pause(self, reason: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)
        if not self.paused and self.transport is not None and self.state != "closed":
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            if not self.closing_since:
                self.closing_since = time.monotonic()
            self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()

    def user_id(self) -> int | None:
        """The user this connection acts for (once a cookie was accepted on it)."""
        if self.bound is not None:
            return self.bound[1]
        return self.claims.user_id if self.claims is not None else None

    def data_received(self, data: bytes) -> None:
        self.last_io = time.monotonic()
        self.proxy.stats.bytes_from_clients += len(data)
        if self.state == "tunnel":
            assert self.upstream is not None and self.upstream.transport is not None
            self.upstream.transport.write(data)
            return
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
            self.buf.clear()
        elif self.state == "head":
            self.head_started = self.last_io
        self._process(data)

    # -------------------------------------------------------- parsing

    def _process(self, data: bytes) -> None:
        """Consume `data` from the client; keep what cannot be handled yet in buf."""
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            state = self.state
            if state == "body" or state == "chunk-data":
                take = min(self.remaining, n - i)
                out.append(data[i : i + take])
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "head" if state == "body" else "chunk-crlf"
                    self.remaining = 2 if state == "chunk-data" else 0
                    self.head_started = time.monotonic()
            elif state == "chunk-crlf":
                take = min(self.remaining, n - i)
                if data[i : i + take] != b"\r\n"[2 - self.remaining : 2 - self.remaining + take]:
                    self._fail(out, 400, "malformed chunked body")
                    return
                out.append(data[i : i + take])
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "chunk-line"
            elif state == "chunk-line" or state == "trailer":
                end = data.find(b"\r\n", i)
                if end < 0:
                    if n - i > MAX_CHUNK_LINE:
                        self._fail(out, 400, "chunk line too long")
                        return
                    self.line_started = self.line_started or time.monotonic()
                    break
                self.line_started = 0.0
                line = data[i:end]
                if state == "trailer":
                    if line and _FIELD_LINE.fullmatch(line) is None:
                        self._fail(out, 400, _line_error(line, "trailer section"))
                        return
                    out.append(data[i : end + 2])
                    i = end + 2
                    if not line:
                        self.state = "head"
                        self.head_started = time.monotonic()
                    continue
                # Hex digits only (int() would also take "0x", "_", signs and spaces).
                match = _CHUNK_LINE.fullmatch(line)
                if match is None:
                    self._fail(out, 400, "malformed chunk size line")
                    return
                out.append(data[i : end + 2])
                i = end + 2
                size = int(match.group(1), 16)
                if size == 0:
                    self.state = "trailer"
                else:
                    self.state, self.remaining = "chunk-data", size
            elif state == "head":
                end = data.find(b"\r\n\r\n", i)
                if end < 0:
                    if n - i > MAX_HEAD_BYTES:
                        self._fail(out, 431, "request head too large")
                        return
                    if _bare_cr_or_lf(data, i):
                        # Refused now: a lenient tool would end this head sooner.
                        self._fail(out, 400, "bare CR or LF in the request head")
                        return
                    break
                raw = data[i : end + 4]
                i = end + 4
                if not self._head(raw, out):
                    # Stopped forwarding: keep the rest for later (or drop it if closing).
                    if self.state not in ("refused", "closed"):
                        self.buf += data[i:]
                    self._flush(out)
                    return
            else:  # upgrade-wait, connecting, reauth: hold bytes until decided
                break
        if i < n and self.state not in ("refused", "closed"):
            self.buf += data[i:]
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _fail(self, out: list[bytes], status: int, message: str) -> None:
        self._flush(out)
        self._reply(status, message)

    def _reply(self, status: int, message: str, close: bool = True) -> None:
        if self.transport is None:
            return
        self.transport.write(_response(status, message, close=close))
        if close:
            self.state = "refused"
            self.buf.clear()
            self.transport.close()
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.close()

    @staticmethod
    def _framing(head: _Head) -> tuple[str, int]:
        """The body state and length for the request that `head` starts (or raise).

        Refused: Content-Length with Transfer-Encoding, differing or malformed
        Content-Lengths, a Transfer-Encoding (all its copies read as one list) whose
        final coding is not `chunked` or that names `chunked` twice, Transfer-Encoding
        on HTTP/1.0, and several Host headers."""
        tes = [v for n, _name, v in head.headers if n == b"transfer-encoding"]
        cls = [v for n, _name, v in head.headers if n == b"content-length"]
        if sum(1 for n, _name, _v in head.headers if n == b"host") > 1:
            raise _BadRequest("several Host headers")
        if tes:
            if cls:
                raise _BadRequest("both Content-Length and Transfer-Encoding")
            if head.version == b"HTTP/1.0":
                raise _BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            codings = [c.strip(b" \t").lower() for c in b",".join(tes).split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1 or b"" in codings:
                raise _BadRequest(
                    "unsupported Transfer-Encoding (chunked must be the final coding)"
                )
            return "chunk-line", 0
        if cls:
            if len(set(cls)) != 1 or not cls[0].isdigit():
                raise _BadRequest("bad Content-Length")
            length = int(cls[0])
            return ("body" if length else "head"), length
        return "head", 0

    def _head(self, raw: bytes, out: list[bytes]) -> bool:
        """Handle one request head; False when forwarding stops here."""
        if self.upstream is not None:
            fast = self._fast_head(raw)
            if fast is not None:
                self.state, self.remaining = "head", 0
                out.append(fast)
                return True
        try:
            head = _parse_head(raw)
            framing = self._framing(head)  # checked before the tool is ever dialled
        except _BadRequest as exc:
            self._fail(out, 400, str(exc))
            return False
        if self.upstream is None:
            self._local(head)
            return self.state == "head"
        # Bound connection: every head is authenticated again (cheaply).
        proxy = self.proxy
        h = proxy._lookup(self.sid or "")
        cookie = head.cookie()
        if (
            _TOKEN_BYTES in head.target
            or h is None
            or h.status != "running"
            or cookie is None
            or (cookie != self.cookie and not self._rebind_cookie(cookie))
            or (self.claims is not None and self.claims.expires_at < time.time())
            or (self.claims is not None and not proxy.allowed(self.sid, self.claims.user_id))
        ):
            # The proxy answers this one itself, once the tool connection is closed.
            # Browsers do not pipeline, so what the tool was sent is answered by now;
            # for pipelining clients the tool gets until it is quiet for REAUTH_QUIET.
            self.state = "reauth"
            self.reauth_since = time.monotonic()
            self.buf[:0] = raw
            self.pause("reauth")
            self._flush(out)
            out.clear()
            self._reauth_check()
            return False
        self.state, self.remaining = framing
        out.append(self._rewrite(head))
        if (
            self.state == "head"
            and head.get(b"upgrade") is not None
            and b"upgrade" in (head.get(b"connection") or b"").lower()
        ):
            self.state = "upgrade-wait"
            self.upstream.await_status = True
            self.upstream.pending = b""
            return True
        return True

    def _fast_head(self, raw: bytes) -> bytes | None:
        """What `_head` and `_rewrite` would send for a plain request (no body, no
        upgrade, none of the proxy's own headers, origin-form) on this bound connection
        that carries the cookie it is bound with, found with a few scans in C instead of
        a parse (most of a small request's cost in Python). None: anything else, which
        the full path decides (a refusal, a rebind, the proxy's own answer)."""
        if (
            _HEAD_FAST.fullmatch(raw) is None
            or b" \r\n" in raw
            or b"\t\r\n" in raw
            or b":  " in raw
            or b": \t" in raw
            or _TOKEN_BYTES in raw
        ):
            return None
        low = raw.lower()
        names = _FAST_NAMES.findall(low)
        if names != [b"cookie:"] and sorted(names) != [b"cookie:", b"host:"]:
            return None
        claims = self.claims
        proxy = self.proxy
        h = proxy._lookup(self.sid or "")
        if (
            claims is None
            or h is None
            or h.status != "running"
            or claims.expires_at < time.time()
            or not proxy.allowed(self.sid, claims.user_id)
        ):
            return None
        start = low.find(b"\r\ncookie:")
        end = raw.find(b"\r\n", start + 9)
        ours, rest = _split_cookie(raw[start + 9 : end].strip(b" \t"))
        if ours is None or ours.decode("latin-1") != self.cookie:
            return None
        cookie_line = raw[start : start + 8] + b": " + rest if rest else b""
        host_line = b""
        if len(names) == 2:
            at = low.find(b"\r\nhost:") + 7
            host = raw[at : raw.find(b"\r\n", at)].strip(b" \t")
            host_line = b"X-Forwarded-Host: " + host + b"\r\n"
        return b"".join(
            (
                raw[:start],
                cookie_line,
                raw[end:-2],
                self.user_header,
                b"\r\n",
                host_line,
                self.forwarded,
                b"\r\n\r\n",
            )
        )

    def _rebind_cookie(self, cookie: str) -> bool:
        """A different cookie on a bound connection: valid for this session?"""
        key = self.proxy._key()
        if key is None or self.sid is None:
            return False
        try:
            claims = verify_connect_token(
                key,
                cookie,
                session_id=self.sid,
                purpose="cookie",
                max_lifetime=self.proxy.cookie_max_seconds(),
            )
        except InvalidConnectToken:
            return False
        if self.bound is None or claims.user_id != self.bound[1]:
            self._unbind()
            self._bind(claims)
        self.claims, self.cookie = claims, cookie
        self.user_header = _user_header(claims)
        return True

    def _rewrite(self, head: _Head) -> bytes:
        lines = [head.raw[: head.raw.index(b"\r\n")]]
        for lname, name, value in head.headers:
            if lname in _DROP or (b"_" in lname and lname.replace(b"_", b"-") in _DROP):
                continue
            if lname == b"cookie":
                value = _strip_our_cookie(value)
                if not value:
                    continue
            lines.append(name + b": " + value)
        lines.append(self.user_header)
        host = head.get(b"host")
        if host is not None:
            lines.append(b"X-Forwarded-Host: " + host)
        lines.append(self.forwarded)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _reauth_check(self) -> None:
        up = self.upstream
        if self.state != "reauth" or up is None or up.transport is None:
            return
        now = time.monotonic()
        quiet = now - max(self.last_up_io, self.reauth_since)
        if quiet >= REAUTH_QUIET or now - self.reauth_since > REAUTH_WAIT_SECONDS:
            up.transport.close()  # -> upstream_lost -> answered by the proxy
        else:
            asyncio.get_running_loop().call_later(REAUTH_QUIET, self._reauth_check)

    def upgrade_answered(self, switched: bool) -> None:
        """The tool's first bytes after an upgrade request."""
        if switched:
            self.state = "tunnel"
            if self.bound is not None:
                act = self.proxy._activity.get(self.bound[0], {}).get(self.bound[1])
                if act is not None:
                    act.tunnels += 1
                    self.tunnel_counted = True
            if self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                assert self.upstream is not None and self.upstream.transport is not None
                self.upstream.transport.write(data)
        else:
            # Refused upgrade: we cannot tell where that response ends, so the
            # connection carries no further requests.
            self.state = "refused"
            self.buf.clear()
            if self.transport is not None:
                self.pause("refused")

    def upstream_lost(self, up: _Upstream) -> None:
        if up is not self.upstream:
            return
        self.upstream = None
        self._unbind()
        if self.state == "reauth" and self.transport is not None:
            self.state = "head"
            self.resume("reauth")
            self.head_started = time.monotonic()
            data = bytes(self.buf)
            self.buf.clear()
            self._process(data)
        elif self.transport is not None:
            self.transport.close()  # after what the tool sent is written

    # -------------------------------------------------------- the proxy's own answers

    def _local(self, head: _Head) -> None:
        """An unbound connection: sign in, refuse, or bind it to the session's tool."""
        proxy = self.proxy
        host = (head.get(b"host") or b"").decode("latin-1")
        sid = self.sid or _session_id_from_host(host)
        if sid is None:
            self._reply(404, "no session in the host name: use <sessionId>.<proxy domain>")
            return
        h = proxy._lookup(sid)
        if h is None:
            self._reply(404, f"no session {sid} on this agent")
            return
        key = proxy._key()
        if key is None:
            self._reply(503, "this agent has no connect key yet: it has not reached the controller")
            return
        target = head.target.decode("latin-1")
        if _TOKEN_BYTES in head.target:
            self._sign_in(head, sid, key, target)
            return
        cookie_value = head.cookie()
        if not cookie_value:
            self._reply(401, "not signed in to this session: open it through its studio URL")
            return
        try:
            claims = verify_connect_token(
                key,
                cookie_value,
                session_id=sid,
                purpose="cookie",
                max_lifetime=proxy.cookie_max_seconds(),
            )
        except InvalidConnectToken as exc:
            self._reply(401, f"session cookie refused: {exc}; open the studio URL again")
            return
        if not proxy.allowed(sid, claims.user_id):
            self._reply(403, _forbidden(claims, sid))
            return
        if h.status != "running" or not h.port:
            self._reply(503, f"session {sid} is not running ({h.status})")
            return
        self.sid, self.claims, self.cookie = sid, claims, cookie_value
        self.user_header = _user_header(claims)
        self.forwarded = (
            b"X-Forwarded-Proto: "
            + (b"https" if proxy.secure else b"http")
            + b"\r\nX-Forwarded-For: "
            + self.peer.encode()
            + _secret_header(h.proxy_secret)
        )
        self.state = "connecting"
        self.buf[:0] = head.raw
        self.pause("connecting")
        proxy._spawn(self._connect(h.port, claims))

    def _sign_in(self, head: _Head, sid: str, key: bytes, target: str) -> None:
        query = dict(parse_qsl(target.partition("?")[2], keep_blank_values=True))
        try:
            claims = verify_connect_token(
                key,
                query.get(TOKEN_PARAM, ""),
                session_id=sid,
                max_lifetime=CONNECT_TOKEN_MAX_SECONDS,
            )
        except InvalidConnectToken as exc:
            self._reply(401, f"connect token refused: {exc}")
            return
        if not self.proxy.allowed(sid, claims.user_id):
            self._reply(403, _forbidden(claims, sid))
            return
        remote = self.proxy.claim_nonce_remote
        if remote is not None:
            # Another process of this proxy keeps the used nonces (workers sharing the
            # port): the token is exchanged only once it said this is the first use.
            self.state = "signin"
            self.pause("signin")
            self.proxy._spawn(
                self._sign_in_remote(
                    remote(claims.nonce, claims.expires_at), head, sid, key, target, claims
                )
            )
            return
        if not self.proxy._remember_nonce(claims):
            self._reply(401, "connect token refused: it has already been used")
            return
        self._signed_in(head, sid, key, target, claims)

    async def _sign_in_remote(
        self,
        first_use: Awaitable[bool],
        head: _Head,
        sid: str,
        key: bytes,
        target: str,
        claims: ConnectClaims,
    ) -> None:
        try:
            ok = await first_use
        except Exception as exc:  # the agent's side of the channel is gone
            log.warning("session %s: connect token not checked for reuse: %s", sid, exc)
            ok = False
            if self.state == "signin" and self.transport is not None:
                self._reply(503, "the proxy could not check the connect token: try again")
                return
        if self.state != "signin" or self.transport is None:
            return  # the client went away meanwhile
        if not ok:
            self._reply(401, "connect token refused: it has already been used")
            return
        if not self.proxy.allowed(sid, claims.user_id):
            self._reply(403, _forbidden(claims, sid))
            return
        self._signed_in(head, sid, key, target, claims)
        if self.state == "head":
            self.resume("signin")
            data = bytes(self.buf)
            self.buf.clear()
            if data:
                self._process(data)

    def _signed_in(
        self, head: _Head, sid: str, key: bytes, target: str, claims: ConnectClaims
    ) -> None:
        ttl = self.proxy.cookie_max_seconds()
        now = time.time()
        cookie = sign_connect_token(
            key,
            session_id=sid,
            user_id=claims.user_id,
            user_name=claims.user_name,
            ttl_seconds=ttl,
            purpose="cookie",
            now=now,
        )
        self.proxy._users(sid).setdefault(
            claims.user_id, UserActivity(claims.user_id, claims.user_name)
        ).last_activity = time.time()
        has_body = head.get(b"content-length") not in (None, b"0") or head.get(b"transfer-encoding")
        assert self.transport is not None
        self.transport.write(
            _response(
                302,
                headers=[
                    ("Location", safe_location(target)),
                    ("Set-Cookie", self.proxy.set_cookie_value(cookie, ttl, now)),
                    ("Cache-Control", "no-store"),
                ],
                close=bool(has_body),
            )
        )
        if has_body:
            self.state = "refused"
            self.transport.close()
        else:
            self.state = "head"
            self.head_started = time.monotonic()

    async def _connect(self, port: int, claims: ConnectClaims) -> None:
        loop = asyncio.get_running_loop()
        up = _Upstream(self)
        try:
            if self.proxy.splice:
                await asyncio.wait_for(_splice_connection(loop, up, port), timeout=10)
            else:
                await asyncio.wait_for(
                    loop.create_connection(lambda: up, "127.0.0.1", port), timeout=10
                )
        except (OSError, TimeoutError) as exc:
            self._reply(502, f"the session's tool did not answer: {exc or 'timed out'}")
            return
        if self.state != "connecting" or self.transport is None:
            if up.transport is not None:
                up.transport.close()
            return
        self.upstream = up
        self._bind(claims)
        self.state = "head"
        data = bytes(self.buf)
        self.buf.clear()
        self.resume("connecting")
        self._process(data)

    def _bind(self, claims: ConnectClaims) -> None:
        self.claims = claims
        sid = self.sid or ""
        users = self.proxy._users(sid)
        act = users.get(claims.user_id)
        if act is None:
            act = users[claims.user_id] = UserActivity(claims.user_id, claims.user_name)
        act.connections += 1
        act.last_activity = time.time()
        self.bound = (sid, claims.user_id)
        self.visit = self.proxy._visit_joined(sid, claims, self.peer)
        self.proxy._changed(sid)

    def _unbind(self) -> None:
        if self.visit is not None:
            self.proxy._visit_left(self.visit)
            self.visit = None
        if self.bound is None:
            return
        sid, uid = self.bound
        self.bound = None
        act = self.proxy._activity.get(sid, {}).get(uid)
        if act is not None and act.connections > 0:
            act.connections -= 1
            if self.tunnel_counted:
                act.tunnels -= 1
            act.last_activity = time.time()
            self.proxy._changed(sid)
        self.tunnel_counted = False


async def _splice_connection(loop: asyncio.AbstractEventLoop, up: _Upstream, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    SpliceTransport(loop, sock, up)


class PortHeldError(OSError):
    """The proxy port is held by a process that is not ours."""


def listen_reuse_port(host: str, port: int, *, first: bool) -> socket.socket:
    """A listening socket on host:port with SO_REUSEPORT, to be shared by this agent's
    proxy processes.

    Linux lets a socket join a SO_REUSEPORT group only when every socket in it set the
    option and has the same effective uid; a process of another uid therefore cannot
    join ours (EADDRINUSE), but any socket already there, of our uid, would receive a
    share of the connections. So the first bind checks that nobody listens on the
    port: a plain bind (no SO_REUSEPORT) must succeed first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if first:
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortHeldError(
                        exc.errno,
                        f"{host}:{port} is already in use by another process "
                        "(the proxy workers share the port only among themselves)",
                    ) from None
                raise
            # Port 0: the port chosen is free, and the shared socket takes the same one.
            port = int(probe.getsockname()[1])
        finally:
            probe.close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _forbidden(claims: ConnectClaims, sid: str) -> str:
    return (
        f"user {claims.user_name} (id {claims.user_id}) may no longer use session {sid}: "
        "access to this studio was withdrawn; ask its owner to give it back"
    )


def _secret_header(secret: str) -> bytes:
    # A session started by an agent older than the secret has none: nothing to add.
    if not secret:
        return b""
    return b"\r\n" + PROXY_SECRET_HEADER.encode() + b": " + secret.encode("ascii")


def _user_header(claims: ConnectClaims) -> bytes:
    name = claims.user_name.replace("\r", "").replace("\n", "")
    return USER_HEADER.encode() + b": " + name.encode()


class ProxiedSession(Protocol):
    """What the proxy reads of a session: whether it runs, its tool's port, and the
    secret the proxy proves itself to the tool with."""

    @property
    def status(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def proxy_secret(self) -> str: ...


class ConnectProxy:
    def __init__(
        self,
        *,
        lookup: Callable[[str], ProxiedSession | None],
        key: Callable[[], bytes | None],
        on_activity: Callable[[str], None] | None = None,
        cookie_max: Callable[[], float | None] | None = None,
        on_visit: Callable[[pb.ConnectionVisit], None] | None = None,
        splice: bool = False,
    ) -> None:
        self._lookup = lookup
        self._key = key
        # The controller's bound on cookie lifetimes (None or 0: not sent).
        self._cookie_max = cookie_max
        # Served over TLS (`start(tls=...)`): cookies are Secure.
        self.secure = False
        self._on_activity = on_activity
        self.active_seconds = ACTIVE_SECONDS
        # The connection audit: where visits are reported, and this run's id (Hello).
        self.on_visit = on_visit
        self.instance_id = secrets.token_hex(16)
        self.visit_grace_seconds = VISIT_GRACE_SECONDS
        self._visits: dict[tuple[str, int, str], _Visit] = {}
        # Nonces of connect tokens already exchanged, until they expire (single use).
        self._used_nonces: dict[str, float] = {}
        # Set in a worker process: asks the agent's proxy whether a nonce is new.
        self.claim_nonce_remote: Callable[[str, float], Awaitable[bool]] | None = None
        # What the worker processes sharing the port report (`ProxyWorkers`): per worker,
        # who is connected to which session, its totals and its open connections.
        self._remote_activity: dict[str, dict[str, list[UserActivity]]] = {}
        self._remote_stats: dict[str, ProxyStats] = {}
        self._remote_open: dict[str, int] = {}
        # The totals of worker processes that ended (counters never go back).
        self._retired_stats = ProxyStats()
        self._activity: dict[str, dict[int, UserActivity]] = {}
        # Sessions whose users are narrowed to a list (see `set_access`).
        self._access: dict[str, frozenset[int]] = {}
        self._clients: set[_Client] = set()
        self._dirty: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.url = ""
        self.stats = ProxyStats()
        # Relay the tools' bytes with os.splice (Linux, plain HTTP clients); off (the
        # default: not faster in bench_proxy_relay here), every byte goes through Python.
        self.splice = splice and splice_supported()

    @property
    def open_connections(self) -> int:
        """Client connections open now (in worker processes too)."""
        return len(self._clients) + sum(self._remote_open.values())

    def total_stats(self) -> ProxyStats:
        """This process's totals plus those of the worker processes, past and present."""
        total = ProxyStats()
        total.add(self.stats)
        total.add(self._retired_stats)
        for stats in self._remote_stats.values():
            total.add(stats)
        return total

    # ------------------------------------------------------------ worker processes

    def set_remote_activity(self, worker: str, session_id: str, users: list[UserActivity]) -> None:
        """Who a worker process has connected to a session now (replaces its last word)."""
        sessions = self._remote_activity.setdefault(worker, {})
        if users:
            sessions[session_id] = users
        else:
            sessions.pop(session_id, None)
        self._changed(session_id)

    def set_remote_stats(self, worker: str, stats: ProxyStats, open_connections: int) -> None:
        self._remote_stats[worker] = stats
        self._remote_open[worker] = open_connections

    def forget_worker(self, worker: str) -> None:
        """A worker process ended: its connections are gone, its totals stay counted."""
        for sid in self._remote_activity.pop(worker, {}):
            self._changed(sid)
        stats = self._remote_stats.pop(worker, None)
        if stats is not None:
            self._retired_stats.add(stats)
        self._remote_open.pop(worker, None)

    def claim_nonce(self, nonce: str, expires_at: float) -> bool:
        """Record a connect token's nonce: True the first time it is seen."""
        now = time.time()
        if len(self._used_nonces) > 1024:
            for used, exp in list(self._used_nonces.items()):
                if exp < now:
                    del self._used_nonces[used]
        if nonce in self._used_nonces:
            return False
        self._used_nonces[nonce] = expires_at
        return True

    # ------------------------------------------------------------ lifecycle

    async def start(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        *,
        reuse_port: bool = False,
        join: bool = False,
    ) -> int:
        """Listen on host:port; the port bound. With `reuse_port` the socket is shared
        with the worker processes (SO_REUSEPORT): the first (`join` False) refuses a port
        another process holds already; a worker (`join`) adds itself to it."""
        loop = asyncio.get_running_loop()
        if reuse_port:
            sock = listen_reuse_port(host, port, first=not join)
            self._server = await loop.create_server(
                lambda: _Client(self), sock=sock, backlog=1024, ssl=tls
            )
        else:
            self._server = await loop.create_server(
                lambda: _Client(self), host, port, reuse_address=True, backlog=1024, ssl=tls
            )
        self.secure = tls is not None
        bound = int(self._server.sockets[0].getsockname()[1])
        self.url = f"{'https' if self.secure else 'http'}://{host}:{bound}"
        self._sweeper = asyncio.create_task(self._sweep_loop())
        return bound

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.close()
        self._end_visits(everything=True)
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ cookies

    def cookie_max_seconds(self) -> float:
        """How long a cookie may live: the controller's bound, else the default."""
        sent = self._cookie_max() if self._cookie_max is not None else None
        return float(sent) if sent and sent > 0 else float(DEFAULT_COOKIE_MAX_SECONDS)

    def set_cookie_value(self, cookie: str, ttl: float, now: float) -> str:
        """The Set-Cookie value: host-only (no Domain), so it never reaches another
        session's host; HttpOnly; Secure over TLS; Lax, so that the navigation
        following the controller's (cross-site) redirect to the proxy carries it."""
        parts = [
            f"{COOKIE_NAME}={cookie}",
            f"Max-Age={int(ttl)}",
            f"Expires={formatdate(now + int(ttl), usegmt=True)}",
            "Path=/",
            "HttpOnly",
            "SameSite=Lax",
        ]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)

    # ------------------------------------------------------------ activity

    def _users(self, sid: str) -> dict[int, UserActivity]:
        users = self._activity.get(sid)
        if users is None:
            users = self._activity[sid] = {}
        return users

    def _changed(self, sid: str) -> None:
        self._dirty.add(sid)

    def connections(self, session_id: str) -> list[dict[str, Any]]:
        return [
            {
                "userId": a.user_id,
                "userName": a.user_name,
                "connections": a.connections,
                "lastActivity": int(a.last_activity),
            }
            for a in self.active_users(session_id)
        ]

    def connections_message(self, session_id: str) -> pb.SessionConnections:
        return pb.SessionConnections(
            session_id=session_id,
            connections=[
                pb.ActiveConnection(
                    user_id=a.user_id,
                    user_name=a.user_name,
                    connections=a.connections,
                    last_active=int(a.last_activity),
                )
                for a in self.active_users(session_id)
            ],
        )

    def active_users(self, session_id: str) -> list[UserActivity]:
        """Users connected to the session: with an open WebSocket (any upgraded
        tunnel), or with traffic in the last `active_seconds`."""
        horizon = time.time() - self.active_seconds
        local = self._activity.get(session_id, {})
        remote = [
            users
            for sessions in self._remote_activity.values()
            if (users := sessions.get(session_id))
        ]
        merged: Iterable[UserActivity] = local.values()
        if remote:
            # The union over the processes sharing the port: a user's connections and
            # tunnels add up, the latest activity wins.
            union: dict[int, UserActivity] = {}
            for a in [*local.values(), *(a for users in remote for a in users)]:
                u = union.get(a.user_id)
                if u is None:
                    union[a.user_id] = UserActivity(
                        a.user_id, a.user_name, a.connections, a.last_activity, a.tunnels
                    )
                else:
                    u.connections += a.connections
                    u.tunnels += a.tunnels
                    u.last_activity = max(u.last_activity, a.last_activity)
            merged = union.values()
        return [a for a in merged if a.tunnels > 0 or a.last_activity >= horizon]

    # ------------------------------------------------------------ visits (the audit)

    def _visit_joined(self, sid: str, claims: ConnectClaims, peer: str) -> _Visit:
        """A connection bound to `sid` for `claims`' user: its visit, opened if new."""
        address = _client_address(peer)
        key = (sid, claims.user_id, address)
        visit = self._visits.get(key)
        if visit is None:
            visit = self._visits[key] = _Visit(
                visit_id=secrets.token_hex(16),
                session_id=sid,
                user_id=claims.user_id,
                user_name=claims.user_name,
                address=address,
                opened_at=time.time(),
            )
            log.info(
                "session %s: visit %s of user %s (id %d) from %s opened",
                sid,
                visit.visit_id,
                claims.user_name,
                claims.user_id,
                address,
            )
            self._report_visit(visit.message(self.instance_id))
        visit.connections += 1
        visit.idle_since = 0.0
        return visit

    def _visit_left(self, visit: _Visit) -> None:
        visit.connections = max(0, visit.connections - 1)
        if visit.connections == 0:
            visit.idle_since = time.time()

    def _end_visits(self, *, everything: bool = False) -> None:
        """Report the close of visits idle for the grace period (all of them, now, with
        `everything`: the proxy is closing)."""
        now = time.time()
        for key, visit in list(self._visits.items()):
            idle = visit.connections == 0 and now - visit.idle_since >= self.visit_grace_seconds
            if not (idle or everything):
                continue
            del self._visits[key]
            closed_at = visit.idle_since if visit.connections == 0 else now
            log.info(
                "session %s: visit %s of user %s from %s closed after %.0f s",
                visit.session_id,
                visit.visit_id,
                visit.user_name,
                visit.address,
                max(0.0, closed_at - visit.opened_at),
            )
            self._report_visit(visit.message(self.instance_id, closed_at))

    def _report_visit(self, message: pb.ConnectionVisit) -> None:
        if self.on_visit is None:
            return
        try:
            self.on_visit(message)
        except Exception:  # pragma: no cover - an audit sink must not break the proxy
            log.exception("reporting visit %s failed", message.visit_id)

    def open_visits(self) -> list[pb.ConnectionVisit]:
        """The visits not closed yet (for the operator), oldest first."""
        visits = sorted(self._visits.values(), key=lambda v: v.opened_at)
        return [v.message(self.instance_id) for v in visits]

    # ------------------------------------------------------------ access

    def allowed(self, session_id: str | None, user_id: int) -> bool:
        access = self._access.get(session_id or "")
        return access is None or user_id in access

    def set_access(self, session_id: str, user_ids: Iterable[int] | None) -> int:
        """Narrow a session to these users (None: anyone with a valid cookie).

        Other users' connections end now, WebSockets and idle keep-alives
        included, and they stop being listed as connected; their cookies and
        tokens get 403 from now on. Returns how many connections were ended.
        """
        if user_ids is None:
            self._access.pop(session_id, None)
            return 0
        access = frozenset(int(u) for u in user_ids)
        if self._access.get(session_id) == access:
            return 0  # the same list again (every DesiredState repeats it)
        self._access[session_id] = access
        ended = 0
        for client in list(self._clients):
            uid = client.user_id()
            if client.sid == session_id and uid is not None and uid not in access:
                client.close()
                ended += 1
        users = self._activity.get(session_id, {})
        for uid in [u for u in users if u not in access]:
            del users[uid]
            self._changed(session_id)
        if ended:
            log.info("session %s: access narrowed, %d connection(s) ended", session_id, ended)
        return ended

    def forget_access(self, session_id: str) -> None:
        self._access.pop(session_id, None)

    def narrowed_sessions(self) -> set[str]:
        return set(self._access)

    def access_table(self) -> dict[str, frozenset[int]]:
        """The narrowed sessions and who may use them (what the workers are sent)."""
        return dict(self._access)

    def apply_desired_access(self, full: bool, sessions: Iterable[pb.SessionDesired]) -> None:
        """The access part of a DesiredState, for running sessions too (whatever the
        generation): a listed session with `access` is narrowed to it; one without
        it (an older controller) is not narrowed; a deleted session, or with a full
        set one no longer listed, is forgotten."""
        listed: set[str] = set()
        for d in sessions:
            listed.add(d.session_id)
            if d.status == pb.DESIRED_STATUS_DELETED:
                self.forget_access(d.session_id)
            elif d.HasField("access"):
                self.set_access(d.session_id, d.access.user_ids)
            else:
                self.set_access(d.session_id, None)
        if full:
            for sid in self.narrowed_sessions() - listed:
                self.forget_access(sid)

    def all_connections(self) -> list[pb.SessionConnections]:
        """SessionConnections of every session someone is connected to (a resync)."""
        sids = [sid for sid in sorted(self._known_sessions()) if self.active_users(sid)]
        return [self.connections_message(sid) for sid in sids]

    def end_stopped_sessions(self) -> int:
        """End now the connections of sessions that are gone or no longer running (the
        sweep does it within a second anyway). Returns how many were ended."""
        ended = 0
        running: dict[str, bool] = {}
        for client in list(self._clients):
            sid = client.sid
            if sid is None or client.state == "closed":
                continue
            ok = running.get(sid)
            if ok is None:
                h = self._lookup(sid)
                ok = running[sid] = h is not None and h.status == "running"
            if not ok:
                client.close()
                ended += 1
        return ended

    def _known_sessions(self) -> set[str]:
        sids = set(self._activity)
        for sessions in self._remote_activity.values():
            sids.update(sessions)
        return sids

    async def _sweep_loop(self) -> None:
        reported: dict[str, tuple[frozenset[int], float]] = {}
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self._sweep(reported)
            except Exception:  # pragma: no cover - never let the sweep die
                log.exception("proxy sweep failed")

    def _sweep(self, reported: dict[str, tuple[frozenset[int], float]]) -> None:
        now = time.monotonic()
        wall = time.time()
        running: dict[str, bool] = {}
        for client in list(self._clients):
            if client.closing_since and now - client.closing_since > CLOSE_ABORT_SECONDS:
                client.abort()  # closed by us, but the peer never took what was buffered
                continue
            sid = client.sid
            if sid is not None and client.state != "closed":
                ok = running.get(sid)
                if ok is None:
                    h = self._lookup(sid)
                    ok = running[sid] = h is not None and h.status == "running"
                if not ok:
                    client.close()  # revocation: the session stopped or is gone
                    continue
                uid = client.user_id()
                if uid is not None and not self.allowed(sid, uid):
                    client.close()  # access narrowed (set_access closed it; a safety net)
                    continue
            if client.bound is not None:
                act = self._activity.get(client.bound[0], {}).get(client.bound[1])
                if act is not None:
                    act.last_activity = max(act.last_activity, wall - (now - client.last_io))
            if now - client.last_io > IDLE_HTTP_SECONDS and (
                client.state == "refused" or (client.bound is None and client.state == "head")
            ):
                client.close()  # an unbound connection (sign-in, refusals) left idle
            if client.state in ("head", "connecting") and client.buf:
                if now - client.head_started > HEAD_TIMEOUT_SECONDS:
                    client.close()  # a request head that never ends
            elif client.line_started and now - client.line_started > HEAD_TIMEOUT_SECONDS:
                client.close()  # a chunk-size or trailer line that never ends
        for sid, users in list(self._activity.items()):
            ok = running.get(sid)
            if ok is None:
                h = self._lookup(sid)
                ok = running[sid] = h is not None and h.status == "running"
            for uid, act in list(users.items()):
                if not ok or (
                    act.connections <= 0 and wall - act.last_activity > self.active_seconds
                ):
                    del users[uid]
            if not users:
                del self._activity[sid]
        self._end_visits()
        # Report who is connected when that changes; last activity every 30 s at most.
        for sid in self._known_sessions() | set(reported) | self._dirty:
            active = frozenset(a.user_id for a in self.active_users(sid))
            before = reported.get(sid)
            if before is not None and before[0] == active and now - before[1] < 30:
                continue
            if before is None and not active:
                continue
            if active:
                reported[sid] = (active, now)
            else:
                reported.pop(sid, None)
            if self._on_activity is not None:
                try:
                    self._on_activity(sid)
                except Exception:  # pragma: no cover
                    log.exception("proxy activity report failed")
        self._dirty.clear()

    # ------------------------------------------------------------ auth

    def _remember_nonce(self, claims: ConnectClaims) -> bool:
        return self.claim_nonce(claims.nonce, claims.expires_at)
