"""The connect proxy's hand-written request parser beside two well-kept strict ones:
httptools (llhttp, the HTTP/1.1 parser Node.js ships: the anchor) and h11.

(a) Every raw-byte case of tests/agent/proxy/test_framing.py, imported from there: 31
malformed heads, 8 of them after a valid request on the same connection, 7 malformed chunked
bodies, the unfinished LF-only head (47 to refuse) and the 5 requests it says must pass. Each
is fed whole to a fresh parser: `refused`, `accepted` (every request complete) or `waiting`.
Ours is the proxy's own code (`_parse_head`, `_Client._framing`, `_bare_cr_or_lf`, and a
chunked body fed byte by byte to a `_Client` in its `chunk-line` state); httptools with
llhttp's defaults (no lenient flag set); h11 answers each request so it reads the next.
(b) Every one-byte insertion or replacement (17 bytes) in two valid requests, ours against
llhttp: where one refuses and the other does not, grouped by reason.
(c) Per-head time for a 740-byte Chrome GET with cookies, best of 5 rounds.

    .venv/bin/python -m tests.bench.bench_proxy_parser [--heads 10000]

Needs httptools and h11 (`.venv/bin/pip install httptools h11`; neither is a project
dependency). Prints one JSON object. wrk is not installed here, so tests/bench/bench_proxy.py
was not run; the head cost is set against its anchors instead.

Measured 2026-12-01 (Python 3.11.7, httptools 0.9.0 = llhttp 9.4.3, h11 0.16.0; 2 vCPU shared
with other test runs, so times spread by about 1.5x between runs):
- Refused, of the 47: ours 47, httptools 45, h11 30. httptools lets through a double space
  in the request line, Transfer-Encoding on HTTP/1.0 and two Host headers, and refuses one
  request the tests say must pass (the same Content-Length twice, which RFC 9110 8.6 allows).
  h11 reads a bare LF as a line end, unfolds obs-folds, lets Transfer-Encoding override
  Content-Length, takes a Content-Length list, control characters, a 17-digit chunk size: it
  is a lenient endpoint parser, never to be put in front of another parser.
- Mutations (5,678; 454 differ): the heads llhttp alone refuses are nothing a lenient tool
  could frame another way: methods outside its fixed list, `"`, bytes >= 0x80 or no leading
  `/` in the target, OWS after `chunked`, and bytes ours holds back until a CRLF ends their
  line (`waiting`: the next head, a trailer line; refused once it ends, never forwarded). In
  chunked bodies llhttp enforces the chunk-ext grammar and ours takes any text without
  controls after `;`: some of that is valid (BWS around `;` and `=`), but an unbalanced `"`
  (`3;e="1`) is not, and a tool whose quoted-string scan ran past the CRLF would read a
  different body. Only ours refuses a bare CR/LF before or between requests and an empty
  Transfer-Encoding list element.
- Per 740-byte head: ours 17.7 us (21.5 in a second run), httptools with the header callbacks
  a proxy needs 8.3 us (11.9), llhttp validation only 1.7 us, h11 92.5 us (128.9): ours is
  2.1x the anchor, h11 11x. On a 283-byte head (Host and Cookie, like the requests wrk sends
  in bench_proxy.py): ours 6.6 us, httptools 2.9 us.

Conclusion: the proxy keeps its own parser. It refuses every smuggling case llhttp refuses, and
the three llhttp lets through (checks the proxy would have to add on top of llhttp). Neither
library hands back the raw lines: llhttp gives names as sent and duplicates in order, but
rebuilds no request line and gives chunk payloads, not chunk lines or extensions, so the byte
splice would become a re-framing; h11 lowercases names (raw case only via raw_items), merges
duplicate Content-Lengths, strips and unfolds values. llhttp would save 3.7 us per head of
bench_proxy.py (ANCHORS.md: ours at 1.10x direct, about 30k req/s, so at most about 33 us of
proxy CPU per request: about a tenth) and about 10 us per browser-sized head, where a studio
sees far fewer requests; it would cost a C extension dependency and a rewrite of `_Client`'s
framing. h11 is slower, lenient, and not an option.
Worth taking from llhttp into ours: the RFC 9112 chunk-ext grammar (token or quoted-string
values, BWS allowed), a stricter request-target (no `"` or bytes >= 0x80; origin-form unless
absolute-form, CONNECT or OPTIONS *), and refusing a complete bad line of an unfinished head at
once rather than at the head timeout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import h11
import httptools

from agent.proxy.server import _BadRequest, _bare_cr_or_lf, _Client, _parse_head
from tests.agent.proxy.test_framing import CHUNK_CASES, HEAD_CASES, SID, _request

ANCHOR = "httptools/llhttp (the HTTP/1.1 parser Node.js ships)"

# ------------------------------------------------------------------ the cases


def cases() -> list[tuple[str, bytes, bool]]:
    """(id, bytes, must be refused), in the order of test_framing.py."""
    out = [(f"head:{name}", data, True) for name, data in HEAD_CASES]
    # test_a_malformed_head_on_a_bound_connection_never_reaches_the_tool
    out += [(f"bound:{name}", _request() + data, True) for name, data in HEAD_CASES[:8]]
    out += [
        (f"chunk:{name}", _request(b"Transfer-Encoding: chunked", body=chunks), True)
        for name, chunks in CHUNK_CASES
    ]
    # test_an_unfinished_head_with_bare_lf_line_ends_is_refused_at_once
    out.append(
        ("unfinished-lf-only-head", f"GET /x HTTP/1.1\nHost: {SID}.localhost\n\n".encode(), True)
    )
    # test_the_tool_sees_exactly_one_of_each_header_the_proxy_owns and
    # test_strict_but_valid_requests_still_pass: these must be forwarded.
    out += [
        (
            "valid:proxy-owned-headers",
            _request(
                b"X-Studios-User: mallory",
                b"x-studios-user: carol",
                b"X_Studios_User: eve",
                b"X-Forwarded-For: 10.9.9.9",
                b"x_forwarded_host: evil",
                b"X-FORWARDED-PROTO: https",
            ),
            False,
        ),
        ("valid:no-space-tab-obs-text", _request(b"Foo:a", b"Bar: x\ty \xe9 z \t"), False),
        (
            "valid:same-content-length-twice",
            _request(
                b"Content-Length: 5", b"Content-Length: 5", line=b"POST /x HTTP/1.1", body=b"hello"
            ),
            False,
        ),
        ("valid:http-1.0", _request(line=b"GET /x?q=1 HTTP/1.0"), False),
        (
            "valid:chunk-extension-and-trailer",
            _request(
                b"Transfer-Encoding: chunked",
                line=b"POST /c HTTP/1.1",
                body=b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
            ),
            False,
        ),
    ]
    return out


Outcome = tuple[str, str]  # ("refused" | "accepted" | "waiting", why / what was read)
_BORING = {b"host", b"cookie"}


def _seen(requests: list[tuple[bytes, list[tuple[bytes, bytes]]]]) -> str:
    """What a parser read, short: each request line and its headers but Host and Cookie."""
    parts = []
    for line, headers in requests:
        shown = [
            f"{n.decode('latin-1')}: {v.decode('latin-1')!r}"
            for n, v in headers
            if n.lower() not in _BORING
        ]
        parts.append(line.decode("latin-1") + (" {" + "; ".join(shown) + "}" if shown else ""))
    return " | ".join(parts)


class _Sink:
    """The client transport of a `_Client` driven without a socket."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _ours_chunked(body: bytes) -> tuple[str, int, str]:
    """The proxy's chunked-body state machine on `body`, one byte at a time: (state it
    stopped in, bytes consumed, its 400 message if it refused)."""
    client = _Client(None)  # type: ignore[arg-type]
    sink = _Sink()
    client.transport = sink  # type: ignore[assignment]
    client.state = "chunk-line"
    for i in range(len(body)):
        client.data_received(body[i : i + 1])
        if client.state == "refused":
            return "refused", i + 1, sink.written.partition(b"\r\n\r\n")[2].decode().strip()
        if client.state == "head":
            return "head", i + 1, ""
    return client.state, len(body), ""


