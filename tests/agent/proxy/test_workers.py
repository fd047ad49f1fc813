"""Several connect-proxy processes on one port (`--proxy-workers`, SO_REUSEPORT).

The agent runs its own proxy and worker processes of its own on the same port; the
kernel spreads connections over them. What must hold whichever process a connection
lands on: a revoked user is refused everywhere once the revocation returns, a connect
token is exchanged once, who is connected is the union over the processes (the admin
`sessions` and the controller's `activeConnections`), a worker that dies is restarted
and its visits closed, no worker outlives a SIGKILLed agent, a malformed control
message does not take anything down, and a process of another uid cannot join the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent, AgentConfig
from agent.proxy.server import ConnectProxy, PortHeldError
from agent.proxy.workers import ACK_SECONDS
from studios_shared.connect_token import sign_connect_token
from tests.agent.proxy.raw_http import KeepAlive
from tests.agent.serve_args import AGENT_CLI, serve_args
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController, desired
from tests.integration import require

SID = "abcdef18"
ALICE, BOB = 7, 8
PROCESSES = 3  # the agent's proxy and two workers


@pytest.fixture(name="controller")
async def controller_fixture() -> AsyncIterator[FakeController]:
    fc = FakeController(visits=True)
    await fc.start()
    yield fc
    await fc.stop()


@pytest.fixture(name="agent_config")
def agent_config_fixture(tmp_path: Path, controller: FakeController) -> AgentConfig:
    return make_agent_config(tmp_path, controller, proxy_workers=PROCESSES)


@pytest.fixture
async def echo(controller: FakeController, agent: Agent) -> Agent:
    controller.push(desired(SID, image="test/echo:1"))
    await controller.wait_status(SID, pb.SESSION_STATUS_RUNNING)
    workers = agent.proxy_workers
    assert workers is not None
    # The workers learn of the running session within their state period.
    await controller.wait_for(lambda: _workers_know_running(agent), timeout=5)
    return agent


def _workers_know_running(agent: Agent) -> bool:
    workers = agent.proxy_workers
    assert workers is not None
    sessions = workers._state_message.get("sessions", {})
    return bool(sessions.get(SID, [""])[0] == "running")


def _cookie(key: bytes, user: int) -> str:
    return sign_connect_token(
        key,
        session_id=SID,
        user_id=user,
        user_name=f"user{user}",
        ttl_seconds=600,
        purpose="cookie",
    )


async def _open(port: int) -> KeepAlive:
    return await KeepAlive.open(port, SID, timeout=10)


async def _open_websockets(
    http: aiohttp.ClientSession, port: int, cookie: str, count: int
) -> list[aiohttp.ClientWebSocketResponse]:
    return [
        await http.ws_connect(
            f"http://127.0.0.1:{port}/ws",
            headers={"Host": f"{SID}.localhost", "Cookie": f"studios-connect={cookie}"},
        )
        for _ in range(count)
    ]


async def _open_many(port: int, cookie: str, count: int) -> list[KeepAlive]:
    async def one() -> KeepAlive:
        conn = await _open(port)
        head, _body = await conn.get("/headers", cookie)
        assert head.startswith(b"HTTP/1.1 200"), head
        return conn

    return list(await asyncio.gather(*(one() for _ in range(count))))


def _processes_holding(agent: Agent) -> int:
    """How many of the proxy processes hold client connections now."""
    assert agent.proxy is not None
    held = [len(agent.proxy._clients), *agent.proxy._remote_open.values()]
    return sum(1 for n in held if n)


def _accepted_by_workers(agent: Agent) -> int:
    assert agent.proxy is not None
    return sum(s.connections for s in agent.proxy._remote_stats.values())


async def _admin_connections(agent: Agent) -> dict[int, int]:
    listing = await agent._sessions()
    [entry] = [s for s in listing["sessions"] if s["id"] == SID]
    return {c["userId"]: c["connections"] for c in entry["connections"]}


async def _wait_connections(
    agent: Agent, controller: FakeController, want: dict[int, int], timeout: float = 5
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = await _admin_connections(agent)
        if got == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"connections {got}, expected {want}")
        await asyncio.sleep(0.1)


def _reported(controller: FakeController) -> pb.SessionConnections | None:
    mine = [m for m in controller.messages("connections") if m.session_id == SID]
    return mine[-1] if mine else None


async def test_connections_land_on_several_processes_and_are_counted_as_one(
    echo: Agent, controller: FakeController
) -> None:
    port = echo.proxy_port
    alice = await _open_many(port, _cookie(controller.key, ALICE), 30)
    bob = await _open_many(port, _cookie(controller.key, BOB), 12)
    try:
        # SO_REUSEPORT hashes each connection to one listener: 42 connections all on one
        # of three would be a broken setup (odds 3 * 3**-42 by chance).
        await controller.wait_for(lambda: _processes_holding(echo) >= 2, timeout=5)
        await _wait_connections(echo, controller, {ALICE: 30, BOB: 12})
        # The controller hears both users (the union over the processes).
        await controller.wait_for(
            lambda: (
                (r := _reported(controller)) is not None
                and {c.user_id for c in r.connections} == {ALICE, BOB}
            ),
            timeout=5,
        )
        assert {c.user_id for r in echo.proxy.all_connections() for c in r.connections} == {  # type: ignore[union-attr]
            ALICE,
            BOB,
        }
        for conn in alice[:10]:
            conn.close()
        await _wait_connections(echo, controller, {ALICE: 20, BOB: 12})
        # Metrics count every process's connections too.
        assert echo.proxy is not None
        await controller.wait_for(lambda: echo.proxy.open_connections == 32, timeout=5)  # type: ignore[union-attr]
        assert echo.proxy.total_stats().connections >= 42
    finally:
        for conn in alice + bob:
            conn.close()


async def test_a_revocation_holds_in_every_process_once_it_returns(
    echo: Agent, controller: FakeController
) -> None:
    port = echo.proxy_port
    alice_cookie, bob_cookie = _cookie(controller.key, ALICE), _cookie(controller.key, BOB)
    alice = await _open_many(port, alice_cookie, 15)
    bob = await _open_many(port, bob_cookie, 30)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        sockets = await _open_websockets(http, port, bob_cookie, 9)
        try:
            await controller.wait_for(lambda: _processes_holding(echo) >= 2, timeout=5)
            d = desired(SID, image="test/echo:1")
            d.access.user_ids.append(ALICE)
            assert echo.proxy_workers is not None
            started = time.monotonic()
            await echo.proxy_workers.apply_desired_access_and_wait(False, [d])
            assert time.monotonic() - started < ACK_SECONDS
            assert echo.proxy_workers.restarts == 0  # every worker acknowledged it
            # At once, in whichever process accepts it: Bob's cookie is 403.
            accepted = _accepted_by_workers(echo)
            fresh = [await _open(port) for _ in range(30)]
            for conn in fresh:
                head, body = await conn.get("/headers", bob_cookie)
                assert head.startswith(b"HTTP/1.1 403"), head
                assert b"may no longer use session" in body
                conn.close()
            # Some of those were answered by workers, not only by the agent's proxy.
            await controller.wait_for(lambda: _accepted_by_workers(echo) > accepted, timeout=3)
            # Every connection of Bob ends, keep-alives and WebSockets, in every process.
            for conn in bob:
                assert await conn.closed_within(3)
            for sock in sockets:
                msg = await asyncio.wait_for(sock.receive(), 3)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
            # Alice's all still work.
            for conn in alice:
                head, _body = await conn.get("/headers", alice_cookie)
                assert head.startswith(b"HTTP/1.1 200"), head
            await _wait_connections(echo, controller, {ALICE: 15})
            # The same through the controller's stream: Bob back in, then out again.
            d.access.user_ids.append(BOB)
            controller.push(d)
            back = await _open(port)
            for _ in range(50):
                head, _body = await back.get("/headers", bob_cookie)
                if head.startswith(b"HTTP/1.1 200"):
                    break
                back.close()
                await asyncio.sleep(0.1)
                back = await _open(port)
            assert head.startswith(b"HTTP/1.1 200"), head
            back.close()
        finally:
            for sock in sockets:
                await sock.close()
            for conn in alice + bob:
                conn.close()


async def test_the_controllers_access_change_holds_everywhere_before_the_link_goes_on(
    echo: Agent, controller: FakeController
) -> None:
    """An access change from the controller's stream is enforced by every proxy process
    before the agent acts on anything else of that message: with one worker frozen (it
    cannot acknowledge), the session's stop in the same message waits until that worker
    has been killed for not acknowledging, connections and all."""
    workers = echo.proxy_workers
    assert workers is not None
    frozen = next(w.process for w in workers.workers if w.process is not None)
    assert frozen is not None
    frozen.send_signal(signal.SIGSTOP)
    try:
        d = desired(SID, status=pb.DESIRED_STATUS_STOPPED, image="test/echo:1")
        d.access.user_ids.append(ALICE)
        controller.push(d)
        stopping = {pb.SESSION_STATUS_STOPPING, pb.SESSION_STATUS_STOPPED}
        await controller.wait_for(
            lambda: (obs := controller.latest(SID)) is not None and obs.status in stopping,
            timeout=ACK_SECONDS + 15,
        )
        # The stop began only once the frozen worker was dealt with.
        assert frozen.returncode is not None or not psutil.pid_exists(frozen.pid), (
            "the session's stop went ahead while a proxy worker had not applied the access list"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            frozen.send_signal(signal.SIGCONT)


async def test_a_connect_token_is_exchanged_once_across_processes(
    echo: Agent, controller: FakeController
) -> None:
    token = sign_connect_token(controller.key, session_id=SID, user_id=ALICE, user_name="user7")

    async def exchange() -> bytes:
        conn = await _open(echo.proxy_port)
        try:
            head, _body = await conn.get(f"/?studio-token={token}", None)
            return head.split(b"\r\n", 1)[0]
        finally:
            conn.close()

    lines = await asyncio.gather(*(exchange() for _ in range(30)))
    assert sorted(lines).count(b"HTTP/1.1 302 Found") == 1, lines
    assert all(line.startswith((b"HTTP/1.1 302", b"HTTP/1.1 401")) for line in lines), lines


async def test_a_worker_that_dies_is_restarted_and_its_visits_are_closed(
    echo: Agent, controller: FakeController
) -> None:
    workers = echo.proxy_workers
    proxy = echo.proxy
    assert workers is not None and proxy is not None
    conns = await _open_many(echo.proxy_port, _cookie(controller.key, ALICE), 30)
    try:
        # Every connection reported (a worker reports every REPORT_SECONDS), so that the
        # victim's count read below is all it holds.
        await controller.wait_for(
            lambda: (
                proxy.open_connections == 30
                and any(proxy._remote_open.get(w.name) for w in workers.workers)
            ),
            timeout=5,
        )
        victim = next(w for w in workers.workers if proxy._remote_open.get(w.name))
        on_victim = proxy._remote_open[victim.name]
        [visit_id] = list(victim.open_visits)
        old_pid = victim.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        # Its connections are gone, and no longer counted.
        await _wait_connections(echo, controller, {ALICE: 30 - on_victim})
        await controller.wait_for(
            lambda: [
                v for v in controller.messages("visit") if v.visit_id == visit_id and v.closed_at_ms
            ],
            timeout=5,
        )
        # Restarted under a new pid, and serving again: new connections work everywhere.
        await controller.wait_for(
            lambda: victim.pid != old_pid and victim.listening.is_set(), timeout=10
        )
        assert workers.restarts == 1
        more = await _open_many(echo.proxy_port, _cookie(controller.key, ALICE), 30)
        for conn in more:
            conn.close()
    finally:
        for conn in conns:
            conn.close()


async def test_malformed_control_messages_are_dropped_and_a_broken_stream_restarts_the_worker(
    echo: Agent, controller: FakeController
) -> None:
    workers = echo.proxy_workers
    assert workers is not None
    worker = workers.workers[0]
    assert worker.writer is not None
    pid = worker.pid
    frames = [
        b"not json",
        b"[1, 2]",
        b'{"t": "nosuch"}',
        b'{"t": "state", "sessions": {"x": [1, 2]}}',
        b'{"t": "state", "sessions": {}, "key": "%%%"}',
        b'{"t": "access", "id": 5, "access": {"x": ["alice"]}}',
        b'{"t": "nonce", "id": "x"}',
    ]
    for frame in frames:
        worker.writer.write(struct.pack(">I", len(frame)) + frame)
    # Still there, still obeying: an access list is acknowledged in time.
    d = desired(SID, image="test/echo:1")
    d.access.user_ids.append(ALICE)
    await asyncio.wait_for(workers.apply_desired_access_and_wait(False, [d]), 3)
    assert worker.pid == pid and workers.restarts == 0
    # The table the malformed state carried was not applied: the session still serves.
    conns = await _open_many(echo.proxy_port, _cookie(controller.key, ALICE), 12)
    for conn in conns:
        conn.close()
    # A frame too long to skip breaks the stream: that worker ends and is restarted,
    # the agent stays up.
    worker.writer.write(struct.pack(">I", 2**31))
    await controller.wait_for(lambda: workers.restarts == 1 and worker.listening.is_set(), 10)
    assert worker.pid != pid
    conns = await _open_many(echo.proxy_port, _cookie(controller.key, ALICE), 12)
    for conn in conns:
        conn.close()


def test_a_client_cannot_reach_the_control_channel(echo: Agent) -> None:
    """The channel is a socketpair: no path on disk, no port; the worker's only
    listening socket is the proxy port."""
    workers = echo.proxy_workers
    assert workers is not None
    for pid in workers.pids():
        process = psutil.Process(pid)
        listening = [
            c for c in process.net_connections(kind="all") if c.status == psutil.CONN_LISTEN
        ]
        assert [c.laddr[1] for c in listening if c.laddr] == [echo.proxy_port], listening
        unix = [c for c in process.net_connections(kind="unix")]
        assert all(not c.laddr for c in unix), unix  # unnamed: nobody can connect to it


# ------------------------------------------------------------ a real agent, SIGKILLed


async def test_no_worker_outlives_a_sigkilled_agent(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "state"
    agent = subprocess.Popen(
        [
            *AGENT_CLI,
            *serve_args(
                tmp_path,
                "--volume-kind",
                "directory",
                "--proxy",
                f"127.0.0.1:{port}",
                "--proxy-workers",
                "3",
            ),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "agent.log", "ab"),
    )
    try:
        deadline = time.monotonic() + 30
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline:
            workers = [
                p
                for p in psutil.Process(agent.pid).children()
                if "agent.proxy.worker" in " ".join(p.cmdline())
            ]
            if len(workers) == 2 and _listeners(port) == 3:
                break
            await asyncio.sleep(0.2)
        assert len(workers) == 2 and _listeners(port) == 3, (tmp_path / "agent.log").read_text()
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        _gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, alive
        # The port is free again: nothing of the agent holds it.
        with socket.socket() as again:
            again.bind(("127.0.0.1", port))
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        kill_leftover_tools(state)


def _listeners(port: int) -> int:
    return len(
        [
            c
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == port
        ]
    )


# ------------------------------------------------------------ the port itself

_HOLD = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as exc:
    print("refused", exc.errno, flush=True)
    sys.exit(0)
s.listen(8)
print("bound", flush=True)
time.sleep(60)
"""


