"""xfs-loop session volumes on the real kernel: create, grow online under a writer, the
budget cap, a backing file deleted behind the agent's back, release leaves nothing."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent, AgentConfig
from agent.errors import VolumeError, VolumeGone
from agent.volumes import GIB, VolumeInfo
from agent.volumes.xfs import XfsLoopVolume, backing_file, loop_devices_for, mounted_source
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    controller_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController, desired
from tests.integration import require

RUNNING = pb.SESSION_STATUS_RUNNING
STOPPED = pb.SESSION_STATUS_STOPPED
ERRORED = pb.SESSION_STATUS_ERRORED


def _require_xfs() -> None:
    ok, why = XfsLoopVolume.available()
    require(ok, f"xfs-loop volumes need root and loop devices: {why}")


def _force_cleanup(root: Path) -> None:
    """Whatever a failed test left: unmount, detach loop devices, delete."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir() and mounted_source(path) is not None:
            subprocess.run(["umount", "-l", str(path)], check=False)
    for image in root.rglob("*.xfs"):
        for dev in asyncio.run(loop_devices_for(image)):
            subprocess.run(["losetup", "-d", dev], check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(name="vroot")
def vroot_fixture(tmp_path: Path) -> Iterator[Path]:
    _require_xfs()
    root = tmp_path / "vols"
    root.mkdir()
    yield root
    _force_cleanup(root)


def _write(path: Path, total: int, result: dict[str, object]) -> None:
    """A full-speed writer; records ENOSPC instead of raising."""
    chunk = b"\0" * (8 * 1024 * 1024)
    written = 0
    try:
        with open(path, "wb") as f:
            while written < total:
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        result["errno"] = exc.errno
    result["written"] = written


async def test_prepare_grow_release(vroot: Path) -> None:
    vol = XfsLoopVolume()
    path = vroot / "s1" / "root"
    info = await vol.prepare(path, 2 * GIB)
    assert info.size_bytes == 2 * GIB and mounted_source(path) is not None
    assert 0 < info.used_bytes < 200 * 1024**2
    # Sparse: 2 GiB of volume costs a few MiB on the host.
    assert os.stat(backing_file(path)).st_blocks * 512 < 200 * 1024**2
    # A second prepare never formats over a volume that is there.
    with pytest.raises(VolumeError, match="already there"):
        await vol.prepare(path, 2 * GIB)
    # Attach (agent restart) of a mounted volume changes nothing: no second loop device.
    again = await vol.attach(VolumeInfo(vol.kind, str(path), 2 * GIB))
    assert again.size_bytes == 2 * GIB and vol.is_attached(again)
    assert len(await loop_devices_for(backing_file(path))) == 1
    grown = await vol.grow(info, 2 * GIB)
    assert grown.size_bytes == 4 * GIB
    assert os.statvfs(path).f_blocks * os.statvfs(path).f_frsize > 3.9 * GIB
    await vol.release(grown)
    assert mounted_source(path) is None
    assert not backing_file(path).exists() and not path.exists()
    assert await loop_devices_for(backing_file(path)) == []
    await vol.release(grown)  # idempotent


async def test_reattach_after_unmount(vroot: Path) -> None:
    vol = XfsLoopVolume()
    path = vroot / "s2" / "root"
    await vol.prepare(path, 2 * GIB)
    (path / "keep").write_text("data")
    for dev in await loop_devices_for(backing_file(path)):
        subprocess.run(["umount", str(path)], check=True)
        subprocess.run(["losetup", "-d", dev], check=True)
    assert mounted_source(path) is None
    assert not vol.is_attached(VolumeInfo(vol.kind, str(path), 2 * GIB))
    await vol.attach(VolumeInfo(vol.kind, str(path), 2 * GIB))
    assert (path / "keep").read_text() == "data"
    await vol.release(VolumeInfo(vol.kind, str(path), 2 * GIB))


async def test_attach_never_creates_a_volume_whose_file_is_gone(vroot: Path) -> None:
    """After a crash that lost the backing file, recovery must not hand the session an
    empty volume (a checkpoint of it would replace the studio's data)."""
    vol = XfsLoopVolume()
    path = vroot / "s3" / "root"
    info = await vol.prepare(path, 2 * GIB)
    (path / "keep").write_text("data")
    await vol.release(info)
    with pytest.raises(VolumeGone, match="is gone"):
        await vol.attach(info)
    assert not backing_file(path).exists() and mounted_source(path) is None


async def _released(controller: FakeController, session_id: str) -> None:
    """`stopped` comes first; the volume's release follows, reported without a volume."""
    await controller.wait_for(
        lambda: (o := controller.latest(session_id)) and o.status == STOPPED and not o.volume.path
    )


async def _xfs_agent(tmp_path: Path, controller: FakeController, **kw: object) -> Agent:
    config: AgentConfig = make_agent_config(
        tmp_path, controller, volume_kind="xfs-loop", disk_watch_seconds=0.5, **kw
    )
    agent = Agent(config)
    await agent.start()
    return agent


async def _cleanup_agent(agent: Agent) -> None:
    await agent.close()
    kill_leftover_tools(agent.config.state_dir)
    await asyncio.to_thread(_force_cleanup, agent.config.state_dir / "sessions")


async def test_writer_never_sees_enospc_while_the_volume_grows(
    tmp_path: Path, controller: FakeController
) -> None:
    _require_xfs()
    agent = await _xfs_agent(tmp_path, controller)
    try:
        controller.push(desired("bbbb0001", image="test/slow:1", environment={"SLOW_SECONDS": "0"}))
        obs = await controller.wait_status("bbbb0001", RUNNING)
        assert obs.volume.volume_kind == pb.VOLUME_KIND_XFS_LOOP
        assert obs.volume.size_bytes == 2 * GIB
        result: dict[str, object] = {}
        await asyncio.to_thread(_write, Path(obs.volume.path) / "big", 3 * GIB, result)
        # _write stores the OSError's errno: an int, for a failed write or fsync.
        assert "errno" not in result, f"writer failed: {os.strerror(cast(int, result['errno']))}"
        assert result["written"] == 3 * GIB
        assert agent.manager is not None
        events = agent.manager.disk_events("bbbb0001")
        sizes = [e["toBytes"] for e in events]
        # Step by step, 2 GiB at a time.
        assert sizes[:2] == [4 * GIB, 6 * GIB], events
        await controller.wait_for(
            lambda: (o := controller.latest("bbbb0001")) and o.volume.size_bytes >= 6 * GIB
        )
        controller.push(desired("bbbb0001", status=pb.DESIRED_STATUS_STOPPED))
        await controller.wait_status("bbbb0001", STOPPED, timeout=120)
        await _released(controller, "bbbb0001")
        assert await loop_devices_for(backing_file(Path(obs.volume.path))) == []
    finally:
        await _cleanup_agent(agent)


async def test_at_the_budget_the_writer_gets_enospc_and_the_message_says_why(
    tmp_path: Path, controller: FakeController
) -> None:
    _require_xfs()
    agent = await _xfs_agent(tmp_path, controller)
    try:
        d = desired("bbbb0002", image="test/slow:1", environment={"SLOW_SECONDS": "0"})
        d.spec.boot_disk_size_gb = 6
        controller.push(d)
        obs = await controller.wait_status("bbbb0002", RUNNING)
        result: dict[str, object] = {}
        await asyncio.to_thread(_write, Path(obs.volume.path) / "big", 8 * GIB, result)
        assert result.get("errno") == errno.ENOSPC
        assert int(str(result["written"])) > 5 * GIB
        latest = await controller.wait_for(
            lambda: (o := controller.latest("bbbb0002")) and "disk budget" in o.message and o
        )
        assert latest.status == RUNNING and "6 GiB" in latest.message
        assert latest.volume.size_bytes == 6 * GIB
        # A second session of the same environment cannot start: the budget is used up.
        d2 = desired("bbbb0003", image="test/slow:1", environment={"SLOW_SECONDS": "0"})
        d2.spec.boot_disk_size_gb = 6
        controller.push(d2)
        refused = await controller.wait_status("bbbb0003", ERRORED)
        assert "disk budget" in refused.message
        assert not refused.HasField("volume") or refused.volume.size_bytes == 0
        assert not (agent.config.state_dir / "sessions" / "bbbb0003" / "root.xfs").exists()
    finally:
        await _cleanup_agent(agent)


async def test_volume_file_deleted_behind_the_agents_back(
    tmp_path: Path, controller: FakeController
) -> None:
    _require_xfs()
    agent = await _xfs_agent(tmp_path, controller)
    try:
        controller.push(desired("bbbb0004", image="test/slow:1", environment={"SLOW_SECONDS": "0"}))
        obs = await controller.wait_status("bbbb0004", RUNNING)
        path = Path(obs.volume.path)
        backing_file(path).unlink()
        # The session keeps running on the (still open) loop device; growth fails loudly.
        result: dict[str, object] = {}
        writer = threading.Thread(target=_write, args=(path / "big", int(1.5 * GIB), result))
        writer.start()
        latest = await controller.wait_for(
            lambda: (o := controller.latest("bbbb0004")) and "cannot grow" in o.message and o
        )
        writer.join()
        assert latest.status == RUNNING and "deleted" in latest.message
        controller.push(desired("bbbb0004", status=pb.DESIRED_STATUS_STOPPED))
        await controller.wait_status("bbbb0004", STOPPED, timeout=120)
        await _released(controller, "bbbb0004")
        assert mounted_source(path) is None
        assert await loop_devices_for(backing_file(path)) == []
    finally:
        await _cleanup_agent(agent)