def ours(data: bytes) -> Outcome:
    requests: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
    i = 0
    while i < len(data):
        end = data.find(b"\r\n\r\n", i)
        if end < 0:
            if _bare_cr_or_lf(data, i):
                return "refused", "bare CR or LF in the request head"
            return "waiting", _seen(requests)
        try:
            head = _parse_head(data[i : end + 4])
            state, length = _Client._framing(head)
        except _BadRequest as exc:
            return "refused", str(exc)
        requests.append(
            (head.raw[: head.raw.index(b"\r\n")], [(name, v) for _n, name, v in head.headers])
        )
        i = end + 4
        if state == "body":
            if i + length > len(data):
                return "waiting", _seen(requests)
            i += length
        elif state == "chunk-line":
            stopped, used, why = _ours_chunked(data[i:])
            if stopped == "refused":
                return "refused", why
            if stopped != "head":
                return "waiting", _seen(requests)
            i += used
    return "accepted", _seen(requests)


class _Collect:
    """httptools protocol: what a proxy needs of each request (its line, headers in order)."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.begun = self.done = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.requests: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []

    def on_message_begin(self) -> None:
        self.begun += 1
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        method, version = self.parser.get_method(), self.parser.get_http_version()
        self.requests.append(
            (b"%s %s HTTP/%s" % (method, self.url, version.encode()), self.headers)
        )

    def on_message_complete(self) -> None:
        self.done += 1


def _httptools_parser() -> tuple[httptools.HttpRequestParser, _Collect]:
    """A request parser with llhttp's defaults (no lenient flag set) and its collector."""
    proto = _Collect()
    proto.parser = httptools.HttpRequestParser(proto)
    return proto.parser, proto


