"""Restores that fit: a studio that grew past its first volume starts again with its data
and 2 GiB free, a restore the disk budget cannot hold is refused before anything is made,
and a restore that outgrows its volume grows it like a writer would.

Real xfs-loop volumes and the real agent (in process), driven by the fake controller.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from studios.agent.v1 import agent_pb2 as pb

from agent.volumes import GIB
from agent.volumes.xfs import backing_file, loop_devices_for
from tests.agent.volumes.test_xfs import _cleanup_agent, _released, _require_xfs, _xfs_agent
from tests.agent_fixtures import controller_fixture  # noqa: F401  (fixture by name)
from tests.fake_controller import FakeController, desired

RUNNING = pb.SESSION_STATUS_RUNNING
STOPPED = pb.SESSION_STATUS_STOPPED
ERRORED = pb.SESSION_STATUS_ERRORED
MIB = 1024**2
DATA_BYTES = 3 * GIB


def _write_data(path: Path) -> str:
    """3 GiB of one random MiB over and over: real blocks on the volume, cheap in the
    store (the chunks repeat); returns its sha256."""
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(DATA_BYTES // MIB):
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _spec(
    session_id: str, ck: Path, generation: int, budget_gb: int, restore: str = ""
) -> pb.SessionDesired:
    d = desired(
        session_id,
        generation=generation,
        image="test/slow:1",
        environment={"SLOW_SECONDS": "0"},
        checkpoint_base_uri=str(ck),
        restore_uri=restore,
    )
    d.spec.boot_disk_size_gb = budget_gb
    return d


def _final_uri(controller: FakeController, session_id: str, generation: int) -> str:
    [event] = [
        e
        for e in controller.messages("checkpoint")
        if e.session_id == session_id
        and e.generation == generation
        and e.status == pb.CHECKPOINT_STATUS_FINALIZED
    ][-1:]
    return str(event.uri)


async def test_a_grown_session_restores_with_2_gib_free_and_a_restore_that_does_not_fit_is_refused(
    tmp_path: Path, controller: FakeController
) -> None:
    _require_xfs()
    agent = await _xfs_agent(tmp_path, controller)
    ck = tmp_path / "ck"
    sid, other = "ffee0001", "ffee0002"
    try:
        controller.push(_spec(sid, ck, 1, 30))
        obs = await controller.wait_status(sid, RUNNING, timeout=60)
        data = Path(obs.volume.path) / "data.bin"
        want = await asyncio.to_thread(_write_data, data)
        controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED))
        await controller.wait_status(sid, STOPPED, timeout=300)
        await _released(controller, sid)
        first = _final_uri(controller, sid, 1)

        # Started from that checkpoint: all of it back, and still about 2 GiB free.
        controller.push(_spec(sid, ck, 2, 30, restore=first))
        obs = await controller.wait_status(sid, RUNNING, generation=2, timeout=300)
        st = os.statvfs(obs.volume.path)
        free = st.f_bavail * st.f_frsize
        assert 1.9 * GIB <= free <= 2.5 * GIB, (
            f"{free / GIB:.2f} GiB free after the restore; volume "
            f"{obs.volume.size_bytes / GIB:.2f} GiB"
        )
        assert obs.volume.size_bytes > DATA_BYTES + 2 * GIB
        assert await asyncio.to_thread(_sha256, Path(obs.volume.path) / "data.bin") == want
        controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED, generation=2))
        await controller.wait_status(sid, STOPPED, generation=2, timeout=300)
        await _released(controller, sid)
        second = _final_uri(controller, sid, 2)

        # Another session holds 2 GiB of a 6 GiB budget: the restore (3 GiB + 2 GiB free
        # and the file system's share) does not fit in the 4 GiB left.
        controller.push(_spec(other, ck, 1, 6))
        await controller.wait_status(other, RUNNING, timeout=60)
        controller.push(_spec(sid, ck, 3, 6, restore=second))
        obs = await controller.wait_status(sid, ERRORED, generation=3, timeout=60)
        assert f"restoring checkpoint {second} needs a 5." in obs.message, obs.message
        assert "(3.0 GiB of data plus 2 GiB free)" in obs.message, obs.message
        assert "only 4.0 GiB of its 6 GiB disk budget on this host is left" in obs.message
        assert "hold 2.0 GiB" in obs.message, obs.message
        # Refused before anything was made.
        root = agent.config.state_dir / "sessions" / sid / "root"
        assert not backing_file(root).exists() and not root.exists()
        assert await loop_devices_for(backing_file(root)) == []
        controller.push(desired(other, status=pb.DESIRED_STATUS_STOPPED))
        await controller.wait_status(other, STOPPED, timeout=60)
        await _released(controller, other)

        # A restore larger than its volume (the estimate forced low) grows it on the way.
        assert agent.manager is not None
        agent.manager.context.volume_size_for = lambda restore_bytes: 2 * GIB  # type: ignore[method-assign]
        controller.push(_spec(sid, ck, 4, 30, restore=second))
        obs = await controller.wait_status(sid, RUNNING, generation=4, timeout=300)
        assert await asyncio.to_thread(_sha256, Path(obs.volume.path) / "data.bin") == want
        grown = agent.manager.disk_events(sid)
        assert grown and grown[0]["fromBytes"] == 2 * GIB, grown
        controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED, generation=4))
        await controller.wait_status(sid, STOPPED, generation=4, timeout=300)
    finally:
        await _cleanup_agent(agent)
