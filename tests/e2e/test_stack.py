"""End to end: the controller and an agent as real processes, driven over REST.

This is the walking skeleton's "done" path: create a compute environment and a studio, wait
for `running`, open the tool through `studioUrl`, write a file in the session, stop (a
`finalized` checkpoint appears), start again and find the file, stop and delete.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.e2e_harness import AgentProcess, Stack, agent_session, open_studio

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/python-http:3.11-0.1"
# Names other test modules import from here (tests/e2e/test_connect.py).
__all__ = ["TEMPLATE", "Stack", "_open_studio", "stack"]
_open_studio = open_studio


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        await s.close()


async def test_studio_lifecycle_end_to_end(stack: Stack) -> None:
    await stack.start()
    api = stack.api
    assert api is not None

    created_at = time.monotonic()
    _, body = await api.request(
        "POST",
        "/studios",
        {"name": "e2e studio", "computeEnvId": stack.compute_env_id, "dataStudioToolUrl": TEMPLATE},
        expect=200,
    )
    studio = body["studio"]
    sid = studio["sessionId"]
    studio = await api.wait_status(sid, "running")
    startup_seconds = time.monotonic() - created_at
    print(json.dumps({"post_to_running_seconds": round(startup_seconds, 3)}))

    listing = await open_studio(api, studio)
    assert "Directory listing" in listing

    session = agent_session(stack.agent, sid)
    assert session["status"] == "running"
    assert session["runtime"] == "local"
    root = Path(session["rootDir"])
    (root / "notes.txt").write_text("written in the session\n")
    assert await open_studio(api, studio, "/notes.txt") == "written in the session\n"

    await api.request("PUT", f"/studios/{sid}/stop", expect=200)
    await api.wait_status(sid, "stopped")
    assert not root.exists(), "the session directory is released once the checkpoint is written"
    _, checkpoints = await api.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert checkpoints["totalSize"] == 1
    checkpoint = checkpoints["checkpoints"][0]
    assert checkpoint["status"] == "finalized"
    assert checkpoint["path"]
    assert checkpoint["name"].startswith("e2e_studio")

    await api.request("PUT", f"/studios/{sid}/start", {}, expect=200)
    studio = await api.wait_status(sid, "running")
    assert await open_studio(api, studio, "/notes.txt") == "written in the session\n"

    await api.request("PUT", f"/studios/{sid}/stop", expect=200)
    await api.wait_status(sid, "stopped")
    _, checkpoints = await api.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert checkpoints["totalSize"] == 2
    await api.request("DELETE", f"/studios/{sid}", expect=204)
    status, body = await api.request("GET", f"/studios/{sid}")
    assert status == 404 and "message" in body


async def test_tool_that_exits_at_once_errors_with_its_status(stack: Stack) -> None:
    templates = stack.tmp / "templates.json"
    templates.write_text(
        json.dumps({"studios/exits-at-once": {"tool": "exit", "command": ["sh", "-c", "exit 3"]}})
    )
    await stack.start(agent_args=("--local-templates", str(templates)))
    api = stack.api
    assert api is not None
    _, body = await api.request(
        "POST",
        "/studios",
        {
            "name": "broken",
            "computeEnvId": stack.compute_env_id,
            "dataStudioToolUrl": "studios/exits-at-once:1-0.1",
        },
        expect=200,
    )
    studio = await api.wait_status(body["studio"]["sessionId"], {"errored", "running"})
    assert studio["statusInfo"]["status"] == "errored"
    assert "3" in studio["statusInfo"]["message"], studio["statusInfo"]
    # The reason stays readable, and an errored studio can be started again or deleted.
    status, _ = await api.request("PUT", f"/studios/{studio['sessionId']}/stop")
    assert status in (200, 409)
    await api.request("DELETE", f"/studios/{studio['sessionId']}", expect=204)


async def test_agent_and_controller_restarts_lose_nothing(stack: Stack) -> None:
    await stack.start()
    api = stack.api
    assert api is not None
    _, body = await api.request(
        "POST", "/studios", {"name": "survivor", "computeEnvId": stack.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    await api.wait_status(sid, "running")
    tool_pid_before = _tool_pid(stack.tmp, sid)

    # The agent dies without warning and comes back: the session is re-adopted, not restarted.
    stack.agent.stop(signal.SIGKILL)
    stack.agents.append(
        AgentProcess(
            stack.controller,
            stack.compute_env_id,
            stack.agent.state_dir,
            proxy_port=stack.agent.proxy_port,
        )
    )
    stack.agent.start()
    await stack.wait_agent_connected()
    studio = await api.wait_status(sid, "running")
    assert _tool_pid(stack.tmp, sid) == tool_pid_before
    assert agent_session(stack.agent, sid)["status"] == "running"
    assert "Directory listing" in await open_studio(api, studio)

    # The controller restarts: studios and statuses are intact, the agent reconnects.
    stack.controller.stop()
    stack.controller.start()
    await stack.controller.wait_ready()
    await stack.wait_agent_connected()
    studio = await api.wait_status(sid, "running")
    assert studio["name"] == "survivor"
    assert _tool_pid(stack.tmp, sid) == tool_pid_before
    assert "Directory listing" in await open_studio(api, studio)

    await api.request("PUT", f"/studios/{sid}/stop", expect=200)
    await api.wait_status(sid, "stopped")
    assert not psutil.pid_exists(tool_pid_before) or psutil.Process(tool_pid_before).status() in (
        psutil.STATUS_ZOMBIE,
        psutil.STATUS_DEAD,
    )


def _tool_pid(tmp: Path, session_id: str) -> int:
    pids = [
        proc.pid
        for proc in psutil.process_iter(["cmdline", "cwd"])
        if "agent.runtime.http_tool" in " ".join(proc.info["cmdline"] or [])
        and session_id in (proc.info["cwd"] or "")
        and str(tmp) in (proc.info["cwd"] or "")
    ]
    assert len(pids) == 1, f"expected exactly one tool process for {session_id}, found {pids}"
    return pids[0]
