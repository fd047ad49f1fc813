"""The connect proxy against misbehaving tools, big responses and many idle WebSockets.

The proxy runs on its own here, in front of an aiohttp tool of the test's making."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.proxy import ConnectProxy
from studios_shared.connect_token import sign_connect_token
from tests.agent_fixtures import proxy_in_front_of
from tests.bench import bench_proxy_idle_ws as bench

KEY = b"k" * 32
SID = "feed0001"


async def _tool_app() -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text="late")

    async def early_close(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def huge(request: web.Request) -> web.StreamResponse:
        size = int(request.query["mib"]) << 20
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        block = b"y" * (1 << 20)
        for _ in range(size >> 20):
            await resp.write(block)
        await resp.write_eof()
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(msg.data)
        return sock

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/early-close", early_close)
    app.router.add_get("/huge", huge)
    app.router.add_get("/ws", ws)
    return app


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ConnectProxy, int, Any]]:
    async with proxy_in_front_of(await _tool_app(), SID, KEY) as (p, port, handle):
        yield p, port, handle


def _headers(user_id: int = 7) -> dict[str, str]:
    cookie = sign_connect_token(
        KEY,
        session_id=SID,
        user_id=user_id,
        user_name=f"user{user_id}",
        ttl_seconds=600,
        purpose="cookie",
    )
    return {"Host": f"{SID}.localhost", "Cookie": f"studios-connect={cookie}"}


async def test_slow_early_closing_and_huge_responses(
    proxy: tuple[ConnectProxy, int, Any],
) -> None:
    _p, port, _h = proxy
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/slow?s=2", headers=_headers()) as resp:
            assert resp.status == 200 and await resp.text() == "late"
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(f"{base}/early-close", headers=_headers()) as resp:
                assert resp.status == 200
                await resp.read()
        # 256 MiB through the proxy, read slowly at first: flow control keeps the
        # proxy's memory bounded (nothing like the body is buffered).
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        async with http.get(f"{base}/huge?mib=256", headers=_headers()) as resp:
            assert resp.status == 200
            total = 0
            async for chunk in resp.content.iter_any():
                if total < (8 << 20):
                    await asyncio.sleep(0.01)
                total += len(chunk)
        assert total == 256 << 20
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown_kib < 64 * 1024, grown_kib
        # The connection still works afterwards.
        async with http.get(f"{base}/slow?s=0", headers=_headers()) as resp:
            assert await resp.text() == "late"


async def test_many_idle_websockets_and_nothing_left_after(
    proxy: tuple[ConnectProxy, int, Any],
) -> None:
    p, port, handle = proxy
    # Each WebSocket takes four descriptors in this one process (client, proxy both
    # sides, tool); the test below holds ~10,000 with the clients and the tool in
    # processes of their own.
    n = int(os.environ.get("STUDIOS_TEST_IDLE_WEBSOCKETS", "1000")) // 10 * 10
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        sockets = []
        for i in range(n):
            sockets.append(
                await http.ws_connect(f"http://127.0.0.1:{port}/ws", headers=_headers(i % 10))
            )
        await sockets[-1].send_str("hi")
        assert (await sockets[-1].receive()).data == "hi"
        listed = {c["userId"]: c["connections"] for c in p.connections(SID)}
        assert listed == {u: n // 10 for u in range(10)}
        assert len(p._clients) == n
        # Memory per idle WebSocket (client, proxy and tool sides together) stays small.
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown_kib / n < 100, grown_kib / n
        for sock in sockets[: n // 2]:
            await sock.close()
        for _ in range(50):
            if len(p._clients) == n - n // 2:
                break
            await asyncio.sleep(0.1)
        assert len(p._clients) == n - n // 2
        # Revocation: the session stops; the other half is ended by the proxy.
        handle.status = "stopped"
        for sock in sockets[n // 2 :]:
            msg = await asyncio.wait_for(sock.receive(), 10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    for _ in range(50):
        if not p._clients:
            break
        await asyncio.sleep(0.1)
    assert not p._clients
    assert p.connections(SID) == []
    assert not p._activity
    gc.collect()


async def test_ten_thousand_idle_websockets_with_clients_and_tool_in_their_own_processes() -> None:
    """As many idle WebSockets as this process's descriptors allow, up to 10,000 (two per
    WebSocket here: the clients and the tool are other processes): all held, memory per
    connection bounded, and after they close the descriptors, the connection table and
    the Python heap are back at their baseline."""
    limit = bench.raise_fd_limit(20064)
    n = min(
        int(os.environ.get("STUDIOS_TEST_IDLE_WEBSOCKETS_SPLIT", "10000")),
        bench.max_websockets(limit, reserve=bench.fd_count() + 64),
    )
    tool = bench.Child("upstream")
    clients: bench.Child | None = None
    p: ConnectProxy | None = None
    try:
        tool_port = int((await asyncio.to_thread(tool.line)).split()[1])
        handle = SimpleNamespace(
            status="running", port=tool_port, proxy_secret="", session_id=bench.SID
        )
        p = ConnectProxy(
            lookup=lambda sid: handle if sid == bench.SID else None, key=lambda: bench.KEY
        )
        port = await p.start("127.0.0.1", 0)
        await asyncio.sleep(0.2)
        gc.collect()
        fds, blocks, rss = bench.fd_count(), sys.getallocatedblocks(), bench.rss_kib()

        clients = bench.Child("clients", str(port), str(n), bench.cookie_for())
        opened = await asyncio.wait_for(asyncio.to_thread(clients.line), 120)
        assert opened.split()[:2] == ["OPEN", str(n)], opened
        assert len(p._clients) == n
        assert [c["connections"] for c in p.connections(bench.SID)] == [n]
        # Two per WebSocket (and the two pipes to the clients' process).
        assert 2 * n <= bench.fd_count() - fds <= 2 * n + 4
        grown_kib = bench.rss_kib() - rss
        assert grown_kib / n < 20, grown_kib / n  # ~5 KiB measured
        pong = await asyncio.wait_for(asyncio.to_thread(clients.line, "ping"), 30)
        assert pong == "PONG 100", pong

        closed = await asyncio.wait_for(asyncio.to_thread(clients.line, "close"), 60)
        assert closed.startswith("CLOSED"), closed
        await asyncio.to_thread(clients.stop)  # its two pipes are not the proxy's
        await _until(lambda: not p._clients and bench.fd_count() <= fds, 10)
        assert not p._clients
        assert bench.fd_count() <= fds, os.listdir("/proc/self/fd")
        p.active_seconds = 0  # users who left are forgotten at the next sweep
        await _until(lambda: not p._activity, 5)
        assert not p._activity and p.connections(bench.SID) == []
        gc.collect()
        leftover = sys.getallocatedblocks() - blocks
        assert leftover < n, leftover  # not one object per connection left behind
    finally:
        if clients is not None:
            await asyncio.to_thread(clients.stop)
        if p is not None:
            await p.close()
        await asyncio.to_thread(tool.stop)


async def _until(check: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 1):
        if check() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)