def with_httptools(data: bytes) -> Outcome:
    parser, proto = _httptools_parser()
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return "accepted", "upgrade"
    except httptools.HttpParserError as exc:
        return "refused", f"{type(exc).__name__}: {exc}"
    seen = _seen(proto.requests)
    return ("accepted" if proto.done and proto.begun == proto.done else "waiting"), seen


def with_h11(data: bytes) -> Outcome:
    conn = h11.Connection(our_role=h11.SERVER)
    conn.receive_data(data)
    requests: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
    done = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                line = b"%s %s HTTP/%s" % (event.method, event.target, event.http_version)
                requests.append((line, list(event.headers.raw_items())))
            elif isinstance(event, h11.EndOfMessage):
                done += 1
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is h11.MUST_CLOSE:
                    break  # HTTP/1.0: h11 reads nothing more on this connection
                conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        return "refused", f"RemoteProtocolError: {exc}"
    complete = done and conn.their_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE)
    return ("accepted" if complete and not conn.trailing_data[0] else "waiting"), _seen(requests)


PARSERS: dict[str, Callable[[bytes], Outcome]] = {
    "ours": ours,
    "httptools": with_httptools,
    "h11": with_h11,
}

# ------------------------------------------------------------------ mutations

# Two valid requests (a Content-Length body; a chunked one with an extension and a trailer)
# and the bytes put into them, everywhere: one inserted, or one replacing the byte there.
MUTATED = (
    b"POST /x?a=1 HTTP/1.1\r\nHost: s.localhost\r\nFoo: a b\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /x HTTP/1.1\r\nHost: s.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;e=1\r\nabc\r\n0\r\nT: t\r\n\r\n",
)
MUTATION_BYTES = b'\x00\t\n\x0b\x0c\r "(,:;\x7f\x80\xff0A'


def mutations() -> dict[str, Any]:
    """Ours against the anchor beyond the table: where exactly one of them refuses a
    mutated request, grouped by the two outcomes and the refuser's reason."""
    groups: dict[tuple[str, str, str], list[Any]] = {}
    total = 0
    for src in MUTATED:
        for pos in range(len(src) + 1):
            for b in MUTATION_BYTES:
                for data in (
                    src[:pos] + bytes([b]) + src[pos:],
                    src[:pos] + bytes([b]) + src[pos + 1 :],
                ):
                    total += 1
                    mine, theirs = ours(data), with_httptools(data)
                    if (mine[0] == "refused") == (theirs[0] == "refused"):
                        continue
                    why = theirs[1] if theirs[0] == "refused" else mine[1]
                    group = groups.setdefault((mine[0], theirs[0], why), [0, data])
                    group[0] += 1
    return {
        "requests": total,
        "differ": sum(g[0] for g in groups.values()),
        "groups": [
            {
                "ours": k[0],
                "httptools": k[1],
                "why": k[2],
                "count": g[0],
                "example": g[1].decode("latin-1"),
            }
            for k, g in sorted(groups.items(), key=lambda kv: -kv[1][0])
        ],
    }


# ------------------------------------------------------------------ the timing

