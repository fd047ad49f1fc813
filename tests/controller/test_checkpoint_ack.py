"""Acknowledged checkpoint events: the controller acks after its commit, the agent's outbox
drops an event only on its ack and re-sends the rest on reconnect, after the inventory.

Three levels: the real controller in-process with a fake agent (a real gRPC client), the
real agent in-process with the fake controller (a real gRPC server), and both as real
processes with the agent SIGKILLed between a checkpoint's commit and its ack (the
controller's test-only fault hook `STUDIOS_TEST_FAULT=drop-acks=1` loses that ack).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent import controller_link
from agent.daemon import Agent
from tests.agent_fixtures import kill_leftover_tools, make_agent_config
from tests.conftest import ControllerHarness
from tests.e2e_harness import Stack
from tests.fake_agent import FakeAgent
from tests.fake_controller import FakeController, desired

RECORDED = pb.CHECKPOINT_ACK_RESULT_RECORDED
REFUSED = pb.CHECKPOINT_ACK_RESULT_REFUSED
INTERIM = pb.CHECKPOINT_STATUS_INTERIM
FINALIZED = pb.CHECKPOINT_STATUS_FINALIZED


# ---------------------------------------------------------------- the controller's side


async def _running_studio(h: ControllerHarness, agent: FakeAgent, name: str) -> str:
    _, body = await h.request(
        "POST", "/studios", {"name": name, "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = str(body["studio"]["sessionId"])
    wanted = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await agent.report(sid, wanted.generation, pb.SESSION_STATUS_RUNNING, tool_port=41000)
    return sid


async def _catalogue(h: ControllerHarness, sid: str) -> list[dict[str, Any]]:
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    return list(body["checkpoints"])


async def test_controller_acks_after_commit_once_per_copy(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="ack-1", compute_env_id=h.compute_env_id
    )
    try:
        await agent.connect(inventory=[])
        assert agent.welcome is not None and agent.welcome.checkpoint_acks
        sid = await _running_studio(h, agent, "acked")

        await agent.checkpoint(sid, 1, "manifests/k1", INTERIM, size=10)
        ack = await agent.wait_ack(sid, "manifests/k1")
        assert (ack.result, ack.generation, ack.message) == (RECORDED, 1, "")
        # The ack follows the commit: the catalogue holds it the moment the ack is read.
        [row] = await _catalogue(h, sid)
        assert row["path"].endswith(f"/manifests/{sid}/k1") and row["status"] == "interim"

        # Copies after a lost ack (same stream, then a new one): each is acked again and
        # the catalogue still holds the checkpoint once, the same row.
        for _ in range(2):
            mark = len(agent.responses)
            await agent.checkpoint(sid, 1, "manifests/k1", INTERIM, size=10)
            assert (await agent.wait_ack(sid, "manifests/k1", start=mark)).result == RECORDED
        await agent.close()
        agent = FakeAgent(
            h.grpc_target, h.agent_token, agent_id="ack-1", compute_env_id=h.compute_env_id
        )
        await agent.connect(inventory=[])
        await agent.checkpoint(sid, 1, "manifests/k1", INTERIM, size=10)
        assert (await agent.wait_ack(sid, "manifests/k1")).result == RECORDED
        assert [c["id"] for c in await _catalogue(h, sid)] == [row["id"]]

        # The run's final checkpoint replaces the row's object; its copy changes nothing.
        for _ in range(2):
            mark = len(agent.responses)
            await agent.checkpoint(sid, 1, "manifests/k2", FINALIZED, size=20)
            assert (await agent.wait_ack(sid, "manifests/k2", start=mark)).result == RECORDED
        [final] = await _catalogue(h, sid)
        assert final["id"] == row["id"] and final["status"] == "finalized"
        assert final["path"].endswith(f"/manifests/{sid}/k2")

        # An unknown session can never be recorded: refused for good, with the reason.
        await agent.checkpoint("deadbeef", 1, "manifests/x", FINALIZED)
        refused = await agent.wait_ack("deadbeef", "manifests/x")
        assert refused.result == REFUSED and "deadbeef" in refused.message
    finally:
        await agent.close()


async def test_copies_racing_through_two_controllers_record_once(
    tmp_path: Path, postgres_database: str
) -> None:
    """Two controllers sharing a PostgreSQL database receive copies of one run's events at
    the same time (an agent re-sending after a lost ack while its old stream still drains):
    the catalogue holds the run once and every copy is acked."""
    database = postgres_database
    # One data directory: controllers sharing a database share its keys and tokens.
    first = ControllerHarness(tmp_path / "data", database_url=database)
    second = ControllerHarness(tmp_path / "data", database_url=database)
    agents: list[FakeAgent] = []
    try:
        await first.start()
        await second.start(with_compute_env=False)
        owner = FakeAgent(
            first.grpc_target,
            first.agent_token,
            agent_id="pg-1",
            compute_env_id=first.compute_env_id,
        )
        agents.append(owner)
        await owner.connect(inventory=[])
        sid = await _running_studio(first, owner, "raced")
        # The same agent (only the studio's own agent may send its events), its new
        # stream on the second controller while the old one still drains on the first.
        other = FakeAgent(
            second.grpc_target,
            second.agent_token,
            agent_id="pg-1",
            compute_env_id=first.compute_env_id,
        )
        agents.append(other)
        await other.connect(inventory=[])

        keys = [f"manifests/{sid}/r{i}" for i in range(4)]
        for agent in agents:
            for key in keys:
                await agent.checkpoint(sid, 1, key, INTERIM)
        for agent in agents:
            for key in keys:
                ack = await agent.wait_ack(sid, key, timeout=30)
                assert ack.result in (RECORDED, pb.CHECKPOINT_ACK_RESULT_SUPERSEDED)
        [row] = await _catalogue(first, sid)
        # Which refresh is newest depends on the second each copy was stamped in.
        assert row["status"] == "interim" and row["path"].rsplit("/", 1)[-1] in {
            "r0",
            "r1",
            "r2",
            "r3",
        }
    finally:
        for agent in agents:
            await agent.close()
        await second.close()
        await first.close()


# ---------------------------------------------------------------- the agent's side


def _outbox(state_dir: Path) -> list[Path]:
    return sorted(p for p in (state_dir / "outbox").iterdir() if not p.name.startswith("."))


def _events(fc: FakeController, sid: str, stream: int | None = None) -> list[pb.CheckpointEvent]:
    return [
        m.checkpoint
        for n, m in fc.received
        if m.WhichOneof("message") == "checkpoint"
        and m.checkpoint.session_id == sid
        and (stream is None or n == stream)
    ]


async def _written(fc: FakeController, count: int, sid: str) -> None:
    """Wait until `count` events of `sid` arrived and the agent sent something after them
    (its writer handles one message at a time, so whatever it does after a write is done)."""

    def done() -> bool:
        idx = [
            i
            for i, (_, m) in enumerate(fc.received)
            if m.WhichOneof("message") == "checkpoint" and m.checkpoint.session_id == sid
        ]
        return len(idx) >= count and any(
            m.WhichOneof("message") == "heartbeat" for _, m in fc.received[idx[count - 1] + 1 :]
        )

    await fc.wait_for(done, timeout=30)


@pytest.fixture
async def fc() -> AsyncIterator[FakeController]:
    controller = FakeController(acks=True)
    await controller.start()
    yield controller
    await controller.stop()


@pytest.fixture
async def agent_and_state(tmp_path: Path, fc: FakeController) -> AsyncIterator[tuple[Agent, Path]]:
    config = make_agent_config(tmp_path, fc)
    agent = Agent(config)
    await agent.start()
    await fc.wait_for(lambda: fc.messages("inventory"))
    try:
        yield agent, config.state_dir
    finally:
        await agent.close()
        kill_leftover_tools(config.state_dir)


async def _restart(fc: FakeController) -> int:
    """The controller goes away and comes back on the same port; the new stream's number."""
    before = fc.streams
    await fc.stop()
    await fc.start(fc.port)
    await fc.wait_for(lambda: fc.streams > before and fc.messages("inventory"), timeout=30)
    return fc.streams


