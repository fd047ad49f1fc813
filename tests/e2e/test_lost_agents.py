"""Lost agents and cancelled starts with real processes (issue 16).

`studio-controller serve` with a short `--agent-lost-seconds`, and `studio-agent serve`
processes on the local runtime with xfs-loop volumes (loop devices, XFS, mounts):

- an agent SIGKILLed and not restarted: its studios become `errored` ("agent lost") after
  the grace period; one is deleted, the other started on a second agent (its last
  checkpoint restored there). The first agent started again later still holds the lost
  run: it is told to forget it, stops it with a final checkpoint, and that checkpoint is
  kept as a named checkpoint of the studio (not its restore point); no second session
  runs; a new studio added from that checkpoint has the lost run's files byte for byte;
- a start cancelled at the end of its restore step (held right after the restore wrote
  the volume by the agent's test pause hook, `agent.crash_points.hold`) ends `stopped`
  with nothing of it left on the host: no tool process, no mount, no loop device, no
  volume directory; nothing checkpointed. A cancel while the restore is still reading
  the store: tests/e2e/test_cancel_mid_restore.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import crash_points
from agent.runtime.local import LABEL_ENV
from agent.volumes.xfs import mounted_source
from tests.agent.sessions.test_crash_at_every_step import _release_leftovers, _require_xfs, _tree
from tests.e2e_harness import AgentProcess, ControllerProcess, RestClient

pytestmark = [pytest.mark.e2e, pytest.mark.root]

TEMPLATE = "studios/python-http:3.11-0.1"
AGENT_ARGS = [
    "--volume-kind",
    "xfs-loop",
    "--stop-grace-seconds",
    "1",
    "--checkpoint-interval-seconds",
    "3600",
]


@dataclass
class Stack:
    tmp: Path
    controller: ControllerProcess
    api: RestClient
    compute_env_id: str
    agents: list[AgentProcess]
    sessions: list[str]

    def agent(self, name: str, env: dict[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(
            self.controller, self.compute_env_id, self.tmp / name, extra_args=AGENT_ARGS, env=env
        )
        self.agents.append(agent)
        agent.start()
        return agent

    async def wait_connected(self, agent: AgentProcess, timeout: float = 60) -> str:
        """The agent's id, once the controller lists it connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Written at enrollment (cheaper than `studio-agent status` in a loop).
            with contextlib.suppress(FileNotFoundError):
                agent_id = (agent.state_dir / "agent-id").read_text().strip()
                _, listing = await self.api.request("GET", "/agents", expect=200)
                if any(a["id"] == agent_id and a["connected"] for a in listing["agents"]):
                    return agent_id
            await asyncio.sleep(0.2)
        raise TimeoutError(f"agent did not connect:\n{agent.log_tail()}")

    async def create(self, name: str, **extra: Any) -> str:
        _, body = await self.api.request(
            "POST",
            "/studios?autoStart=true",
            {
                "name": name,
                "computeEnvId": self.compute_env_id,
                "dataStudioToolUrl": TEMPLATE,
                **extra,
            },
            expect=200,
        )
        sid = str(body["studio"]["sessionId"])
        self.sessions.append(sid)
        return sid


