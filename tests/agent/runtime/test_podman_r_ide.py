"""The project's R-IDE image (images/r-ide, issue 15) in a podman session: a real agent (fake
controller) starts the catalogue's `studios/r-ide:4.2-0.1`, JupyterLab with Debian's R kernel
(RStudio Server is neither in Debian nor reachable). Through the agent's real connect proxy
the kernelspecs list `ir` as the default and an R kernel runs code over its WebSocket; the
published port refuses requests without the proxy's secret; everything runs as the image's
non-root user.

Needs the image built (`studio-agent images build r-ide`; scripts/podman-setup does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

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
    FORGED,
    _client,
    _cookie,
    _direct,
    _execute,
    _through_proxy,
)
from tests.agent_fixtures import controller_fixture  # noqa: F401
from tests.fake_controller import FakeController

# The catalogue's repository, as the controller sends it; podman finds it as the
# localhost/ reference images/r-ide builds.
TEMPLATE = "studios/r-ide:4.2-0.1"
BUILT = "localhost/studios/r-ide:4.2-0.1"
SID = "1ab00002"


@pytest.fixture(name="rconfig")
def rconfig_fixture(tmp_path: Path, controller: FakeController) -> Iterator[AgentConfig]:
    with image_agent_config(tmp_path, controller, BUILT, "r-ide") as config:
        yield config


async def test_r_ide_image_runs_r_through_the_proxy_as_studio(
    controller: FakeController, rconfig: AgentConfig
) -> None:
    async with _agent(rconfig) as agent, _client() as http:
        h = await start_image_session(controller, rconfig, SID, TEMPLATE, "r-ide")

        # R is the default kernel (what a new notebook and a nameless kernel start get);
        # Python is still there as the second choice.
        status, text = await _through_proxy(
            http, agent, controller.key, SID, "GET", "/api/kernelspecs"
        )
        assert status == 200, text
        specs = json.loads(text)
        assert specs["default"] == "ir", specs["default"]
        assert specs["kernelspecs"]["ir"]["spec"]["language"] == "R"
        assert "python3" in specs["kernelspecs"]

        # The published port without the proxy's secret (or with a wrong one): 403.
        for headers in forged_headers(h):
            for method, path in (
                ("GET", "/api/kernelspecs"),
                ("GET", "/lab"),
                ("POST", "/api/kernels"),
            ):
                status, body = await _direct(http, h.port, method, path, headers)
                assert status == 403 and NOT_FROM_PROXY in body, (method, path, status, body)

        # A kernel started without a name is R's, and runs R over its WebSocket.
        xsrf = {"Cookie": FORGED["Cookie"], "X-XSRFToken": FORGED["X-XSRFToken"]}
        status, kernel = await _through_proxy(
            http, agent, controller.key, SID, "POST", "/api/kernels", xsrf
        )
        assert status == 201 and json.loads(kernel)["name"] == "ir", kernel
        ws = await http.ws_connect(
            f"http://127.0.0.1:{agent.proxy_port}/api/kernels/{json.loads(kernel)['id']}/channels",
            headers={
                "Host": f"{SID}.localhost:{agent.proxy_port}",
                "Cookie": f"studios-connect={_cookie(controller.key, SID)}",
            },
        )
        try:
            assert (await _execute(ws, "cat(6*7)")).strip() == "42"
            # The kernel runs as the image's user, without the proxy's secret, in
            # /workspace; its user library (for install.packages) is in the home.
            code = (
                'cat(system("id -u", intern = TRUE), getwd(), '
                f'Sys.getenv("{PROXY_SECRET_ENV}", "None"), .libPaths()[1])'
            )
            assert (await _execute(ws, code)).split() == [
                "1000",
                "/workspace",
                "None",
                "/home/studio/R/library",
            ]
        finally:
            await ws.close()

        # No process of the session is root, on the host's view of the container.
        [container] = _containers(SID)
        inspect = json.loads(_podman("inspect", str(container["Id"])).stdout)[0]
        tool = psutil.Process(int(inspect["State"]["Pid"]))
        procs = [tool, *tool.children(recursive=True)]
        assert any("IRkernel::main()" in " ".join(p.cmdline()) for p in procs)
        for proc in procs:
            assert proc.uids().real == 1000 and proc.uids().effective == 1000, proc.cmdline()

        await stop_image_session(controller, SID)
