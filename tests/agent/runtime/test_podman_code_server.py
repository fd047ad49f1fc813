"""The project's code-server image (images/code-server, issue 15) in a podman session: a real
agent (fake controller) starts the catalogue's `studios/code-server:4.139-0.1` on an xfs-loop
volume; VS Code in the browser answers through the agent's real connect proxy (code-server's
`/healthz` and the workbench page), the connect guard in front of it refuses requests to the
published port that lack the proxy's secret, and every process of the session runs as the
image's non-root user, without the secret in its environment.

Needs the image built (`studio-agent images build code-server`; scripts/podman-setup does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import aiohttp
import psutil
import pytest

from agent.daemon import AgentConfig
from agent.runtime.tool_guard import NOT_FROM_PROXY, PROXY_SECRET_ENV
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

# The catalogue's repository, as the controller sends it: podman finds it as
# localhost/studios/code-server:4.139-0.1, the reference images/code-server builds.
TEMPLATE = "studios/code-server:4.139-0.1"
BUILT = "localhost/studios/code-server:4.139-0.1"
SID = "c0de0001"
# In every workbench page code-server serves: the configuration the web workbench reads.
WORKBENCH_MARK = "vscode-workbench-web-configuration"


@pytest.fixture(name="cconfig")
def cconfig_fixture(tmp_path: Path, controller: FakeController) -> Iterator[AgentConfig]:
    with image_agent_config(tmp_path, controller, BUILT, "code-server") as config:
        yield config


async def test_code_server_image_answers_through_the_proxy_as_studio(
    controller: FakeController, cconfig: AgentConfig
) -> None:
    async with _agent(cconfig) as agent, _client() as http:
        h = await start_image_session(controller, cconfig, SID, TEMPLATE, "vscode")

        # code-server's health endpoint through the proxy.
        status, text = await _through_proxy(http, agent, controller.key, SID, "GET", "/healthz")
        assert status == 200 and json.loads(text)["status"] in ("alive", "expired"), text

        # The workbench page: `/` (code-server may first redirect it to the folder it
        # opens, /workspace), through the proxy.
        path = "/"
        for _ in range(3):
            status, location, page = await _get(http, agent.proxy_port, controller.key, path)
            if not location:
                break
            path = urljoin(path, location)
        assert status == 200 and WORKBENCH_MARK in page, (status, path, page[:500])

        # The published port without the proxy's secret (or with a wrong one): 403 from the
        # guard, for the page, the health check and the workbench's WebSocket path alike.
        for headers in forged_headers(h):
            for method, p in (("GET", "/"), ("GET", "/healthz"), ("POST", "/logout")):
                status, body = await _direct(http, h.port, method, p, headers)
                assert status == 403 and NOT_FROM_PROXY in body, (method, p, status, body)

        # Every process of the container runs as the image's user (1000), not root, and
        # none has the proxy's secret in its environment or command line.
        [container] = _containers(SID)
        inspect = json.loads(_podman("inspect", str(container["Id"])).stdout)[0]
        top = psutil.Process(int(inspect["State"]["Pid"]))
        procs = [top, *top.children(recursive=True)]
        assert any("code-server" in " ".join(p.cmdline()) for p in procs), [
            p.cmdline() for p in procs
        ]
        for proc in procs:
            assert proc.uids().real == 1000 and proc.uids().effective == 1000, proc.cmdline()
            assert h.proxy_secret not in " ".join(proc.cmdline())
            if proc != top and proc.ppid() != top.pid:
                # The guard's children (code-server and what it starts) never had it.
                assert PROXY_SECRET_ENV not in proc.environ(), proc.cmdline()

        await stop_image_session(controller, SID)


async def _get(
    http: aiohttp.ClientSession, proxy_port: int, key: bytes, path: str
) -> tuple[int, str, str]:
    """GET through the proxy: the status, the redirect's Location ("" when none), the body."""
    headers = {
        "Host": f"{SID}.localhost:{proxy_port}",
        "Cookie": f"studios-connect={_cookie(key, SID)}",
    }
    async with http.get(
        f"http://127.0.0.1:{proxy_port}{path}", headers=headers, allow_redirects=False
    ) as resp:
        location = resp.headers.get("Location", "") if 300 <= resp.status < 400 else ""
        return resp.status, location, await resp.text()