async def test_outbox_drops_only_on_ack_and_resends_in_order_before_inventory(
    tmp_path: Path, fc: FakeController, agent_and_state: tuple[Agent, Path]
) -> None:
    _, state_dir = agent_and_state
    base = f"file://{tmp_path}/work/.studios/checkpoints"
    sid = "acca0001"
    fc.drop_acks = 1000  # every ack lost, as if each stream broke right after the commit
    fc.push(desired(sid, checkpoint_base_uri=base))
    await fc.wait_status(sid, pb.SESSION_STATUS_RUNNING)
    await _written(fc, 1, sid)
    fc.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    await fc.wait_status(sid, pb.SESSION_STATUS_STOPPED, timeout=30)
    await _written(fc, 2, sid)
    sent = _events(fc, sid)
    assert [e.status for e in sent] == [INTERIM, FINALIZED]
    # Sent, never acked: both still in the outbox, although the session directory is gone.
    assert len(_outbox(state_dir)) == 2

    fc.drop_acks = 0
    stream = await _restart(fc)
    await fc.wait_for(lambda: not _outbox(state_dir), timeout=30)
    # The new stream: Hello, the unacknowledged events oldest first, then the Inventory.
    # Before it: the inventory says `stopped`, and a start right after must restore the
    # FINALIZED checkpoint, so the controller has to have recorded it by then (in the
    # other order test_crash_at_every_step lost the last files written before a stop).
    kinds = [m.WhichOneof("message") for n, m in fc.received if n == stream]
    assert kinds[:3] == ["hello", "checkpoint", "checkpoint"], kinds
    assert kinds.index("inventory") > 2, kinds
    again = _events(fc, sid, stream)
    assert [(e.key, e.status) for e in again] == [(e.key, e.status) for e in sent]
    assert [a.key for a in fc.acks_for(sid)] == [e.key for e in sent]

    # Acked events are not sent again on the next reconnect.
    stream = await _restart(fc)
    await _written_heartbeat(fc, stream)
    assert _events(fc, sid, stream) == []


