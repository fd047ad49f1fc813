"""The fast path for a bound connection's request heads (`_Client._fast_head`) against the
full one (`_parse_head`, `_Client._framing`, the checks of `_Client._head`, `_rewrite`).

The fast path may decline any head (the full path then decides), but a head it takes
must be one the full path forwards as a plain request (no body, no upgrade) with the
cookie the connection is bound with, and it must send the tool exactly the bytes the
full path would. Checked on browser-like heads and on every one-byte insertion,
replacement and deletion of a few bytes that matter to HTTP syntax, at every position.
"""

from __future__ import annotations

import time

import pytest

from agent.proxy import ConnectProxy, server
from studios_shared.connect_token import ConnectClaims

SID = "fa57e001"
COOKIE = "v1.c2Vzc2lvbg.signature-part_x"
OTHER = "v1.b3RoZXI.another-signature"


class _Session:
    status = "running"
    port = 1
    proxy_secret = "s3cret"


def _client(*, user_id: int = 7, expires_in: float = 3600.0) -> server._Client:
    session = _Session()
    proxy = ConnectProxy(lookup=lambda sid: session if sid == SID else None, key=lambda: b"k" * 32)
    client = server._Client(proxy)
    client.peer = "127.0.0.1"
    client.sid = SID
    client.cookie = COOKIE
    client.claims = ConnectClaims(
        session_id=SID,
        user_id=user_id,
        user_name="alice",
        expires_at=time.time() + expires_in,
        nonce="n",
        purpose="cookie",
    )
    client.user_header = server._user_header(client.claims)
    client.forwarded = b"X-Forwarded-Proto: http\r\nX-Forwarded-For: 127.0.0.1" + (
        server._secret_header(session.proxy_secret)
    )
    return client


def _full(client: server._Client, raw: bytes) -> bytes | None:
    """What the full path forwards for `raw` as a plain request with the bound cookie,
    or None when it would do anything else (refuse, reauthenticate, frame a body)."""
    try:
        head = server._parse_head(raw)
        framing = client._framing(head)
    except server._BadRequest:
        return None
    if framing != ("head", 0) or server._TOKEN_BYTES in head.target:
        return None
    if head.cookie() != client.cookie:
        return None
    if head.get(b"upgrade") is not None and b"upgrade" in (head.get(b"connection") or b"").lower():
        return None
    return client._rewrite(head)


def _head(*lines: bytes, request: bytes = b"GET /lab/api/contents?x=1 HTTP/1.1") -> bytes:
    return b"\r\n".join((request, *lines)) + b"\r\n\r\n"


CHROME = _head(
    b"Host: " + SID.encode() + b".localhost:7070",
    b"Connection: keep-alive",
    b'sec-ch-ua: "Chromium";v="131", "Not_A Brand";v="24"',
    b"Accept: application/json, text/plain, */*",
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
    b"Referer: http://" + SID.encode() + b".localhost:7070/lab",
    b"Accept-Encoding: gzip, deflate, br, zstd",
    b"Accept-Language: en-GB,en;q=0.9,\xe9",
    b"Cookie: _xsrf=2|abc|def; studios-connect=" + COOKIE.encode() + b"; username-x=2|y",
)
ONLY_COOKIE = _head(b"Cookie: studios-connect=" + COOKIE.encode())
NO_HOST = _head(b"Accept: */*", b"Cookie: a=1;studios-connect=" + COOKIE.encode() + b";b=2")


@pytest.mark.parametrize("raw", [CHROME, ONLY_COOKIE, NO_HOST], ids=["chrome", "only", "nohost"])
def test_the_fast_path_takes_plain_heads_and_sends_what_the_full_path_sends(raw: bytes) -> None:
    client = _client()
    fast = client._fast_head(raw)
    assert fast is not None
    assert fast == _full(client, raw)
    assert b"studios-connect" not in fast
    assert fast.count(b"X-Studios-User: alice\r\n") == 1


OURS = b"Cookie: studios-connect=" + COOKIE.encode()


@pytest.mark.parametrize(
    "raw",
    [
        _head(b"Host: a", b"Cookie: studios-connect=" + OTHER.encode()),  # another cookie
        _head(b"Host: a"),  # none
        _head(b"Cookie: studios-connect=" + COOKIE.encode(), b"Cookie: a=1"),  # two lines
        _head(b"Host: a", b"Host: b", b"Cookie: studios-connect=" + COOKIE.encode()),
        _head(b"X-Studios-User: eve", b"Cookie: studios-connect=" + COOKIE.encode()),
        _head(b"x_studios_user: eve", b"Cookie: studios-connect=" + COOKIE.encode()),
        _head(b"X-Forwarded-For: 1.2.3.4", b"Cookie: studios-connect=" + COOKIE.encode()),
        _head(b"Content-Length: 0", b"Cookie: studios-connect=" + COOKIE.encode()),
        _head(b"Transfer-Encoding: chunked", b"Cookie: studios-connect=" + COOKIE.encode()),
        _head(b"Upgrade: websocket", b"Cookie: studios-connect=" + COOKIE.encode()),
        _head(OURS, request=b"GET /?studio-token=x HTTP/1.1"),
        _head(OURS, request=b"GET http://h/ HTTP/1.1"),
        _head(b"Foo:a", b"Cookie: studios-connect=" + COOKIE.encode()),  # not in rewritten form
    ],
)
def test_the_fast_path_declines_what_the_full_path_must_decide(raw: bytes) -> None:
    assert _client()._fast_head(raw) is None


def test_the_fast_path_declines_once_the_connection_may_no_longer_be_used() -> None:
    expired = _client(expires_in=-1)
    assert expired._fast_head(CHROME) is None
    narrowed = _client()
    narrowed.proxy.set_access(SID, [99])
    assert narrowed._fast_head(CHROME) is None
    stopped = _client()
    _Session.status = "stopping"
    try:
        assert stopped._fast_head(CHROME) is None
    finally:
        _Session.status = "running"


def test_every_one_byte_change_is_declined_or_sent_as_the_full_path_sends_it() -> None:
    client = _client()
    taken = declined = 0
    for base in (CHROME, ONLY_COOKIE, NO_HOST):
        variants = set()
        for i in range(len(base) + 1):
            variants.add(base[:i] + base[i + 1 :])
            for byte in b" \t\r\n:;=_-,\x00\x7f\xe9aA":
                variants.add(base[:i] + bytes([byte]) + base[i:])
                variants.add(base[:i] + bytes([byte]) + base[i + 1 :])
        for raw in variants:
            if not raw.endswith(b"\r\n\r\n") or b"\r\n\r\n" in raw[:-4]:
                continue  # not one whole head, as `_process` hands it over
            fast = client._fast_head(raw)
            if fast is None:
                declined += 1
                continue
            taken += 1
            assert fast == _full(client, raw), raw
    # Both sides are exercised: many variants stay plain, many are not.
    assert taken > 1000 and declined > 1000, (taken, declined)
