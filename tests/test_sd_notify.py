"""systemd's notify protocol, spoken by the real daemons to a real datagram socket.

The test plays systemd: it binds a unix datagram socket, starts `studio-controller
serve` and `studio-agent serve` with NOTIFY_SOCKET and WATCHDOG_USEC pointing at it
(as systemd does for `Type=notify` with `WatchdogSec=`), and checks that READY=1
arrives only once the daemon serves, that WATCHDOG=1 keeps coming at half the
interval, that a stopped or blocked event loop stops the pings (so systemd would
restart the daemon), and STOPPING=1 on SIGTERM. The daemons also log JSON here
(`--log-format json`, STUDIOS_LOG_FORMAT=json): every line of their logs must parse.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from agent.state import StateDir
from studios_shared.sd_notify import Notifier
from tests.e2e_harness import AgentProcess, ControllerProcess, RestClient, free_port

# One ping every 0.5 s.
WATCHDOG_USEC = 1_000_000


class FakeSystemd:
    """A bound notify socket collecting (arrival time, assignments) of each datagram;
    `on_ready` runs in the receiving thread the moment READY=1 arrives."""

    def __init__(self, address: str, on_ready: Callable[[], object] | None = None) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self.on_ready = on_ready
        self.at_ready: object = None
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = data.decode().split("\n")
            if "READY=1" in lines and self.on_ready is not None:
                self.at_ready = self.on_ready()
            self.messages.append((time.monotonic(), lines))

    def environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def times(self, assignment: str, since: float = 0.0) -> list[float]:
        return [t for t, lines in list(self.messages) if assignment in lines and t >= since]

    def statuses(self) -> list[str]:
        return [
            line[len("STATUS=") :]
            for _, lines in list(self.messages)
            for line in lines
            if line.startswith("STATUS=")
        ]

    async def wait(self, assignment: str, timeout: float, alive: Callable[[], bool]) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.times(assignment)
            if found:
                return found[0]
            assert alive(), f"the daemon exited before {assignment}"
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {assignment} in {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _assert_json_log(path: Path) -> list[dict[str, str]]:
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)  # a line that is not one JSON object fails here
            assert {"time", "level", "logger", "message"} <= set(record), record
            records.append(record)
    assert records, f"{path} is empty"
    return records


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[str]:
    # AF_UNIX paths are limited to 107 bytes: pytest's directories can be longer.
    path = f"/tmp/studios-notify-{secrets.token_hex(6)}"
    yield path
    Path(path).unlink(missing_ok=True)


# ------------------------------------------------------------ the client alone


def test_messages_reach_a_path_and_an_abstract_socket(notify_path: str) -> None:
    for address in (notify_path, f"@studios-notify-{secrets.token_hex(6)}"):
        systemd = FakeSystemd(address)
        try:
            env = {**systemd.environment(), "KEEP": "1"}
            notifier = Notifier.from_environment(env)
            # Taken out of the environment: what the daemon starts cannot speak for it.
            assert env == {"KEEP": "1"}
            assert notifier.watchdog_interval() == 0.5
            assert notifier.ready("serving\nnow")
            assert notifier.status("serving now") is False  # unchanged: not sent again
            assert notifier.watchdog()
            assert notifier.stopping()
            deadline = time.monotonic() + 5
            while len(systemd.messages) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [lines for _, lines in systemd.messages] == [
                ["READY=1", "STATUS=serving now"],
                ["WATCHDOG=1"],
                ["STOPPING=1", "STATUS=stopping"],
            ]
        finally:
            systemd.close()


def test_without_systemd_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_interval() is None
    assert notifier.ready() is False and notifier.watchdog() is False
    # The watchdog is meant for another process (WATCHDOG_PID): no pings from this one.
    other = Notifier.from_environment(
        {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert other.enabled and other.watchdog_interval() is None


def test_an_unreachable_socket_is_reported_not_raised(notify_path: str) -> None:
    assert Notifier(notify_path).notify("READY=1") is False  # nothing bound there


async def test_a_blocked_event_loop_misses_its_pings(notify_path: str) -> None:
    systemd = FakeSystemd(notify_path)
    try:
        notifier = Notifier(notify_path, watchdog_usec=200_000)  # a ping every 0.1 s
        pinger = asyncio.create_task(notifier.watchdog_loop())
        await asyncio.sleep(0.5)
        blocked_at = time.monotonic()
        time.sleep(1.0)  # the loop is blocked, as by a handler that never yields
        unblocked_at = time.monotonic()
        await asyncio.sleep(0.5)
        pinger.cancel()
        pings = systemd.times("WATCHDOG=1")
        assert len([t for t in pings if t < blocked_at]) >= 3
        assert not [t for t in pings if blocked_at + 0.05 < t < unblocked_at]
        assert len([t for t in pings if t > unblocked_at]) >= 3
    finally:
        systemd.close()


# ------------------------------------------------------------ the real daemons


@pytest.mark.e2e
async def test_controller_ready_only_when_serving_then_watchdog(
    tmp_path: Path, notify_path: str
) -> None:
    controller: ControllerProcess | None = None

    def ports_answer() -> bool:
        assert controller is not None
        return all(
            _accepts(port)
            for port in (controller.http_port, controller.grpc_port, controller.grpc_agents_port)
        )

    systemd = FakeSystemd(notify_path, on_ready=ports_answer)
    controller = ControllerProcess(
        tmp_path / "controller",
        env=systemd.environment(),
        extra_args=["--log-format", "json"],
    )
    controller.start()
    try:
        ready = await systemd.wait("READY=1", 60, controller.alive)
        # The moment READY=1 arrived, HTTP and both gRPC endpoints accepted connections.
        assert systemd.at_ready is True
        assert systemd.statuses()[0].startswith("starting")
        assert any(s.startswith("serving: HTTP 127.0.0.1:") for s in systemd.statuses())
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"{controller.url}/studios/templates",
                headers={"Authorization": f"Bearer {controller.admin_token}"},
            ) as resp:
                assert resp.status == 200

        # WATCHDOG=1 keeps coming, every 0.5 s.
        await asyncio.sleep(2.0)

        # A stopped process (its event loop with it) misses its pings; systemd would
        # kill and restart it after WatchdogSec.
        assert controller.proc is not None
        controller.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await asyncio.sleep(1.6)
        resumed_at = time.monotonic()
        controller.proc.send_signal(signal.SIGCONT)
        pings = systemd.times("WATCHDOG=1")
        assert len([t for t in pings if ready < t < stopped_at]) >= 3
        assert not [t for t in pings if stopped_at + 0.1 < t < resumed_at]
        await asyncio.sleep(1.2)
        assert len(systemd.times("WATCHDOG=1", since=resumed_at)) >= 2

        controller.proc.send_signal(signal.SIGTERM)
        assert controller.proc.wait(timeout=30) == 0
        assert systemd.times("STOPPING=1")
        records = _assert_json_log(controller.log_path)
        assert any("listening" in r["message"] for r in records)
    finally:
        controller.stop()
        systemd.close()


async def _compute_env(controller: ControllerProcess, work: Path) -> str:
    api = RestClient(controller.url, controller.admin_token)
    try:
        return await api.create_compute_env("local", work)
    finally:
        await api.close()


@pytest.mark.e2e
async def test_agent_ready_once_serving_and_connected(tmp_path: Path, notify_path: str) -> None:
    controller = ControllerProcess(tmp_path / "controller")
    controller.start()
    agent: AgentProcess | None = None

    def serving() -> tuple[bool, bool]:
        assert agent is not None
        return _accepts(agent.proxy_port), StateDir(agent.state_dir).socket_path.is_socket()

    systemd = FakeSystemd(notify_path, on_ready=serving)
    try:
        await controller.wait_ready()
        compute_env = await _compute_env(controller, tmp_path / "work")
        metrics_port = free_port()
        agent = AgentProcess(
            controller,
            compute_env,
            tmp_path / "agent",
            env={**systemd.environment(), "STUDIOS_LOG_FORMAT": "json"},
            extra_args=["--metrics", str(metrics_port)],
        )
        agent.start()
        await systemd.wait("READY=1", 60, agent.alive)
        assert systemd.at_ready == (True, True)
        # Ready with the controller stream up: the status line and the metrics say so.
        status = agent.cli("status")
        assert status["controller"]["connected"] is True
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                assert resp.status == 200
                assert "studios_agent_controller_connected 1.0" in await resp.text()
        assert any("controller" in s and ": connected" in s for s in systemd.statuses())
        ready = systemd.times("READY=1")[0]
        await asyncio.sleep(1.6)
        assert len(systemd.times("WATCHDOG=1", since=ready)) >= 2
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=30) == 0
        assert systemd.times("STOPPING=1")
        _assert_json_log(agent.log_path)
    finally:
        if agent is not None:
            agent.stop()
        controller.stop()
        systemd.close()


@pytest.mark.e2e
async def test_agent_without_its_controller_is_ready_after_the_bounded_wait(
    tmp_path: Path, notify_path: str
) -> None:
    # Nothing listens at this controller's address, and its join token is no good yet (a
    # token file that is missing altogether stops the agent: tests/test_misconfiguration.py).
    absent = ControllerProcess(tmp_path / "absent", grpc_port=free_port())
    absent.data_dir.mkdir(parents=True)
    absent.agent_token_file.write_text("not-a-join-token-yet\n")
    systemd = FakeSystemd(notify_path, on_ready=lambda: None)
    agent = AgentProcess(absent, "0123456789abcdef", tmp_path / "agent", env=systemd.environment())
    started = time.monotonic()
    agent.start()
    try:
        ready = await systemd.wait("READY=1", 60, agent.alive)
        # Serving (the proxy answers) but not before the 15 s wait for the controller.
        assert 14 <= ready - started < 45
        assert _accepts(agent.proxy_port)
        assert any("not connected" in s for s in systemd.statuses())
        # Pinged all along, while waiting too.
        assert len(systemd.times("WATCHDOG=1", since=started)) >= 20
    finally:
        agent.stop()
        systemd.close()