async def wait_checkpoints(api: RestClient, sid: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while True:
        _, listing = await api.request("GET", f"/studios/{sid}/checkpoints", expect=200)
        if len(listing["checkpoints"]) >= count or time.monotonic() > deadline:
            return list(listing["checkpoints"])
        await asyncio.sleep(0.2)


def root_dir(agent: AgentProcess, sid: str) -> Path:
    [entry] = [s for s in agent.cli("sessions")["sessions"] if s["id"] == sid]
    return Path(entry["rootDir"])


def session_ids(agent: AgentProcess) -> set[str]:
    return {s["id"] for s in agent.cli("sessions")["sessions"]}


def leftovers(agent: AgentProcess, sid: str) -> list[str]:
    """What of a session is still on the host: tools, mounts, loop devices, its volume."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            # This agent's: the tool's home is the session root under its state directory.
            if f"/{sid}/" in env.get(LABEL_ENV, "") and env.get("HOME", "").startswith(
                str(agent.state_dir) + "/"
            ):
                found.append(f"tool pid {proc.pid}")
    session_dir = agent.state_dir / "sessions" / sid
    for name in ("root", "merged"):
        if mounted_source(session_dir / name) is not None:
            found.append(f"mount {session_dir / name}")
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        if str(session_dir) in back:
            found.append(f"loop device {name} ({back.strip()})")
    for path in (session_dir / "root", session_dir / "volume.img"):
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            found.append(f"volume {path}")
    return found


@contextlib.asynccontextmanager
async def _stack(tmp: Path) -> AsyncIterator[Stack]:
    _require_xfs()
    controller = ControllerProcess(
        tmp / "controller",
        extra_args=["--agent-lost-seconds", "3", "--reconcile-interval-seconds", "0.5"],
    )
    controller.start()
    api: RestClient | None = None
    stack: Stack | None = None
    try:
        await controller.wait_ready()
        api = RestClient(controller.url, controller.admin_token)
        env_id = await api.create_compute_env("lost", tmp / "work")
        stack = Stack(tmp, controller, api, env_id, [], [])
        yield stack
    finally:
        if api is not None:
            await api.close()
        for agent in stack.agents if stack is not None else []:
            agent.stop()
        controller.stop()
        for agent in stack.agents if stack is not None else []:
            for sid in stack.sessions if stack is not None else []:
                _release_leftovers(agent.state_dir, sid)


async def test_agent_lost_then_back_keeps_its_final_checkpoint(tmp_path: Path) -> None:
    async with _stack(tmp_path) as stack:
        api = stack.api
        first = stack.agent("agent-a")
        first_id = await stack.wait_connected(first)
        kept = await stack.create("kept")
        dropped = await stack.create("dropped")
        for sid in (kept, dropped):
            await api.wait_status(sid, "running", timeout=90)
        # The user's work, after the start's first checkpoint (what a start elsewhere
        # restores): only the lost run has it.
        await wait_checkpoints(api, kept, 1)
        work = root_dir(first, kept) / "work"
        work.mkdir(exist_ok=True)
        (work / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        (work / "notes.txt").write_text("written on the agent that got lost\n")
        (work / "sub").mkdir()
        (work / "sub" / "more.bin").write_bytes(os.urandom(100_000))
        expected = _tree(work)

        first.kill()
        for sid in (kept, dropped):
            studio = await api.wait_status(sid, "errored", timeout=60)
            message = studio["statusInfo"]["message"]
            assert message.startswith(f"agent lost: {first_id} last seen 20"), message
        await api.request("DELETE", f"/studios/{dropped}", expect=204)

        # Started elsewhere meanwhile.
        second = stack.agent("agent-b")
        second_id = await stack.wait_connected(second)
        await api.request("PUT", f"/studios/{kept}/start", {}, expect=200)
        await api.wait_status(kept, "running", timeout=90)
        assert kept in session_ids(second)

        # The lost agent comes back with the lost run: it stops it with a final
        # checkpoint, kept by name; the studio keeps running on the second agent alone.
        first.proc = None
        first.start()
        await stack.wait_connected(first)
        recovered: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not recovered:
            _, listing = await api.request("GET", f"/studios/{kept}/checkpoints", expect=200)
            recovered = next(
                (c for c in listing["checkpoints"] if "recovered_from_agent" in c["name"]), {}
            )
            await asyncio.sleep(0.2)
        assert recovered, f"no recovered checkpoint:\n{first.log_tail(60)}"
        assert recovered["name"] == f"kept_(recovered_from_agent_{first_id})"
        for _ in range(300):
            if not session_ids(first) & {kept, dropped}:
                break
            await asyncio.sleep(0.2)
        assert not session_ids(first) & {kept, dropped}, first.cli("sessions")
        assert not leftovers(first, kept) and not leftovers(first, dropped)
        _, studio = await api.request("GET", f"/studios/{kept}", expect=200)
        assert studio["statusInfo"]["status"] == "running"
        assert kept in session_ids(second)

        # The recovered checkpoint holds the lost run's files, byte for byte.
        clone = await stack.create("from the lost run", initialCheckpointId=recovered["id"])
        await api.wait_status(clone, "running", timeout=90)
        host = first if clone in session_ids(first) else second
        assert _tree(root_dir(host, clone) / "work") == expected

        # (That the studio's own restore point stays its latest run's, not the recovered
        # checkpoint: tests/controller/test_lost_agents.py.) The stack's teardown releases
        # the two sessions still running.
        assert second_id != first_id


async def test_start_cancelled_after_restore_leaves_nothing(tmp_path: Path) -> None:
    async with _stack(tmp_path) as stack:
        api = stack.api
        pause = tmp_path / "pause-at"
        agent = stack.agent("agent", env={crash_points.PAUSE_ENV_VAR: str(pause)})
        await stack.wait_connected(agent)
        sid = await stack.create("big")
        await api.wait_status(sid, "running", timeout=90)
        work = root_dir(agent, sid) / "work"
        work.mkdir(exist_ok=True)
        (work / "big.bin").write_bytes(os.urandom(16 * 1024 * 1024))
        expected = _tree(work)
        await api.request("PUT", f"/studios/{sid}/stop", {}, expect=200)
        await api.wait_status(sid, "stopped", timeout=120)

        # The agent holds right after the restore wrote the volume, the step in progress.
        pause.write_text("start:restore-written")
        await api.request("PUT", f"/studios/{sid}/start", {}, expect=200)
        for _ in range(1200):
            if "pause point start:restore-written" in agent.log_tail(200):
                break
            await asyncio.sleep(0.05)
        _, studio = await api.request("GET", f"/studios/{sid}", expect=200)
        assert studio["statusInfo"]["status"] == "starting", studio["statusInfo"]
        restore = [s for s in studio["progress"] if s["message"].startswith("restoring")]
        assert restore and restore[0]["status"] == "in-progress", studio["progress"]
        assert leftovers(agent, sid), "the start made nothing yet"
        _, cancel = await api.request("POST", f"/studios/{sid}/cancel", expect=200)
        assert cancel["statusInfo"]["status"] == "stopping"
        for _ in range(600):
            if "cancelling the start of generation" in agent.log_tail(200):
                break
            await asyncio.sleep(0.05)
        pause.unlink()
        studio = await api.wait_status(sid, {"stopped", "errored", "running"}, timeout=90)
        assert studio["statusInfo"]["status"] == "stopped", studio["statusInfo"]
        [entry] = [s for s in agent.cli("sessions")["sessions"] if s["id"] == sid]
        assert entry["status"] == "stopped" and entry["message"] == "start cancelled", entry
        assert leftovers(agent, sid) == []
        # Nothing was checkpointed from the half-started volume: the one checkpoint is
        # still the first run's, and the next start restores all of it.
        _, listing = await api.request("GET", f"/studios/{sid}/checkpoints", expect=200)
        assert [c["status"] for c in listing["checkpoints"]] == ["finalized"], listing
        await api.request("PUT", f"/studios/{sid}/start", {}, expect=200)
        await api.wait_status(sid, "running", timeout=120)
        assert _tree(root_dir(agent, sid) / "work") == expected
        await api.request("PUT", f"/studios/{sid}/stop", {}, expect=200)
        await api.wait_status(sid, "stopped", timeout=120)
