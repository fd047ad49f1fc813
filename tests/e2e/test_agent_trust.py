"""End to end, the agent's side of issue 12 against the real controller: the agent enrolls
with the controller's `DIR/agent-token`, rotates a short-lived certificate while its studio
keeps running, and says so when it is revoked."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e_harness import ControllerProcess, Stack, agent_session, script

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/python-http:3.11-0.1"
# Seconds; the controller's minimum is 10. Renewed after about two thirds.
LIFETIME = 12


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    s.controller = ControllerProcess(
        tmp_path / "controller", extra_args=["--agent-cert-lifetime", str(LIFETIME)]
    )
    try:
        yield s
    finally:
        await s.close()


async def _running_studio(stack: Stack) -> str:
    api = stack.api
    assert api is not None
    _, body = await api.request(
        "POST",
        "/studios?autoStart=true",
        {"name": "trust", "computeEnvId": stack.compute_env_id, "dataStudioToolUrl": TEMPLATE},
        expect=200,
    )
    sid = str(body["studio"]["sessionId"])
    await api.wait_status(sid, "running")
    return sid


async def test_the_agent_rotates_its_certificate_while_its_studio_runs(stack: Stack) -> None:
    await stack.start()
    api = stack.api
    assert api is not None
    sid = await _running_studio(stack)
    pki = stack.agent.state_dir / "pki"
    assert stat.S_IMODE((pki / "agent.key").stat().st_mode) == 0o600
    first = stack.agent.cli("status")["controller"]
    assert first["enrolled"] and first["certificate"]["renewals"] == 0
    pid = agent_session(stack.agent, sid)["pid"]

    # Two renewals (about 8 s and 16 s in); the studio stays running on the same tool.
    deadline = time.monotonic() + 3 * LIFETIME
    while True:
        status = stack.agent.cli("status")["controller"]
        if status["certificate"]["renewals"] >= 2 and status["connected"]:
            break
        assert time.monotonic() < deadline, f"no two renewals: {status}"
        _, studio = await api.request("GET", f"/studios/{sid}", expect=200)
        assert studio["statusInfo"]["status"] == "running", studio["statusInfo"]
        session = agent_session(stack.agent, sid)
        assert session["status"] == "running" and session["pid"] == pid
        await asyncio.sleep(0.5)
    assert status["certificate"]["serial"] != first["certificate"]["serial"]
    assert status["certificate"]["agentId"] == first["certificate"]["agentId"]
    _, studio = await api.request("GET", f"/studios/{sid}", expect=200)
    assert studio["statusInfo"]["status"] == "running"
    assert not list(pki.glob("*.new"))


async def test_a_revoked_agent_says_so(stack: Stack) -> None:
    await stack.start()
    api = stack.api
    assert api is not None
    sid = await _running_studio(stack)
    agent_id = stack.agent.cli("status")["agentId"]
    out = subprocess.run(
        [
            script("studio-controller"),
            "agent",
            "revoke",
            agent_id,
            "--data-dir",
            str(stack.controller.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"agent {agent_id} revoked at" in out.stdout
    deadline = time.monotonic() + 30
    while True:
        ctl = stack.agent.cli("status")["controller"]
        if ctl["revoked"] and not ctl["connected"]:
            break
        assert time.monotonic() < deadline, f"the agent does not say it is revoked: {ctl}"
        await asyncio.sleep(0.5)
    assert "revoked" in ctl["revoked"] and "it is revoked" in ctl["lastError"]
    studio = await api.wait_status(sid, "errored")
    assert f"agent {agent_id} revoked at" in studio["statusInfo"]["message"]
