"""The project's JupyterLab image (images/jupyterlab, issue 15) in a podman session: a real
agent (fake controller) starts the catalogue's `studios/jupyterlab:4.6-0.1` on an xfs-loop
volume; JupyterLab answers through the agent's real connect proxy (`/api/status`, the
proxy's user as Jupyter's identity, a kernel that runs code over its WebSocket), refuses
requests to its published port that lack the proxy's secret, runs as the image's
non-root user, and what the session writes lands in the checkpointed upper directory.

Needs the image built (`studio-agent images build jupyterlab`; scripts/podman-setup does).
"""

from __future__ import annotations

import json
import os
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

# The catalogue's repository, as the controller sends it: podman finds it as
# localhost/studios/jupyterlab:4.6-0.1, the reference images/jupyterlab builds.
TEMPLATE = "studios/jupyterlab:4.6-0.1"
BUILT = "localhost/studios/jupyterlab:4.6-0.1"
SID = "1ab00001"


@pytest.fixture(name="jconfig")
def jconfig_fixture(tmp_path: Path, controller: FakeController) -> Iterator[AgentConfig]:
    with image_agent_config(tmp_path, controller, BUILT, "jupyterlab") as config:
        yield config


async def test_jupyterlab_image_answers_through_the_proxy_as_studio(
    controller: FakeController, jconfig: AgentConfig
) -> None:
    async with _agent(jconfig) as agent, _client() as http:
        h = await start_image_session(controller, jconfig, SID, TEMPLATE, "jupyter")

        # Its real UI through the proxy: the status API, and alice as Jupyter's user.
        status, text = await _through_proxy(http, agent, controller.key, SID, "GET", "/api/status")
        assert status == 200 and "started" in json.loads(text), text
        status, me = await _through_proxy(http, agent, controller.key, SID, "GET", "/api/me")
        assert status == 200 and json.loads(me)["identity"]["username"] == "alice", me

        # The published port without the proxy's secret (or with a wrong one): 403.
        for headers in forged_headers(h):
            for method, path in (("GET", "/api/status"), ("GET", "/lab"), ("POST", "/api/kernels")):
                status, body = await _direct(http, h.port, method, path, headers)
                assert status == 403 and NOT_FROM_PROXY in body, (method, path, status, body)

        # A kernel runs code over its WebSocket, through the proxy.
        xsrf = {"Cookie": FORGED["Cookie"], "X-XSRFToken": FORGED["X-XSRFToken"]}
        status, kernel = await _through_proxy(
            http, agent, controller.key, SID, "POST", "/api/kernels", xsrf
        )
        assert status == 201, kernel
        ws = await http.ws_connect(
            f"http://127.0.0.1:{agent.proxy_port}/api/kernels/{json.loads(kernel)['id']}/channels",
            headers={
                "Host": f"{SID}.localhost:{agent.proxy_port}",
                "Cookie": f"studios-connect={_cookie(controller.key, SID)}",
            },
        )
        try:
            assert (await _execute(ws, "print(6*7)")).strip() == "42"
            # The kernel runs as the image's user, without the proxy's secret, in
            # /workspace, where it can write.
            code = (
                "import os, pathlib; pathlib.Path('notes.txt').write_text('kept');"
                f"print(os.getuid(), os.getcwd(), os.environ.get({PROXY_SECRET_ENV!r}))"
            )
            assert (await _execute(ws, code)).split() == ["1000", "/workspace", "None"]
        finally:
            await ws.close()

        # The tool itself is not root, on the host's view of the container's processes.
        [container] = _containers(SID)
        inspect = json.loads(_podman("inspect", str(container["Id"])).stdout)[0]
        tool = psutil.Process(int(inspect["State"]["Pid"]))
        for proc in [tool, *tool.children(recursive=True)]:
            assert proc.uids().real != 0 and proc.uids().effective != 0, proc.cmdline()
        assert h.proxy_secret not in " ".join(tool.cmdline())

        # What the session wrote is in the upper directory (what checkpoints read), owned
        # by the image's user; the image's own files are not.
        assert h.volume is not None
        upper = Path(h.volume.path) / "upper"
        notes = upper / "workspace" / "notes.txt"
        assert notes.read_text() == "kept" and os.stat(notes).st_uid == 1000
        assert not (upper / "opt" / "jupyter" / "bin").exists()

        await stop_image_session(controller, SID)
