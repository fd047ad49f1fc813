"""The checkpoint events' outbox (agent/controller_link.py `Outbox`): an unreadable file, and
what goes first when the stream comes back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.controller_link import Outbox
from agent.daemon import Agent
from tests.agent_fixtures import make_agent_config
from tests.fake_controller import FakeController


def test_an_unreadable_event_is_dropped_and_the_others_still_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path)
    kept = box.add(pb.CheckpointEvent(session_id="abcdef01", key="manifests/abcdef01/k1"))
    # Not a message at all (a disk error, a foreign file): the parser's DecodeError, which
    # is no ValueError, used to end every connect before its inventory was sent.
    torn = tmp_path / "00000000000000000001-0123456789abcdef01234567.pb"
    torn.write_bytes(b"\xff\xff\xff not a message")
    caplog.set_level(logging.WARNING, "agent.controller_link")
    assert [path for path, _event in box.pending()] == [kept]
    assert not torn.exists()
    assert "dropping unreadable" in caplog.text


async def test_on_connect_pending_checkpoints_go_before_the_inventory(tmp_path: Path) -> None:
    """A stop finished while the stream was down: its FINALIZED checkpoint waits in the
    outbox and the inventory reports the session `stopped`. The controller must record
    the checkpoint first, or a start right after the inventory restores the one before
    (tests/agent/sessions/test_crash_at_every_step.py lost the last files that way)."""
    controller = FakeController()
    await controller.start()
    config = make_agent_config(tmp_path, controller)
    final = pb.CheckpointEvent(
        session_id="abcdef01",
        generation=1,
        key="manifests/abcdef01/final",
        uri="file:///work/.studios/checkpoints/manifests/abcdef01/final",
        status=pb.CHECKPOINT_STATUS_FINALIZED,
    )
    Outbox(config.state_dir / "outbox").add(final)
    agent = Agent(config)
    try:
        await agent.start()
        await controller.wait_for(lambda: controller.messages("inventory"), timeout=20)
        kinds = [m.WhichOneof("message") for _, m in controller.received]
        assert "checkpoint" in kinds, kinds
        assert kinds.index("checkpoint") < kinds.index("inventory"), kinds
        assert controller.messages("checkpoint")[0].key == final.key
    finally:
        await agent.close()
        await controller.stop()
