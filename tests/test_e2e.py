"""End to end: the controller and an agent as real processes, driven over REST.

This is the walking skeleton's "done" path: create a compute environment and a studio, wait
for `running`, open the tool through `studioUrl`, write a file in the session, stop (a
`finalized` checkpoint appears), start again and find the file, stop and delete.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e_harness import AgentProcess, ControllerProcess, RestClient

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/python-http:3.11-0.1"


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.controller = ControllerProcess(tmp / "controller")
        self.agents: list[AgentProcess] = []
        self.api: RestClient | None = None
        self.compute_env_id = ""

    async def start(self, *, agent_args: tuple[str, ...] = ()) -> None:
        self.controller.start()
        await self.controller.wait_ready()
        self.api = RestClient(self.controller.url, self.controller.admin_token)
        _, body = await self.api.request(
            "POST",
            "/compute-envs",
            {
                "computeEnv": {
                    "name": "local",
                    "platform": "studio-agent",
                    "config": {"workDir": str(self.tmp / "work"), "bootDiskSizeGb": 30},
                }
            },
            expect=200,
        )
        self.compute_env_id = body["computeEnvId"]
        self.agents.append(
            AgentProcess(
                self.controller, self.compute_env_id, self.tmp / "agent", extra_args=agent_args
            )
        )
        self.agent.start()
        await self.wait_agent_connected()

    @property
    def agent(self) -> AgentProcess:
        return self.agents[-1]

    async def wait_agent_connected(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.api is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.agent.alive():
                raise RuntimeError(f"agent exited:\n{self.agent.log_tail()}")
            _, body = await self.api.request("GET", "/agents", expect=200)
            connected = [a for a in body["agents"] if a["connected"]]
            if connected:
                return connected[0]
            await asyncio.sleep(0.1)
        raise TimeoutError(f"agent did not connect:\n{self.agent.log_tail()}")

    async def close(self) -> None:
        if self.api is not None:
            # Stop what a failed test left running, so that its volume is released.
            if self.controller.alive() and any(agent.alive() for agent in self.agents):
                _, listing = await self.api.request("GET", "/studios")
                for studio in listing.get("studios", []) if isinstance(listing, dict) else []:
                    if studio["statusInfo"]["status"] in ("running", "starting"):
                        await self.api.request("PUT", f"/studios/{studio['sessionId']}/stop")
                        try:
                            await self.api.wait_status(
                                studio["sessionId"], {"stopped", "errored"}, timeout=60
                            )
                        except TimeoutError:
                            pass
            await self.api.close()
        for agent in self.agents:
            agent.stop()
        self.controller.stop()
        # Tools are started in their own process sessions so that they outlive an agent
        # restart; a test must not leave them behind.
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(self.tmp) in cmdline:
                proc.kill()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        await s.close()


def _session(agent: AgentProcess, session_id: str) -> dict[str, Any]:
    listing = agent.cli("sessions")
    sessions = listing["sessions"] if isinstance(listing, dict) else listing
    for session in sessions:
        if session.get("sessionId", session.get("id")) == session_id:
            return session
    raise AssertionError(f"session {session_id} not in `studio-agent sessions`: {listing}")


async def _open_studio(api: RestClient, studio: dict[str, Any], path: str = "/") -> str:
    """Open `studioUrl` as a browser would, then fetch `path` through the proxy."""
    async with api.http.get(
        studio["studioUrl"],
        headers={"Authorization": f"Bearer {api.token}"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    assert location.startswith(f"http://{studio['sessionId']}.localhost:"), location
    async with api.http.get(location) as resp:  # token -> cookie -> clean URL
        assert resp.status == 200, await resp.text()
        base = str(resp.url).split("?")[0].rstrip("/")
    async with api.http.get(base + path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


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

    listing = await _open_studio(api, studio)
    assert "Directory listing" in listing

    session = _session(stack.agent, sid)
    assert session["status"] == "running"
    assert session["runtime"] == "local"
    root = Path(session["rootDir"])
    (root / "notes.txt").write_text("written in the session\n")
    assert await _open_studio(api, studio, "/notes.txt") == "written in the session\n"

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
    assert await _open_studio(api, studio, "/notes.txt") == "written in the session\n"

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
    assert _session(stack.agent, sid)["status"] == "running"
    assert "Directory listing" in await _open_studio(api, studio)

    # The controller restarts: studios and statuses are intact, the agent reconnects.
    stack.controller.stop()
    stack.controller.start()
    await stack.controller.wait_ready()
    await stack.wait_agent_connected()
    studio = await api.wait_status(sid, "running")
    assert studio["name"] == "survivor"
    assert _tool_pid(stack.tmp, sid) == tool_pid_before
    assert "Directory listing" in await _open_studio(api, studio)

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
        if "http.server" in " ".join(proc.info["cmdline"] or [])
        and session_id in (proc.info["cwd"] or "")
        and str(tmp) in (proc.info["cwd"] or "")
    ]
    assert len(pids) == 1, f"expected exactly one tool process for {session_id}, found {pids}"
    return pids[0]
