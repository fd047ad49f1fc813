"""The reaper: at agent start (and then periodically) tools labelled as this agent's
sessions that no live handle owns are stopped and reported, and what ended generations
left (volumes, loop devices of deleted files) is released; another agent's tools and a
session's unsaved data are never touched.

Real processes, real podman containers and real xfs-loop volumes; the controller is the
fake one (the reaper never needs it).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.runtime.local import LABEL_ENV
from agent.runtime.podman import LABEL_GENERATION, LABEL_OWNER, LABEL_SESSION
from agent.sessions.handle import SessionHandle, save_handle
from agent.state import StateDir
from agent.volumes import GIB, VolumeInfo
from agent.volumes.xfs import XfsLoopVolume, backing_file, loop_devices_for, mounted_source
from tests.agent.runtime.test_podman import IMAGE, _require_podman
from tests.agent.volumes.test_xfs import _force_cleanup, _require_xfs
from tests.agent_fixtures import controller_fixture, make_agent_config  # noqa: F401
from tests.fake_controller import FakeController


def _labelled_sleeper(label: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, LABEL_ENV: label}
    return subprocess.Popen(
        ["sleep", "300"], env=env, start_new_session=True, stdin=subprocess.DEVNULL
    )


async def _until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.1)


async def test_local_orphan_tool_is_reaped_at_agent_start_and_reported(
    tmp_path: Path, controller: FakeController
) -> None:
    config = make_agent_config(tmp_path, controller)
    state = StateDir(config.state_dir)
    state.ensure()
    agent_id = state.agent_id()
    orphan = _labelled_sleeper(f"{agent_id}/dead0001/3")
    # Another agent's tool on the same host, and one of a session this agent runs.
    foreign = _labelled_sleeper(f"{'0' * 32}/dead0001/3")
    agent = Agent(config)
    try:
        await agent.start()
        assert agent.manager is not None
        await _until(lambda: orphan.poll() is not None)
        assert orphan.returncode == -9
        [entry] = agent.manager.reaped
        assert entry["sessionId"] == "dead0001" and entry["generation"] == 3
        assert entry["what"].startswith(f"process group {orphan.pid} ")
        status = await agent._status()
        assert status["reaped"] == agent.manager.reaped
        assert foreign.poll() is None and psutil.pid_exists(foreign.pid)
    finally:
        await agent.close()
        for proc in (orphan, foreign):
            proc.kill()
            proc.wait()


async def test_local_tool_of_a_live_session_is_kept(
    tmp_path: Path, controller: FakeController
) -> None:
    from tests.fake_controller import desired

    config = make_agent_config(tmp_path, controller)
    agent = Agent(config)
    await agent.start()
    try:
        controller.push(desired("dead0002"))
        obs = await controller.wait_status("dead0002", pb.SESSION_STATUS_RUNNING)
        assert agent.manager is not None
        assert await agent.manager.reap() == []
        h = agent.manager.get("dead0002")
        assert h is not None and h.pid and psutil.pid_exists(h.pid) and obs.tool_port
        controller.push(desired("dead0002", status=pb.DESIRED_STATUS_STOPPED))
        await controller.wait_status("dead0002", pb.SESSION_STATUS_STOPPED)
    finally:
        await agent.close()


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=False)


async def test_orphaned_labelled_container_is_reaped_at_agent_start(
    tmp_path: Path, controller: FakeController
) -> None:
    _require_podman()
    config = make_agent_config(tmp_path, controller, runtime="podman", volume_kind="xfs-loop")
    state = StateDir(config.state_dir)
    state.ensure()
    agent_id = state.agent_id()
    names = [f"studios-reaper-{os.getpid()}-{n}" for n in (1, 2)]

    def labelled(name: str, owner: str) -> str:
        out = _podman(
            "run", "-d", "--name", name,
            "--label", f"{LABEL_SESSION}=dead0003",
            "--label", f"{LABEL_GENERATION}=1",
            "--label", f"{LABEL_OWNER}={owner}",
            IMAGE,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    orphan = labelled(names[0], agent_id)
    foreign = labelled(names[1], "f" * 32)
    agent = Agent(config)
    try:
        await agent.start()
        assert agent.manager is not None
        # 1: no such container (125 would be podman failing to answer).
        await _until(lambda: _podman("container", "exists", orphan).returncode == 1)
        await _until(lambda: agent.manager.reaped)  # type: ignore[union-attr]
        [entry] = agent.manager.reaped
        assert entry["sessionId"] == "dead0003" and entry["what"].startswith(
            f"container {orphan[:12]}"
        )
        assert _podman("container", "exists", foreign).returncode == 0
    finally:
        await agent.close()
        for name in names:
            _podman("rm", "-f", "-t", "0", name)


async def test_leftovers_of_ended_generations_are_released_unsaved_data_is_kept(
    tmp_path: Path, controller: FakeController
) -> None:
    _require_xfs()
    # No controller answers: no desired state arrives to save or forget these sessions,
    # so what happens to them is the reaper's doing alone.
    config = make_agent_config(tmp_path, controller, volume_kind="xfs-loop")
    config.controller = "127.0.0.1:1"
    state = StateDir(config.state_dir)
    state.ensure()
    vol = XfsLoopVolume()
    handles = {}
    for sid, unsaved in (("dead0004", False), ("dead0005", True)):
        root = state.root_dir(sid)
        info = await vol.prepare(root, 2 * GIB)
        (root / "data").write_text(sid)
        handles[sid] = h = SessionHandle(
            session_id=sid,
            generation=2,
            status="errored" if unsaved else "stopped",
            runtime="local",
            root_dir=str(root),
            volume=info,
            unsaved=unsaved,
        )
        save_handle(state, h)
    # A loop device whose backing file a crashed agent deleted while it was attached.
    lost = state.root_dir("dead0006")
    await vol.prepare(lost, 2 * GIB)
    subprocess.run(["umount", str(lost)], check=True)
    backing_file(lost).unlink()
    [lost_device] = await loop_devices_for(backing_file(lost))
    agent = Agent(config)
    try:
        await agent.start()
        assert agent.manager is not None
        await _until(lambda: len(agent.manager.reaped) >= 2)  # type: ignore[union-attr]
        stopped = Path(handles["dead0004"].root_dir)
        assert mounted_source(stopped) is None and not backing_file(stopped).exists()
        assert await loop_devices_for(backing_file(lost)) == []
        what = [e["what"] for e in agent.manager.reaped]
        assert f"leftover volume {stopped}" in what
        assert any(w.startswith(f"loop device {lost_device} ") for w in what), what
        # Unsaved data stays until a checkpoint takes it.
        kept = Path(handles["dead0005"].root_dir)
        assert (kept / "data").read_text() == "dead0005"
    finally:
        await agent.close()
        await vol.release(VolumeInfo(vol.kind, handles["dead0005"].root_dir, 0))
        await asyncio.to_thread(_force_cleanup, state.sessions_dir)