async def _written_heartbeat(fc: FakeController, stream: int) -> None:
    await fc.wait_for(
        lambda: any(n == stream and m.WhichOneof("message") == "heartbeat" for n, m in fc.received),
        timeout=30,
    )


async def test_late_ack_resends_on_the_live_stream(
    tmp_path: Path,
    fc: FakeController,
    agent_and_state: tuple[Agent, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The controller took the event but its transaction failed (no ack, stream intact).
    monkeypatch.setattr(controller_link, "_ACK_LATE_SECONDS", 1.0)
    _, state_dir = agent_and_state
    sid = "acca0004"
    fc.drop_acks = 1
    fc.push(desired(sid, checkpoint_base_uri=f"file://{tmp_path}/work/.studios/checkpoints"))
    await fc.wait_status(sid, pb.SESSION_STATUS_RUNNING)
    await fc.wait_for(lambda: len(_events(fc, sid)) >= 2, timeout=30)
    await fc.wait_for(lambda: not _outbox(state_dir), timeout=10)
    first, second = _events(fc, sid)[:2]
    assert first.key == second.key and fc.streams == 1
    assert [a.key for a in fc.acks_for(sid)] == [first.key]


async def test_refused_event_ends_and_is_not_resent(
    tmp_path: Path, fc: FakeController, agent_and_state: tuple[Agent, Path]
) -> None:
    _, state_dir = agent_and_state
    base = f"file://{tmp_path}/work/.studios/checkpoints"
    sid = "acca0002"
    fc.refuse = {sid}
    fc.push(desired(sid, checkpoint_base_uri=base))
    await fc.wait_status(sid, pb.SESSION_STATUS_RUNNING)
    await fc.wait_for(lambda: fc.acks_for(sid), timeout=30)
    await fc.wait_for(lambda: not _outbox(state_dir), timeout=10)
    stream = await _restart(fc)
    await _written_heartbeat(fc, stream)
    assert _events(fc, sid, stream) == []


async def test_older_controller_without_acks_keeps_the_resend_window(tmp_path: Path) -> None:
    old = FakeController(acks=False)
    await old.start()
    config = make_agent_config(tmp_path, old)
    agent = Agent(config)
    await agent.start()
    sid = "acca0003"
    try:
        await old.wait_for(lambda: old.messages("inventory"))
        assert old.acked == []
        old.push(desired(sid, checkpoint_base_uri=f"file://{tmp_path}/work/.studios/checkpoints"))
        await old.wait_status(sid, pb.SESSION_STATUS_RUNNING)
        await _written(old, 1, sid)
        # Taken by the stream, never acked: kept as `.sent` for the re-send window.
        [kept] = _outbox(config.state_dir)
        assert kept.suffix == ".sent"
        stream = await _restart(old)
        await old.wait_for(lambda: _events(old, sid, stream), timeout=30)
        assert _events(old, sid, stream)[0].key == _events(old, sid, 1)[0].key
    finally:
        await agent.close()
        kill_leftover_tools(config.state_dir)
        await old.stop()


# ---------------------------------------------------------------- real processes


async def _wait(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.e2e
async def test_agent_killed_between_commit_and_ack(tmp_path: Path) -> None:
    """The first checkpoint's ack is lost after the commit; the agent is SIGKILLed while it
    still holds the event; the restarted agent re-sends it, the controller records nothing
    new and acks it, and the outbox empties. The stop's final checkpoint updates the same row."""
    stack = Stack(tmp_path, controller_env={"STUDIOS_TEST_FAULT": "drop-acks=1"})
    try:
        await stack.start()
        api = stack.api
        assert api is not None
        sid = await stack.create_studio("acked e2e")
        await stack.wait_running(sid)
        log = stack.controller.log_path

        def dropped() -> bool:
            return "test fault: dropped the ack of checkpoint" in log.read_text(errors="replace")

        await _wait(dropped, "the controller to commit the first checkpoint and drop its ack")
        [before] = await stack.checkpoints(sid)
        assert len(_outbox(stack.agent.state_dir)) == 1, "the unacked event must stay"

        stack.agent.kill()
        await stack.add_agent(state_dir=stack.agent.state_dir, proxy_port=stack.agent.proxy_port)
        await _wait(lambda: not _outbox(stack.agent.state_dir), "the outbox to empty", 60)
        assert await stack.checkpoints(sid) == [before], "the re-sent event is recorded once"

        await stack.stop_studio(sid)
        [final] = await stack.checkpoints(sid)
        assert final["id"] == before["id"] and final["status"] == "finalized"
        await _wait(lambda: not _outbox(stack.agent.state_dir), "the final event's ack", 30)
    finally:
        await stack.close()