# A real connect cookie's length (211 characters), signature and all.
_COOKIE = (
    "studios-connect=eyJleHAiOjE3OTYxNTI0NzEuMTQwODEzNiwiaWF0IjoxNzk2MTUxODcxLjE0MDgxMzYsIm4iOiJ5"
    "NHNwcS14TkxNcDh5ZjBWIiwicCI6ImNvb2tpZSIsInNpZCI6ImY0YTNlMDAxIiwidWlkIjo3LCJ1biI6ImFsaWNlIn0."
    "OHS3CgFVYeLrW1qyiD_oDuwwrCi3k6-IyuAexJNVwIw; _xsrf=2|8c0e3f1a|4b7d2e9f0|1764547200"
)
CHROME_GET = (
    "GET /api/contents/analysis.ipynb?content=1 HTTP/1.1\r\n"
    f"Host: {SID}.studios.example.org\r\n"
    "Connection: keep-alive\r\n"
    'sec-ch-ua: "Google Chrome";v="131", "Chromium";v="131", "Not_A Brand";v="24"\r\n'
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36\r\n"
    "Accept: */*\r\n"
    "Sec-Fetch-Site: same-origin\r\n"
    "Sec-Fetch-Mode: cors\r\n"
    "Sec-Fetch-Dest: empty\r\n"
    "Accept-Encoding: gzip, deflate, br\r\n"
    "Accept-Language: en-US,en;q=0.9\r\n"
    f"Cookie: {_COOKIE}\r\n"
    "\r\n"
).encode()


def _time(fn: Callable[[], object], heads: int) -> dict[str, float]:
    rounds = [t / heads * 1e6 for t in timeit.repeat(fn, number=heads, repeat=5)]
    return {"best_us": round(min(rounds), 2), "median_us": round(statistics.median(rounds), 2)}


def timing(heads: int) -> dict[str, Any]:
    raw = CHROME_GET
    for name, fn in PARSERS.items():  # each must read it as one complete request
        assert fn(raw)[0] == "accepted", (name, fn(raw))

    def ours_head() -> None:
        end = raw.find(b"\r\n\r\n")
        _Client._framing(_parse_head(raw[: end + 4]))

    reused, proto = _httptools_parser()
    bare = httptools.HttpRequestParser(object())

    def h11_head() -> None:
        conn = h11.Connection(our_role=h11.SERVER)
        conn.receive_data(raw)
        conn.next_event()
        conn.next_event()

    result = {
        "ours (_parse_head + _framing)": _time(ours_head, heads),
        "httptools, header callbacks, parser reused": _time(lambda: reused.feed_data(raw), heads),
        "httptools, no callbacks (validation only)": _time(lambda: bare.feed_data(raw), heads),
        "h11, fresh Connection per head": _time(h11_head, heads),
    }
    assert proto.done >= heads
    anchor = result["httptools, header callbacks, parser reused"]["best_us"]
    return {
        "head_bytes": len(raw),
        "heads_per_round": heads,
        "anchor": f"{ANCHOR}, header callbacks, parser reused",
        "per_head": result,
        "best_vs_anchor": {k: round(v["best_us"] / anchor, 2) for k, v in result.items()},
    }


# ------------------------------------------------------------------ main


def main(heads: int) -> dict[str, Any]:
    table = cases()
    results = {cid: {name: fn(data) for name, fn in PARSERS.items()} for cid, data, _ in table}
    must = {cid: refuse for cid, _data, refuse in table}
    refused = {name: sum(r[name][0] == "refused" for r in results.values()) for name in PARSERS}
    # A must-refuse case a parser lets through (accepted) or waits on (a proxy built on it
    # would hold the connection until its head timeout, and a tool behind it might not).
    let_through = {
        name: [cid for cid, r in results.items() if must[cid] and r[name][0] != "refused"]
        for name in PARSERS
    }
    wrongly_refused = {
        name: [cid for cid, r in results.items() if not must[cid] and r[name][0] == "refused"]
        for name in PARSERS
    }
    disagree = [
        {
            "case": cid,
            "must_refuse": must[cid],
            **{
                name: f"{r[name][0]}: {r[name][1]}" if r[name][1] else r[name][0]
                for name in PARSERS
            },
        }
        for cid, r in results.items()
        if r["httptools"][0] != r["ours"][0] or r["h11"][0] != r["ours"][0]
    ]
    return {
        "date": "2026-12-01",
        "anchor": ANCHOR,
        "versions": {
            "python": sys.version.split()[0],
            "httptools": version("httptools"),
            "llhttp": "vendored in httptools (9.4.3 in httptools 0.9.0)",
            "h11": version("h11"),
            "httptools_lenient_flags": "none set (llhttp defaults: all strict)",
        },
        "cases": len(table),
        "must_refuse": sum(must.values()),
        "refused": refused,
        "let_through_a_must_refuse_case": let_through,
        "refused_a_valid_request": wrongly_refused,
        "disagreements_with_ours": disagree,
        "mutations_ours_vs_httptools": mutations(),
        "timing": timing(heads),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=10000, help="heads per timing round")
    args = parser.parse_args()
    print(json.dumps(main(args.heads), indent=2))
