"""What no desired state can lift (issue 13): host directories are bind-mounted only under
a prefix the agent's operator allows (`--allow-host-path`), whatever the controller sends;
a session's volume grows at most to its compute environment's per-session cap.

The controller's side (plainly unsafe paths refused, the cap stored and sent):
tests/controller/test_authorization_holes.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.cli import build_parser
from agent.daemon import Agent
from agent.host_mounts import detach_mounts_under_sync
from agent.sessions.context import SessionContext, SessionSettings
from agent.sessions.handle import SessionSpec
from agent.volumes import GIB
from tests.agent.volumes.test_xfs import _cleanup_agent, _require_xfs, _write, _xfs_agent
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    controller_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController, desired

RUNNING = pb.SESSION_STATUS_RUNNING
STOPPED = pb.SESSION_STATUS_STOPPED
ERRORED = pb.SESSION_STATUS_ERRORED


async def _agent(tmp_path: Path, controller: FakeController, **kw: object) -> Agent:
    agent = Agent(make_agent_config(tmp_path, controller, **kw))
    await agent.start()
    await controller.wait_for(lambda: controller.messages("inventory"))
    return agent


async def _close(agent: Agent, tmp_path: Path) -> None:
    await agent.close()
    kill_leftover_tools(agent.config.state_dir)
    detach_mounts_under_sync(tmp_path)


def _with_mount(sid: str, host_path: str, mount_path: str = "/mnt/efs") -> pb.SessionDesired:
    d = desired(sid, image="test/slow:1", environment={"SLOW_SECONDS": "0"})
    d.spec.file_system_mounts.add(host_path=host_path, mount_path=mount_path)
    return d


@pytest.fixture(name="allowed")
def allowed_fixture(tmp_path: Path) -> Path:
    """The operator's allowed prefix, with a shared directory and a symlink out of it."""
    allowed = tmp_path / "allowed"
    (allowed / "team").mkdir(parents=True)
    (allowed / "team" / "shared.txt").write_text("shared\n")
    (allowed / "escape").symlink_to("/etc")
    return allowed


@pytest.fixture(name="host_agent")
async def host_agent_fixture(
    tmp_path: Path, controller: FakeController, allowed: Path
) -> AsyncIterator[Agent]:
    agent = await _agent(tmp_path, controller, allowed_host_paths=(str(allowed),))
    try:
        yield agent
    finally:
        await _close(agent, tmp_path)


async def _refused(controller: FakeController, sid: str, host_path: str) -> str:
    controller.push(_with_mount(sid, host_path))
    obs = await controller.wait_status(sid, ERRORED)
    assert "file-system mount /mnt/efs" in obs.message, obs.message
    # Nothing of the host path reached the session.
    root = Path(obs.root_dir) if obs.root_dir else None
    assert root is None or not (root / "mnt" / "efs").exists()
    return obs.message


async def test_host_paths_outside_the_allowed_prefix_are_refused_by_the_agent(
    controller: FakeController, host_agent: Agent, allowed: Path
) -> None:
    # The database says /etc (an older controller, a row edited by hand): the agent refuses.
    message = await _refused(controller, "fa110001", "/etc")
    assert "not under a prefix this agent allows" in message
    assert str(allowed) in message and "--allow-host-path" in message
    # A symlink under the prefix is followed before the check: it leads to /etc.
    message = await _refused(controller, "fa110002", str(allowed / "escape"))
    assert "that is /etc" in message
    # Beside the prefix, not under it (a prefix is whole path components).
    sibling = allowed.parent / (allowed.name + "-not")
    sibling.mkdir()
    assert "not under a prefix" in await _refused(controller, "fa110003", str(sibling))
    # Written so that a string comparison could be fooled.
    for n, host_path in enumerate(
        (f"{allowed}/../state", f"{allowed}/./team", f"{allowed}//team", "relative/team")
    ):
        message = await _refused(controller, f"fa11001{n}", host_path)
        assert "not a normalised absolute path" in message
    # Under the prefix: mounted.
    controller.push(_with_mount("fa110020", str(allowed / "team")))
    obs = await controller.wait_status("fa110020", RUNNING)
    assert (Path(obs.root_dir) / "mnt" / "efs" / "shared.txt").read_text() == "shared\n"


async def test_the_agents_state_is_never_a_host_path(
    tmp_path: Path, controller: FakeController
) -> None:
    # The operator allows a prefix that holds the agent's state directory.
    agent = await _agent(tmp_path, controller, allowed_host_paths=(str(tmp_path),))
    try:
        for n, host_path in enumerate((tmp_path / "state", tmp_path / "state" / "sessions")):
            message = await _refused(controller, f"5a7e000{n}", str(host_path))
            assert "agent's state directory" in message
        (tmp_path / "above").mkdir()
        (tmp_path / "above" / "state").symlink_to(tmp_path)
        message = await _refused(controller, "5a7e0009", str(tmp_path / "above" / "state"))
        assert "agent's state directory" in message
    finally:
        await _close(agent, tmp_path)


