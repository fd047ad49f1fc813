"""The checkpoint lifecycle of a session: one at start, interim refreshes, final at stop,
and the faults around it (store down, agent killed mid-upload, corrupt packs)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.checkpoints import engine as E
from agent.daemon import Agent, AgentConfig
from tests import REPO_ROOT
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    controller_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController, desired
from tests.s3_server import S3Server, require_weed

RUNNING = pb.SESSION_STATUS_RUNNING
STOPPED = pb.SESSION_STATUS_STOPPED
ERRORED = pb.SESSION_STATUS_ERRORED
INTERIM = pb.CHECKPOINT_STATUS_INTERIM
FINALIZED = pb.CHECKPOINT_STATUS_FINALIZED


def _events(
    controller: FakeController, sid: str, status: int | None = None
) -> list[pb.CheckpointEvent]:
    return [
        e
        for e in controller.messages("checkpoint")
        if e.session_id == sid and (status is None or e.status == status)
    ]


@pytest.fixture
async def fast_agent(tmp_path: Path, controller: FakeController) -> AsyncIterator[Agent]:
    """An agent refreshing checkpoints every second, retrying failed final ones at once."""
    config = make_agent_config(
        tmp_path, controller, checkpoint_interval_seconds=1.0, unsaved_retry_seconds=0.5
    )
    a = Agent(config)
    await a.start()
    await controller.wait_for(lambda: controller.messages("inventory"))
    try:
        yield a
    finally:
        await a.close()
        kill_leftover_tools(config.state_dir)


@pytest.fixture
def private_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    srv = S3Server(tmp_path / "weed", require_weed())
    srv.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv.secret)
    monkeypatch.setenv("STUDIOS_S3_ENDPOINT", srv.endpoint)
    try:
        yield srv
    finally:
        srv.stop()


async def test_start_refresh_and_final_are_one_incremental_chain(
    controller: FakeController, fast_agent: Agent, tmp_path: Path
) -> None:
    base = f"file://{tmp_path}/work/.studios/checkpoints"
    controller.push(desired("c1c10001", checkpoint_base_uri=base))
    obs = await controller.wait_status("c1c10001", RUNNING)
    root = Path(obs.root_dir)
    (root / "big.bin").write_bytes(os.urandom(4 << 20))
    # The start checkpoint, then refreshes every second, each a new complete object.
    await controller.wait_for(lambda: len(_events(controller, "c1c10001", INTERIM)) >= 3)
    interims = _events(controller, "c1c10001", INTERIM)
    assert len({e.uri for e in interims}) == len(interims)
    assert all(e.generation == 1 and e.size_bytes > 0 for e in interims)
    # Incremental: each refresh names the previous one as its parent.
    repo = E.get_repository(base)
    last = interims[-1].uri.rsplit("/", 1)[-1]
    manifest = repo.load_manifest("c1c10001", last)
    assert manifest.parent and manifest.parent.startswith(base)
    (root / "late.txt").write_text("written after the last refresh")

    controller.push(desired("c1c10001", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    await controller.wait_status("c1c10001", STOPPED)
    [final] = _events(controller, "c1c10001", FINALIZED)
    stop = controller.latest("c1c10001")
    assert stop is not None
    step = next(s for s in stop.progress if s.name == "writing the final checkpoint")
    assert step.status == pb.STEP_STATUS_SUCCEEDED and step.percent == 100
    # No interim after the final one.
    kinds = [e.status for e in _events(controller, "c1c10001")]
    assert kinds[-1] == FINALIZED and kinds.count(FINALIZED) == 1

    controller.push(
        desired("c1c10001", generation=2, restore_uri=final.uri, checkpoint_base_uri=base)
    )
    obs2 = await controller.wait_status("c1c10001", RUNNING, generation=2)
    assert (Path(obs2.root_dir) / "late.txt").read_text() == "written after the last refresh"
    step = next(s for s in obs2.progress if s.name == "restoring the checkpoint")
    assert step.status == pb.STEP_STATUS_SUCCEEDED and step.percent == 100
    # Restore progress was reported in bytes while it ran.
    restoring = [
        s
        for o in controller.observed("c1c10001")
        for s in o.progress
        if s.name == "restoring the checkpoint" and "MiB of" in s.message
    ]
    assert restoring, "the restore step never reported bytes done / total"


async def test_store_down_during_a_refresh_keeps_the_session_running(
    controller: FakeController, fast_agent: Agent, private_s3: S3Server
) -> None:
    private_s3.make_bucket("refresh")
    base = "s3://refresh/work/.studios/checkpoints"
    controller.push(desired("c2c20001", checkpoint_base_uri=base))
    obs = await controller.wait_status("c2c20001", RUNNING)
    await controller.wait_for(lambda: _events(controller, "c2c20001", INTERIM))
    good = _events(controller, "c2c20001", INTERIM)[-1]
    (Path(obs.root_dir) / "new.txt").write_text("x")

    private_s3.stop()
    warned = await controller.wait_for(
        lambda: next(
            (
                o
                for o in controller.observed("c2c20001")
                if "checkpoint refresh failed" in o.message
            ),
            None,
        ),
        timeout=60,
    )
    assert warned.status == RUNNING
    assert (
        base in warned.message and "stays valid" in warned.message and "retrying" in warned.message
    )
    # The previous checkpoint is still complete once the store is back.
    private_s3.start()
    n = len(_events(controller, "c2c20001", INTERIM))
    await controller.wait_for(lambda: len(_events(controller, "c2c20001", INTERIM)) > n, 60)
    assert (await E.verify(good.uri)).ok
    await controller.wait_for(
        lambda: controller.latest("c2c20001").message == "python-http is answering",  # type: ignore[union-attr]
        timeout=10,
    )
    history = [o.status for o in controller.observed("c2c20001")]
    assert all(st == RUNNING for st in history[history.index(RUNNING) :]), history


async def test_store_down_at_stop_keeps_the_data_until_it_is_saved(
    controller: FakeController, fast_agent: Agent, private_s3: S3Server
) -> None:
    private_s3.make_bucket("final")
    base = "s3://final/work/.studios/checkpoints"
    controller.push(desired("c3c30001", checkpoint_base_uri=base))
    obs = await controller.wait_status("c3c30001", RUNNING)
    await controller.wait_for(lambda: _events(controller, "c3c30001", INTERIM))
    root = Path(obs.root_dir)
    interim = _events(controller, "c3c30001", INTERIM)[-1]

    private_s3.stop()
    (root / "precious.txt").write_text("not in any checkpoint yet")
    controller.push(desired("c3c30001", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    errored = await controller.wait_status("c3c30001", ERRORED, timeout=90)
    assert "final checkpoint failed, the session directory is kept" in errored.message
    assert base in errored.message
    assert (root / "precious.txt").read_text() == "not in any checkpoint yet"
    assert not _events(controller, "c3c30001", FINALIZED)

    # The store comes back: the final checkpoint is retried, then the directory released.
    private_s3.start()
    await controller.wait_for(lambda: _events(controller, "c3c30001", FINALIZED), timeout=60)
    [final] = _events(controller, "c3c30001", FINALIZED)
    assert final.generation == 1
    await controller.wait_for(lambda: not root.exists(), timeout=10)
    # A later start restores it (the controller's newest checkpoint of the studio).
    controller.push(
        desired("c3c30001", generation=2, restore_uri=final.uri, checkpoint_base_uri=base)
    )
    obs2 = await controller.wait_status("c3c30001", RUNNING, generation=2, timeout=60)
    assert (Path(obs2.root_dir) / "precious.txt").read_text() == "not in any checkpoint yet"
    assert interim.uri != final.uri


async def test_restore_of_a_corrupt_checkpoint_errors_the_start_naming_the_pack(
    controller: FakeController, fast_agent: Agent, tmp_path: Path
) -> None:
    base = f"file://{tmp_path}/store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(2 << 20))
    r = await E.backup(base, "c4c40001", src)
    [pack] = [p for p in (tmp_path / "store" / "data").rglob("*") if p.is_file()]
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    controller.push(desired("c4c40001", restore_uri=r.uri, checkpoint_base_uri=base))
    obs = await controller.wait_status("c4c40001", ERRORED)
    assert pack.name in obs.message
    step = next(s for s in obs.progress if s.name == "restoring the checkpoint")
    assert step.status == pb.STEP_STATUS_ERRORED
    assert not any(o.status == RUNNING for o in controller.observed("c4c40001"))


KILLED_BACKUP = """
import os, sys
from agent.checkpoints import engine as E
E.backup_sync(sys.argv[1], "c5c50001", sys.argv[2], upload_concurrency=1)
"""


def test_agent_killed_mid_upload_leaves_no_checkpoint(tmp_path: Path) -> None:
    base = f"file://{tmp_path}/store"
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}.bin").write_bytes(os.urandom(16 << 20))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_BACKUP), base, str(src)],
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            packs = list((tmp_path / "store" / "data").rglob("*")) if proc.poll() is None else []
            if any(p.is_file() for p in packs):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the backup finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    # Data was uploaded, but no manifest: nothing is listed, nothing half restorable.
    assert any(p.is_file() for p in (tmp_path / "store" / "data").rglob("*"))
    assert E.list_checkpoints(base) == []
    assert E.latest_checkpoint(base, "c5c50001") is None


async def test_refresh_interval_setting(tmp_path: Path, controller: FakeController) -> None:
    config: AgentConfig = make_agent_config(tmp_path, controller)
    assert config.checkpoint_interval_seconds == 300.0
    a = Agent(config)
    await a.start()
    try:
        assert a.manager is not None and a.manager.settings.checkpoint_interval_seconds == 300.0
        controller.push(desired("c6c60001", checkpoint_base_uri=str(tmp_path / "ck")))
        await controller.wait_status("c6c60001", RUNNING)
        # One checkpoint at start; the next would come 5 minutes later.
        await controller.wait_for(lambda: _events(controller, "c6c60001", INTERIM))
        await asyncio.sleep(1.0)
        assert len(_events(controller, "c6c60001")) == 1
    finally:
        await a.close()
        kill_leftover_tools(config.state_dir)


async def test_a_start_after_a_failed_final_checkpoint_saves_and_restores_it_first(
    tmp_path: Path, controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.checkpoints.backend import StoreUnavailable
    from agent.checkpoints.content_store import ContentCheckpointStore

    down = {"on": False}
    original = ContentCheckpointStore.save

    async def flaky(self: ContentCheckpointStore, *args: object, **kwargs: object) -> object:
        if down["on"]:
            raise StoreUnavailable(f"checkpoint store {self.base_uri} failed: it is down")
        return await original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ContentCheckpointStore, "save", flaky)
    config = make_agent_config(tmp_path, controller)
    a = Agent(config)
    await a.start()
    base = f"file://{tmp_path}/ck"
    try:
        controller.push(desired("c7c70001", checkpoint_base_uri=base))
        obs = await controller.wait_status("c7c70001", RUNNING)
        await controller.wait_for(lambda: _events(controller, "c7c70001", INTERIM))
        [interim] = _events(controller, "c7c70001", INTERIM)
        (Path(obs.root_dir) / "precious.txt").write_text("kept")
        down["on"] = True
        controller.push(
            desired("c7c70001", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base)
        )
        errored = await controller.wait_status("c7c70001", ERRORED)
        assert base in errored.message
        down["on"] = False
        # The controller's restore point is the run's interim checkpoint; the agent saves
        # the kept directory first and restores that newer checkpoint instead.
        controller.push(
            desired("c7c70001", generation=2, restore_uri=interim.uri, checkpoint_base_uri=base)
        )
        obs2 = await controller.wait_status("c7c70001", RUNNING, generation=2)
        assert (Path(obs2.root_dir) / "precious.txt").read_text() == "kept"
        [final] = _events(controller, "c7c70001", FINALIZED)
        assert final.generation == 1
    finally:
        await a.close()
        kill_leftover_tools(config.state_dir)
