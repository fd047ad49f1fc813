"""Sessions in their own network namespace (issue 13), with real podman: from inside one
session's container, another session's tool and the host's loopback services are refused,
while the container's own tool answers, outbound traffic leaves, and the proxy's path
(127.0.0.1:<tool port> on the host) answers; an agent restart re-adopts an isolated session,
and a stop, or the reaper, removes its network."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import AgentConfig
from agent.runtime.podman import LABEL_GENERATION, LABEL_OWNER, LABEL_SESSION
from tests.agent.runtime.test_podman import (
    IMAGE,
    RUNNING,
    STOPPED,
    _agent,
    _cleanup,
    _config,
    _containers,
    _get,
    _podman,
    _require_podman,
)
from tests.agent_fixtures import controller_fixture  # noqa: F401
from tests.fake_controller import FakeController, desired

BUSYBOX = "/bin/busybox"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"host service\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _http_server(host: str) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((host, 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _host_address() -> str | None:
    """The first IPv4 address of a non-loopback interface of this host, if any."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1] != "lo":
            return fields[3].split("/")[0]
    return None


def _wget(cid: str, url: str) -> subprocess.CompletedProcess[str]:
    """busybox wget from inside the container, by path and bounded by busybox timeout
    (its own -T crashes on this build)."""
    return _podman("exec", cid, BUSYBOX, "timeout", "5", BUSYBOX, "wget", "-O", "-", url)


def _refused(out: subprocess.CompletedProcess[str]) -> bool:
    return out.returncode != 0 and "Connection refused" in out.stderr


def _inspect(cid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_podman("inspect", cid).stdout)[0]
    return data


def _ip_and_gateway(cid: str) -> tuple[str, str]:
    networks = _inspect(cid)["NetworkSettings"]["Networks"]
    [net] = networks.values()
    return str(net["IPAddress"]), str(net["Gateway"])


def _network_exists(name: str) -> bool:
    return _podman("network", "exists", name).returncode == 0


@pytest.fixture(name="pconfig")
def pconfig_fixture(tmp_path: Path, controller: FakeController) -> Iterator[AgentConfig]:
    _require_podman()
    config = _config(tmp_path, controller)
    yield config
    _cleanup(config.state_dir)


async def _two_sessions(controller: FakeController) -> tuple[pb.SessionObserved, ...]:
    controller.push(desired("dddd000a", image=IMAGE))
    controller.push(desired("dddd000b", image=IMAGE))
    a = await controller.wait_status("dddd000a", RUNNING, timeout=60)
    b = await controller.wait_status("dddd000b", RUNNING, timeout=60)
    return a, b


async def test_a_session_reaches_its_own_tool_and_nothing_on_the_host_or_of_others(
    controller: FakeController, pconfig: AgentConfig
) -> None:
    assert pconfig.podman_network == "bridge"  # the default
    with _http_server("127.0.0.1") as loopback_port:
        async with _agent(pconfig):
            a, b = await _two_sessions(controller)
            [ca] = _containers("dddd000a")
            [cb] = _containers("dddd000b")
            cid_a, cid_b = str(ca["Id"]), str(cb["Id"])
            # The proxy's path: the host's 127.0.0.1:<tool port> answers, for both.
            assert _get(a.tool_port) == b"studios busybox httpd\n"
            assert _get(b.tool_port) == b"studios busybox httpd\n"
            # Inside A, its own tool answers on its port ($CONNECT_TOOL_PORT).
            own = _wget(cid_a, f"http://127.0.0.1:{a.tool_port}/")
            assert own.returncode == 0 and own.stdout == "studios busybox httpd\n", own.stderr
            # B's published port, on what A calls 127.0.0.1: refused (A's own loopback).
            assert _refused(_wget(cid_a, f"http://127.0.0.1:{b.tool_port}/"))
            # The host's loopback service: refused on 127.0.0.1 and on the host's address
            # on A's bridge (the gateway).
            b_ip, _ = _ip_and_gateway(cid_b)
            a_ip, a_gateway = _ip_and_gateway(cid_a)
            assert _refused(_wget(cid_a, f"http://127.0.0.1:{loopback_port}/"))
            assert _refused(_wget(cid_a, f"http://{a_gateway}:{loopback_port}/"))
            # B's published port on the host's address on A's bridge: refused too.
            assert _refused(_wget(cid_a, f"http://{a_gateway}:{b.tool_port}/"))
            # B's container itself, on its own bridge: no route through the isolation.
            assert a_ip != b_ip
            direct = _wget(cid_a, f"http://{b_ip}:{b.tool_port}/")
            assert direct.returncode != 0 and "studios busybox httpd" not in direct.stdout
            # and the other way round.
            assert _refused(_wget(cid_b, f"http://127.0.0.1:{a.tool_port}/"))
            back = _wget(cid_b, f"http://{a_ip}:{a.tool_port}/")
            assert back.returncode != 0 and "studios busybox httpd" not in back.stdout
            # No raw frames (netavark turns route_localnet on for the bridge).
            caps = set(_inspect(cid_a)["EffectiveCaps"])
            assert "CAP_NET_RAW" not in caps and "CAP_NET_ADMIN" not in caps
            # Each session on a network of its own, labelled with the session.
            networks = _inspect(cid_a)["NetworkSettings"]["Networks"]
            assert list(networks) == ["studios-dddd000a"]