# The venv's interpreter lives under /root, out of another user's reach; the rogue
# needs only the standard library.
ROGUE_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def _as_nobody(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [ROGUE_PYTHON, "-c", _HOLD, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        user=65534,
        group=65534,
    )


async def test_a_process_of_another_uid_cannot_share_the_port() -> None:
    """Linux joins a SO_REUSEPORT group only for sockets of the same effective uid: a
    process of another user can neither join the proxy's port (and take a share of its
    connections) nor have the proxy join its own."""
    require(os.geteuid() == 0, "needs root to run a process as another uid")
    proxy = ConnectProxy(lookup=lambda sid: None, key=lambda: None)
    port = await proxy.start("127.0.0.1", 0, reuse_port=True)
    try:
        rogue = _as_nobody(port)
        out, _ = rogue.communicate(timeout=30)
        assert out.split()[:2] == ["refused", "98"], out  # EADDRINUSE
    finally:
        await proxy.close()
    # The other way round: a port a rogue holds first is refused with a clear message,
    # and so is one held by anyone (a plain listener of our own uid).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rogue = _as_nobody(port)
    try:
        assert rogue.stdout is not None and rogue.stdout.readline().strip() == "bound"
        proxy = ConnectProxy(lookup=lambda sid: None, key=lambda: None)
        with pytest.raises(PortHeldError, match="already in use by another process"):
            await proxy.start("127.0.0.1", port, reuse_port=True)
        await proxy.close()
    finally:
        rogue.kill()
        rogue.wait()
    # A process of our own uid that set SO_REUSEPORT could join: the first bind checks
    # with a plain bind that nobody listens there at all.
    same_uid = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert same_uid.stdout is not None and same_uid.stdout.readline().strip() == "bound"
        proxy = ConnectProxy(lookup=lambda sid: None, key=lambda: None)
        with pytest.raises(PortHeldError, match="already in use by another process"):
            await proxy.start("127.0.0.1", port, reuse_port=True)
        await proxy.close()
    finally:
        same_uid.kill()
        same_uid.wait()
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen(1)
        proxy = ConnectProxy(lookup=lambda sid: None, key=lambda: None)
        with pytest.raises(PortHeldError):
            await proxy.start("127.0.0.1", plain.getsockname()[1], reuse_port=True)
        await proxy.close()


async def test_the_workers_stop_with_the_agent(echo: Agent, controller: FakeController) -> None:
    workers = echo.proxy_workers
    assert workers is not None
    pids = workers.pids()
    assert len(pids) == PROCESSES - 1
    conns = await _open_many(echo.proxy_port, _cookie(controller.key, ALICE), 30)
    try:
        await controller.wait_for(lambda: any(w.open_visits for w in workers.workers), 5)
        visit_ids = {v for w in workers.workers for v in w.open_visits}
        await workers.close()
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == (
                psutil.STATUS_ZOMBIE
            )
        # Their visits were closed on the way out, and reached the controller.
        await controller.wait_for(
            lambda: (
                visit_ids <= {v.visit_id for v in controller.messages("visit") if v.closed_at_ms}
            ),
            timeout=5,
        )
    finally:
        for conn in conns:
            conn.close()


async def test_the_agent_drops_malformed_messages_from_a_worker(
    echo: Agent, controller: FakeController
) -> None:
    """What a worker sends is checked too: nothing it says can take the agent down or
    count connections that are not there."""
    workers = echo.proxy_workers
    assert workers is not None and echo.proxy is not None
    reader = asyncio.StreamReader()
    for frame in [
        b"not json",
        b"[1]",
        b'"text"',
        b'{"no": "type"}',
        b'{"t": "activity", "sid": "x", "users": [[1, "a"]]}',
        b'{"t": "stats", "v": ["a"]}',
        b'{"t": "visit", "pb": "%%%"}',
        b'{"t": "visit", "pb": "AAAA"}',
        b'{"t": "nonce", "id": 1}',
        b'{"t": "ack", "id": "x"}',
        b'{"t": "nosuch"}',
    ]:
        reader.feed_data(struct.pack(">I", len(frame)) + frame)
    reader.feed_eof()
    await workers._read(workers.workers[0], reader)
    assert await _admin_connections(echo) == {}
    assert echo.proxy.active_users("x") == []


async def test_a_port_held_by_another_process_is_refused_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *AGENT_CLI,
            *serve_args(tmp_path, "--proxy", f"127.0.0.1:{port}", "--proxy-workers", "2"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert (
        f"studio-agent: --proxy: 127.0.0.1:{port} is already in use by another process"
        in err.decode()
    ), err
    assert b"Traceback" not in err


async def test_stopping_a_session_ends_its_connections_in_every_process(
    echo: Agent, controller: FakeController
) -> None:
    port = echo.proxy_port
    cookie = _cookie(controller.key, ALICE)
    conns = await _open_many(port, cookie, 30)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        sockets = await _open_websockets(http, port, cookie, 9)
        try:
            await controller.wait_for(lambda: _processes_holding(echo) >= 2, timeout=5)
            controller.push(desired(SID, status=pb.DESIRED_STATUS_STOPPED, image="test/echo:1"))
            for conn in conns:
                assert await conn.closed_within(5)
            for sock in sockets:
                msg = await asyncio.wait_for(sock.receive(), 5)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
            # Refused by every process from then on.
            for _ in range(30):
                conn = await _open(port)
                head, _body = await conn.get("/headers", cookie)
                assert head.startswith((b"HTTP/1.1 503", b"HTTP/1.1 404")), head
                conn.close()
            await _wait_connections(echo, controller, {})
        finally:
            for sock in sockets:
                await sock.close()
            for conn in conns:
                conn.close()
