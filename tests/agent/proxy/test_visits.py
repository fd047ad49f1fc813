"""The connection audit in the proxy: one visit per (session, user, client address), from
the first bound connection to the last one's close plus a short grace, reported when it
opens and when it closes; and the agent's outbox that keeps visits until they are acked.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.proxy import ConnectProxy
from agent.proxy.audit import VisitOutbox
from studios_shared.connect_token import sign_connect_token
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    agent_fixture,
    controller_fixture,
    proxy_in_front_of,
)
from tests.fake_controller import FakeController, desired

KEY = b"v" * 32
SID = "face0001"
ALICE, BOB = 7, 8


async def _tool() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    return app


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ConnectProxy, int, list[pb.ConnectionVisit]]]:
    events: list[pb.ConnectionVisit] = []
    async with proxy_in_front_of(await _tool(), SID, KEY) as (p, port, _handle):
        p.on_visit = events.append
        p.visit_grace_seconds = 0.5
        yield p, port, events


def _cookie(user_id: int, sid: str = SID, key: bytes = KEY) -> str:
    return sign_connect_token(
        key,
        session_id=sid,
        user_id=user_id,
        user_name=f"user{user_id}",
        ttl_seconds=600,
        purpose="cookie",
    )


class _KeepAlive:
    """One raw HTTP/1.1 connection, kept open between requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _KeepAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(
        self, user_id: int, sid: str = SID, key: bytes = KEY, path: str = "/hello"
    ) -> bytes:
        self.writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {sid}.localhost\r\n"
                f"Cookie: studios-connect={_cookie(user_id, sid, key)}\r\n\r\n"
            ).encode()
        )
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(self.reader.readexactly(length), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        return body

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def _until(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_two_keepalives_of_one_user_are_one_visit_reported_open_then_closed(
    proxy: tuple[ConnectProxy, int, list[pb.ConnectionVisit]],
) -> None:
    p, port, events = proxy
    before = time.time()
    first, second = await _KeepAlive.open(port), await _KeepAlive.open(port)
    assert await first.get(ALICE) == b"hello"
    assert await second.get(ALICE) == b"hello"
    assert await first.get(ALICE) == b"hello"
    (opened,) = events
    assert opened.session_id == SID
    assert (opened.user_id, opened.user_name) == (ALICE, "user7")
    assert opened.client_address == "127.0.0.1"
    assert len(opened.visit_id) == 32
    assert opened.proxy_instance_id == p.instance_id
    assert before * 1000 - 1 <= opened.opened_at_ms <= time.time() * 1000 + 1
    assert opened.closed_at_ms == 0
    assert [v.visit_id for v in p.open_visits()] == [opened.visit_id]

    await first.close()
    await asyncio.sleep(1.5)  # past the grace and a sweep: the other connection holds it
    assert len(events) == 1
    await second.close()
    last_close = time.time()
    await _until(lambda: len(events) == 2)
    closed = events[1]
    assert closed.visit_id == opened.visit_id
    assert closed.opened_at_ms == opened.opened_at_ms
    # The time the last connection closed, not when the grace ran out.
    assert opened.opened_at_ms <= closed.closed_at_ms <= last_close * 1000 + 100
    assert (closed.user_id, closed.client_address) == (ALICE, "127.0.0.1")
    assert p.open_visits() == []


async def test_users_have_visits_of_their_own_and_a_quick_reconnect_continues_one(
    proxy: tuple[ConnectProxy, int, list[pb.ConnectionVisit]],
) -> None:
    p, port, events = proxy
    p.visit_grace_seconds = 3.0
    alice, bob = await _KeepAlive.open(port), await _KeepAlive.open(port)
    await alice.get(ALICE)
    await bob.get(BOB)
    assert sorted(e.user_id for e in events) == [ALICE, BOB]
    alice_visit = next(e.visit_id for e in events if e.user_id == ALICE)

    # A reload: the connection closes and another opens within the grace.
    await alice.close()
    await asyncio.sleep(0.3)
    again = await _KeepAlive.open(port)
    await again.get(ALICE)
    await asyncio.sleep(3.5)
    assert len(events) == 2, events  # no close, no new visit
    await again.close()
    await _until(lambda: len(events) == 3, timeout=6)
    assert (events[2].visit_id, events[2].user_id) == (alice_visit, ALICE)
    assert events[2].closed_at_ms > 0

    # The proxy closing ends the visits still open, at once.
    await p.close()
    bob_closed = [e for e in events if e.user_id == BOB and e.closed_at_ms]
    assert len(bob_closed) == 1
    await bob.close()


async def test_a_refused_request_is_no_visit(
    proxy: tuple[ConnectProxy, int, list[pb.ConnectionVisit]],
) -> None:
    _p, port, events = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /hello HTTP/1.1\r\nHost: {SID}.localhost\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 401")
    writer.close()
    await asyncio.sleep(0.2)
    assert events == []


# ---------------------------------------------------------------- the agent


async def test_the_agent_keeps_visits_until_a_controller_that_takes_them_acks_them(
    controller: FakeController, agent: Agent
) -> None:
    echo = "abcdef02"
    controller.push(desired(echo, image="test/echo:1"))
    await controller.wait_status(echo, pb.SESSION_STATUS_RUNNING)
    assert agent.proxy is not None and agent.link is not None
    proxy, link = agent.proxy, agent.link
    proxy.visit_grace_seconds = 0.2
    hello = controller.messages("hello")[-1]
    assert hello.proxy_instance_id == proxy.instance_id

    # A controller older than the audit: the visit waits in the outbox, open then closed.
    conn = await _KeepAlive.open(agent.proxy_port)
    await conn.get(ALICE, echo, controller.key, "/headers")
    await _until(lambda: len(link.visits) == 1)
    await conn.close()
    await _until(lambda: [v.closed_at_ms > 0 for v in link.visits.pending()] == [True])
    assert controller.messages("visit") == []
    (held,) = link.visits.pending()
    assert (held.session_id, held.user_id, held.client_address) == (echo, ALICE, "127.0.0.1")
    outbox = agent.config.state_dir / "visits"
    assert [p.name for p in outbox.iterdir()] == [f"{held.visit_id}.pb"]

    # It comes back taking visits: the held copy goes after the inventory, and its ack
    # empties the outbox.
    port, streams = controller.port, controller.streams
    await controller.stop()
    await controller.wait_for(lambda: not link.connected, timeout=10)
    controller.visits = True
    await controller.start(port)
    await controller.wait_for(lambda: controller.messages("visit"), timeout=15)
    (sent,) = controller.messages("visit")
    assert sent == held
    kinds = [m.WhichOneof("message") for s, m in controller.received if s > streams]
    assert kinds.index("inventory") < kinds.index("visit")
    await _until(lambda: len(link.visits) == 0)
    assert list(outbox.iterdir()) == []

    # Live now: a new visit is sent at its open and at its close.
    conn = await _KeepAlive.open(agent.proxy_port)
    await conn.get(BOB, echo, controller.key, "/headers")
    await conn.close()
    await controller.wait_for(lambda: len(controller.messages("visit")) == 3, timeout=10)
    opened, closed = controller.messages("visit")[1:]
    assert opened.visit_id == closed.visit_id and opened.user_id == BOB
    assert (opened.closed_at_ms == 0) and closed.closed_at_ms >= opened.opened_at_ms
    await _until(lambda: len(link.visits) == 0)
    assert link.status()["connectionVisits"] == {"pending": 0, "dropped": 0}


# ---------------------------------------------------------------- the outbox


def _visit(visit_id: str, closed_at_ms: int = 0) -> pb.ConnectionVisit:
    return pb.ConnectionVisit(
        visit_id=visit_id,
        session_id=SID,
        user_id=ALICE,
        user_name="alice",
        client_address="127.0.0.1",
        opened_at_ms=1_700_000_000_000,
        closed_at_ms=closed_at_ms,
        proxy_instance_id="i" * 32,
    )


def test_the_outbox_keeps_the_newest_copy_until_that_copy_is_acked(tmp_path: Path) -> None:
    directory = tmp_path / "visits"
    box = VisitOutbox(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    a, b = "a" * 32, "b" * 32
    assert box.add(_visit(a))
    assert box.add(_visit(b))
    assert box.add(_visit(a, closed_at_ms=1_700_000_060_000))  # the close replaces the open
    assert [(v.visit_id, v.closed_at_ms) for v in box.pending()] == [
        (a, 1_700_000_060_000),
        (b, 0),
    ]
    assert stat.S_IMODE((directory / f"{a}.pb").stat().st_mode) == 0o600

    # The open's ack arrives late: the close is still held for its own ack.
    assert not box.ack(a, 0)
    assert box.get(a) is not None
    assert box.ack(a, 1_700_000_060_000)
    assert box.get(a) is None and not (directory / f"{a}.pb").exists()

    # An agent restart finds what is left; a torn temporary file and strangers go.
    (directory / f".{b}.pb.xyz").write_bytes(b"torn")
    (directory / ("c" * 32 + ".pb")).write_bytes(b"\xff\xff not a message")
    again = VisitOutbox(directory)
    assert [v.visit_id for v in again.pending()] == [b]
    assert sorted(os.listdir(directory)) == [f"{b}.pb"]


def test_the_outbox_is_bounded(tmp_path: Path) -> None:
    box = VisitOutbox(tmp_path / "visits", limit=2)
    assert box.add(_visit("1" * 32)) and box.add(_visit("2" * 32))
    assert not box.add(_visit("3" * 32))
    assert box.dropped == 1
    # The close of a visit it holds still replaces the open.
    assert box.add(_visit("1" * 32, closed_at_ms=1_700_000_001_000))
    assert len(box) == 2
    assert not box.add(_visit("not hex"))