async def test_no_host_path_is_allowed_by_default(
    tmp_path: Path, controller: FakeController, allowed: Path
) -> None:
    agent = await _agent(tmp_path, controller)
    try:
        message = await _refused(controller, "de7a0001", str(allowed / "team"))
        assert "allows no host paths" in message and "--allow-host-path" in message
        # Sessions without file-system mounts are not concerned.
        controller.push(desired("de7a0002", image="test/slow:1", environment={"SLOW_SECONDS": "0"}))
        await controller.wait_status("de7a0002", RUNNING)
    finally:
        await _close(agent, tmp_path)


def test_allow_host_path_flag() -> None:
    base = ["serve", "--controller", "c:1", "--token-file", "t", "--compute-env", "e"]
    base += ["--state-dir", "/s"]
    args = build_parser().parse_args(
        [*base, "--allow-host-path", "/srv/efs", "--allow-host-path", "/mnt/shared"]
    )
    assert args.allow_host_path == ["/srv/efs", "/mnt/shared"]
    assert build_parser().parse_args(base).allow_host_path == []
    for bad in ("/", "srv/efs", "/srv/../etc", "/srv/efs/", "/srv//efs"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, "--allow-host-path", bad])


# ---------------------------------------------------------------- per-session disk cap


def test_the_cap_travels_in_the_spec_and_the_handle() -> None:
    msg = pb.SessionSpec(image="i", boot_disk_size_gb=30, session_disk_cap_gb=4)
    spec = SessionSpec.from_pb(msg)
    assert spec.session_disk_cap_gb == 4
    assert SessionSpec.from_json(spec.to_json()) == spec
    # What an older agent wrote has no cap: the whole budget.
    old = spec.to_json()
    del old["session_disk_cap_gb"]
    assert SessionSpec.from_json(old).session_disk_cap_gb == 0


async def test_a_session_is_not_grown_beyond_its_cap_and_the_message_says_why(
    tmp_path: Path, controller: FakeController
) -> None:
    _require_xfs()
    agent = await _xfs_agent(tmp_path, controller)
    try:
        d = desired("ca900001", image="test/slow:1", environment={"SLOW_SECONDS": "0"})
        d.spec.boot_disk_size_gb = 30
        d.spec.session_disk_cap_gb = 4
        controller.push(d)
        obs = await controller.wait_status("ca900001", RUNNING)
        assert obs.volume.size_bytes == 2 * GIB
        assert agent.manager is not None
        result: dict[str, object] = {}
        await asyncio.to_thread(_write, Path(obs.volume.path) / "big", 6 * GIB, result)
        assert result.get("errno") == errno.ENOSPC, result
        assert int(str(result["written"])) > 3 * GIB
        latest = await controller.wait_for(
            lambda: (o := controller.latest("ca900001")) and "disk cap" in o.message and o
        )
        assert latest.status == RUNNING
        assert "4 GiB" in latest.message and "sessionDiskCapGb" in latest.message
        assert latest.volume.size_bytes == 4 * GIB
        assert max(e["toBytes"] for e in agent.manager.disk_events("ca900001")) == 4 * GIB
        # The rest of the budget is there for other sessions.
        d2 = desired("ca900002", image="test/slow:1", environment={"SLOW_SECONDS": "0"})
        d2.spec.boot_disk_size_gb = 30
        d2.spec.session_disk_cap_gb = 4
        controller.push(d2)
        await controller.wait_status("ca900002", RUNNING)
        os.unlink(Path(obs.volume.path) / "big")
    finally:
        await _cleanup_agent(agent)


def _sizing_context(volume_size_bytes: int) -> SessionContext:
    # Sizing reads only the settings; the other parts are never touched.
    unused: Any = None
    return SessionContext(
        state=unused,
        runtime=unused,
        volumes=unused,
        datalinks=unused,
        settings=SessionSettings(volume_size_bytes=volume_size_bytes),
        budget_used=lambda: 0,
    )


def test_the_first_volume_is_never_larger_than_the_cap() -> None:
    ctx = _sizing_context(volume_size_bytes=2 * GIB)
    capped = SessionSpec(boot_disk_size_gb=30, session_disk_cap_gb=1)
    uncapped = SessionSpec(boot_disk_size_gb=30)
    # A fresh volume larger than the cap is made at the cap.
    assert ctx.first_volume_size(capped, 0) == (1 * GIB, None)
    assert ctx.first_volume_size(uncapped, 0) == (2 * GIB, None)
    # A restore that fits under the cap, with less free space than a fresh volume.
    size, refusal = ctx.first_volume_size(capped, 512 * 1024**2)
    assert (size, refusal) == (1 * GIB, None)
    # A checkpoint whose data alone is over the cap cannot start, and says why.
    _size, refusal = ctx.first_volume_size(capped, 3 * GIB // 2)
    assert refusal is not None
    assert "1.5 GiB" in refusal and "1 GiB" in refusal and "sessionDiskCapGb" in refusal


async def test_a_fresh_session_under_a_small_cap_starts_at_the_cap(
    tmp_path: Path, controller: FakeController
) -> None:
    _require_xfs()
    agent = await _xfs_agent(tmp_path, controller)
    try:
        d = desired("ca900003", image="test/slow:1", environment={"SLOW_SECONDS": "0"})
        d.spec.boot_disk_size_gb = 30
        d.spec.session_disk_cap_gb = 1
        controller.push(d)
        obs = await controller.wait_status("ca900003", RUNNING)
        assert obs.volume.size_bytes == 1 * GIB
    finally:
        await _cleanup_agent(agent)
