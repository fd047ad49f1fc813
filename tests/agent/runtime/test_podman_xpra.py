"""The project's Xpra desktop image (images/xpra, issue 15) in a podman session: a real agent
(fake controller) starts the catalogue's `studios/xpra:3.1-0.1`, Debian's Xpra 3.1.3 on an
Xvfb display with an xterm, behind the connect guard. Through the agent's real connect proxy
the HTML5 client's page and scripts are served and a WebSocket upgrade reaches Xpra (101,
Xpra's handshake); the published port refuses connections without the proxy's secret; every
process of the session runs as the image's non-root user.

Needs the image built (`studio-agent images build xpra`; scripts/podman-setup does).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.daemon import AgentConfig
from agent.runtime.tool_guard import NOT_FROM_PROXY
from tests.agent.runtime.image_sessions import (
    forged_headers,
    image_agent_config,
    start_image_session,
    stop_image_session,
)
from tests.agent.runtime.test_podman import (
    _agent,
    _containers,
    _podman,
)
from tests.agent.runtime.test_tool_secret import (
    _client,
    _cookie,
    _direct,
    _through_proxy,
)
from tests.agent_fixtures import controller_fixture  # noqa: F401
from tests.fake_controller import FakeController

# The catalogue's repository, as the controller sends it; podman finds it as the
# localhost/ reference images/xpra builds.
TEMPLATE = "studios/xpra:3.1-0.1"
BUILT = "localhost/studios/xpra:3.1-0.1"
SID = "1ab00003"


@pytest.fixture(name="xconfig")
def xconfig_fixture(tmp_path: Path, controller: FakeController) -> Iterator[AgentConfig]:
    with image_agent_config(tmp_path, controller, BUILT, "xpra") as config:
        yield config


async def _upgrade(port: int, headers: dict[str, str]) -> str:
    """The status line of the answer to a WebSocket upgrade of `/` (the HTML5 client's
    connection, with its `binary` subprotocol), sent raw so that any answer is seen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        head = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Protocol": "binary",
            **headers,
        }
        lines = ["GET / HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        return answer.decode("latin-1")
    finally:
        writer.close()


async def test_xpra_image_serves_its_html5_client_through_the_proxy_as_studio(
    controller: FakeController, xconfig: AgentConfig
) -> None:
    async with _agent(xconfig) as agent, _client() as http:
        h = await start_image_session(controller, xconfig, SID, TEMPLATE, "xpra")

        # The HTML5 client through the proxy: its page, its own script and jQuery (a symlink
        # into libjs-jquery, which the image installs by hand).
        for path in ("/", "/index.html"):
            status, page = await _through_proxy(http, agent, controller.key, SID, "GET", path)
            assert status == 200, (path, page[:300])
            assert "<title>xpra websockets client</title>" in page and "js/Client.js" in page
        for path in ("/js/Client.js", "/js/lib/jquery.js"):
            status, script = await _through_proxy(http, agent, controller.key, SID, "GET", path)
            assert status == 200 and len(script) > 10_000, (path, status)
        assert (
            "XpraClient"
            in (await _through_proxy(http, agent, controller.key, SID, "GET", "/js/Client.js"))[1]
        )

        # A WebSocket upgrade through the proxy is Xpra's handshake: 101 with `binary`.
        answer = await _upgrade(
            agent.proxy_port,
            {
                "Host": f"{SID}.localhost:{agent.proxy_port}",
                "Cookie": f"studios-connect={_cookie(controller.key, SID)}",
            },
        )
        status_line, _, rest = answer.partition("\r\n")
        assert status_line.startswith("HTTP/1.1 101"), answer
        assert "sec-websocket-protocol: binary" in rest.lower(), answer

        # The published port without the proxy's secret (or with a wrong one): 403, for
        # the page and for the upgrade.
        for headers in forged_headers(h):
            for path in ("/", "/index.html", "/js/Client.js"):
                status, body = await _direct(http, h.port, "GET", path, headers)
                assert status == 403 and NOT_FROM_PROXY in body, (path, status, body)
            direct = await _upgrade(h.port, {"Host": f"127.0.0.1:{h.port}", **headers})
            assert direct.startswith("HTTP/1.1 403"), direct

        # No process of the session is root (guard, Xpra, Xvfb, the xterm and its shell),
        # on the host's view of the container.
        [container] = _containers(SID)
        inspect = json.loads(_podman("inspect", str(container["Id"])).stdout)[0]
        tool = psutil.Process(int(inspect["State"]["Pid"]))
        procs = [tool, *tool.children(recursive=True)]
        names = " ".join(" ".join(p.cmdline()) for p in procs)
        assert "Xvfb" in names and "xterm" in names and "connect_guard" in names, names
        for proc in procs:
            assert proc.uids().real == 1000 and proc.uids().effective == 1000, proc.cmdline()
        assert h.proxy_secret not in names

        await stop_image_session(controller, SID)