async def test_outbound_traffic_leaves_the_session(
    controller: FakeController, pconfig: AgentConfig
) -> None:
    address = _host_address()
    if address is None:
        pytest.skip("this host has no IPv4 address outside loopback to serve outbound tests on")
    with _http_server(address) as port:
        async with _agent(pconfig):
            controller.push(desired("dddd000c", image=IMAGE))
            await controller.wait_status("dddd000c", RUNNING, timeout=60)
            [c] = _containers("dddd000c")
            out = _wget(str(c["Id"]), f"http://{address}:{port}/")
            assert out.returncode == 0 and out.stdout == "host service\n", out.stderr


async def test_agent_restart_readopts_an_isolated_session_and_a_stop_removes_its_network(
    controller: FakeController, pconfig: AgentConfig
) -> None:
    async with _agent(pconfig):
        controller.push(desired("dddd000d", image=IMAGE))
        obs = await controller.wait_status("dddd000d", RUNNING, timeout=60)
    [before] = _containers("dddd000d")
    assert _get(obs.tool_port) and _network_exists("studios-dddd000d")
    async with _agent(pconfig):
        await controller.wait_for(lambda: len(controller.messages("inventory")) >= 2)
        [sess] = [
            s for s in controller.messages("inventory")[-1].sessions if s.session_id == "dddd000d"
        ]
        assert sess.status == RUNNING and sess.tool_port == obs.tool_port
        controller.push(desired("dddd000d", image=IMAGE), full=True)
        await asyncio.sleep(1.5)
        [after] = _containers("dddd000d")
        assert after["Id"] == before["Id"] and _get(obs.tool_port)
        assert _refused(_wget(str(after["Id"]), f"http://127.0.0.1:{obs.tool_port + 1}/"))
        latest = controller.latest("dddd000d")
        assert latest is not None and latest.status == RUNNING

        controller.push(desired("dddd000d", status=pb.DESIRED_STATUS_STOPPED))
        await controller.wait_status("dddd000d", STOPPED, timeout=60)
        assert _containers("dddd000d") == [] and not _network_exists("studios-dddd000d")


async def test_reaper_removes_a_network_left_without_its_container(
    controller: FakeController, pconfig: AgentConfig
) -> None:
    async with _agent(pconfig) as agent:
        owner = agent.agent_id
        name = "studios-dddd000e"
        made = _podman(
            "network",
            "create",
            "--opt",
            "isolate=true",
            "--label",
            f"{LABEL_SESSION}=dddd000e",
            "--label",
            f"{LABEL_GENERATION}=3",
            "--label",
            f"{LABEL_OWNER}={owner}",
            name,
        )
        assert made.returncode == 0, made.stderr
        assert agent.manager is not None
        # The agent's own reaping tick may come first: either way it is reaped, and listed.
        await agent.manager.reap()
        assert not _network_exists(name)
        reaped = agent.manager.reaped
        assert any(
            r["sessionId"] == "dddd000e" and r["what"] == f"network {name} (no container)"
            for r in reaped
        ), reaped
