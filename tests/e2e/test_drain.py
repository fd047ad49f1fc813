"""`studio-agent drain` with real processes (issue 16): a controller and an agent on the
local runtime with directory volumes, driven over REST and the agent's command line.

- drain (stop mode): the running studio is stopped with its final checkpoint, `drain`
  follows until the host has no active session and exits 0; GET /agents says draining; a
  new start is not placed (it waits `starting`, as when no agent fits); draining survives
  an agent restart; `undrain` lets the waiting start be placed;
- drain --wait: the running studio is left running (`--no-follow` returns at once), a
  following `drain --wait` ends once the user stops it.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_harness import AgentProcess, Stack, script

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/python-http:3.11-0.1"
AGENT_ARGS = ["--volume-kind", "directory", "--stop-grace-seconds", "1"]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    try:
        await s.start(agent_args=AGENT_ARGS)
        yield s
    finally:
        await s.close()


def _agent_cli(
    agent: AgentProcess, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script("studio-agent"), *args, "--state-dir", str(agent.state_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def _agent_row(stack: Stack) -> dict[str, Any]:
    assert stack.api is not None
    _, body = await stack.api.request("GET", "/agents", expect=200)
    (row,) = [a for a in body["agents"] if a["connected"]]
    return dict(row)


async def _wait_agent(stack: Stack, draining: bool, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = await _agent_row(stack)
        if row["draining"] == draining:
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"GET /agents draining is not {draining} after {timeout} s: {row}")


async def _studio(stack: Stack, sid: str) -> dict[str, Any]:
    assert stack.api is not None
    _, studio = await stack.api.request("GET", f"/studios/{sid}", expect=200)
    return dict(studio)


async def test_drain_stops_sessions_and_keeps_new_ones_away(stack: Stack) -> None:
    api = stack.api
    assert api is not None
    sid = await stack.create_studio("drained", dataStudioToolUrl=TEMPLATE)
    await stack.wait_running(sid)

    started = time.monotonic()
    done = await asyncio.to_thread(_agent_cli, stack.agent, "drain")
    drain_seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "draining: no new sessions" in done.stdout
    assert f"session {sid}: stopped" in done.stdout
    assert done.stdout.rstrip().endswith("drained: no session is active on this host")
    print(f"drain to no active session: {drain_seconds:.1f} s")

    studio = await _studio(stack, sid)
    assert studio["statusInfo"]["status"] == "stopped"
    checkpoints = await stack.checkpoints(sid)
    assert [c["status"] for c in checkpoints] == ["finalized"], checkpoints
    row = await _wait_agent(stack, draining=True)
    assert row["drainMode"] == "stop"

    # A new start finds no agent: it waits, as placement answers when none fits.
    waiting = await stack.create_studio("waiting", dataStudioToolUrl=TEMPLATE)
    await asyncio.sleep(6)  # past one reconcile interval (5 s)
    studio = await _studio(stack, waiting)
    assert studio["statusInfo"]["status"] == "starting"
    assert "waiting for an agent" in studio["statusInfo"]["message"]

    # Draining survives a restart of the agent.
    stack.agent.stop()
    await stack.add_agent(agent_args=AGENT_ARGS, state_dir=stack.agent.state_dir)
    status = stack.agent.cli("status")
    assert status["drain"]["draining"] is True and status["drain"]["mode"] == "stop"
    assert (await _agent_row(stack))["draining"] is True
    await asyncio.sleep(6)
    assert (await _studio(stack, waiting))["statusInfo"]["status"] == "starting"

    undone = await asyncio.to_thread(_agent_cli, stack.agent, "undrain")
    assert undone.returncode == 0, undone.stderr
    await stack.wait_running(waiting, timeout=60)
    row = await _wait_agent(stack, draining=False)
    assert "drainMode" not in row


async def test_drain_wait_leaves_sessions_to_finish(stack: Stack) -> None:
    api = stack.api
    assert api is not None
    sid = await stack.create_studio("finishing", dataStudioToolUrl=TEMPLATE)
    await stack.wait_running(sid)

    started = time.monotonic()
    at_once = await asyncio.to_thread(_agent_cli, stack.agent, "drain", "--wait", "--no-follow")
    assert at_once.returncode == 0, at_once.stderr
    assert time.monotonic() - started < 10
    assert "1 session(s) active" in at_once.stdout
    row = await _wait_agent(stack, draining=True)
    assert row["drainMode"] == "wait"

    await asyncio.sleep(3)
    assert (await _studio(stack, sid))["statusInfo"]["status"] == "running"

    follow = await asyncio.create_subprocess_exec(
        script("studio-agent"),
        "drain",
        "--wait",
        "--state-dir",
        str(stack.agent.state_dir),
        stdout=asyncio.subprocess.PIPE,
    )
    assert follow.stdout is not None
    lines: list[str] = []
    try:
        # It follows the running session until that ends.
        async with asyncio.timeout(60):
            while f"session {sid}: running" not in lines:
                line = (await follow.stdout.readline()).decode()
                assert line, f"drain --wait ended early: {lines}"
                lines.append(line.strip())
        await asyncio.sleep(2)
        assert follow.returncode is None, "drain --wait follows while a session runs"
        await stack.stop_studio(sid)
        async with asyncio.timeout(60):
            rest, _ = await follow.communicate()
    finally:
        if follow.returncode is None:
            follow.kill()
            await follow.wait()
    lines += rest.decode().splitlines()
    assert follow.returncode == 0, lines
    assert f"session {sid}: stopped" in lines, lines
    assert lines[-1] == "drained: no session is active on this host", lines
