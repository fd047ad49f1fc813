"""The checkpoint events' outbox (agent/controller_link.py `Outbox`): an unreadable file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.controller_link import Outbox


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
