"""The agent's `stopped` report names the run's final checkpoint (`final_checkpoint_key`).

The controller applies that `stopped` only once it has recorded the checkpoint named
(controller/observed.py), whatever order the two messages reach it in. The key is kept
in the handle beside `final_uri`, so an agent restarted after the final checkpoint still
names it; a handle an older agent wrote names none (the controller then applies at once).
"""

from __future__ import annotations

from pathlib import Path

from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.sessions.handle import SessionHandle
from agent.sessions.report import observed
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    agent_fixture,
    controller_fixture,
)
from tests.fake_controller import FakeController, desired

STOPPED = pb.SESSION_STATUS_STOPPED


async def test_every_stopped_report_names_the_final_checkpoint(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    base = str(tmp_path / "work" / ".studios" / "checkpoints")
    controller.push(desired("fcfc0001", checkpoint_base_uri=base))
    obs = await controller.wait_status("fcfc0001", pb.SESSION_STATUS_RUNNING)
    (Path(obs.root_dir) / "last.txt").write_text("written just before the stop")
    controller.push(desired("fcfc0001", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    # Both `stopped` reports: the first, and the one after the volume's release.
    await controller.wait_for(
        lambda: (o := controller.latest("fcfc0001")) and o.status == STOPPED and not o.volume.path
    )
    [final] = [
        e
        for e in controller.messages("checkpoint")
        if e.session_id == "fcfc0001" and e.status == pb.CHECKPOINT_STATUS_FINALIZED
    ]
    reports = controller.observed("fcfc0001")
    stopped = [o for o in reports if o.status == STOPPED]
    assert len(stopped) >= 2
    assert {o.final_checkpoint_key for o in stopped} == {final.key}
    # Only `stopped` names it: nothing before the stop ended waits for anything.
    assert {o.final_checkpoint_key for o in reports if o.status != STOPPED} == {""}
    # The inventory (what a reconnect sends) names it too.
    assert agent.manager is not None
    [listed] = [o for o in agent.manager.inventory().sessions if o.session_id == "fcfc0001"]
    assert listed.final_checkpoint_key == final.key


def test_the_key_survives_in_the_handle_and_an_older_handle_names_none() -> None:
    h = SessionHandle(session_id="fcfc0002", generation=2, status="stopped", runtime="local")
    h.final_uri, h.final_key = "file:///c/manifests/fcfc0002/k9", "manifests/fcfc0002/k9"
    again = SessionHandle.from_json(h.to_json())
    assert observed(again).final_checkpoint_key == "manifests/fcfc0002/k9"
    # Written by an agent before the field: the stop is reported as before, naming nothing.
    older = h.to_json()
    del older["final_key"]
    assert observed(SessionHandle.from_json(older)).final_checkpoint_key == ""
    # An errored run keeps its final checkpoint's key, but only `stopped` names it.
    again.status = "errored"
    assert observed(again).final_checkpoint_key == ""
