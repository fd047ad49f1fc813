"""Lost agents and deadlines (issue 16), with fake agents on the real gRPC stream.

An agent gone past the grace period errors its studios ("agent lost"), which can then be
deleted or started elsewhere; the agent coming back is told to stop what it still runs,
and the final checkpoint it sends is kept: the studio's own when it ran nowhere else since,
a named one otherwise, never the default restore point. A rogue agent cannot slip a
checkpoint into a studio it never ran. Starts and stops past their deadline are errored
naming the step they were stuck in. The settings are shortened on the running controller.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import select
from studios.agent.v1 import agent_pb2 as pb

from controller.models import Checkpoint, Studio
from tests.conftest import ControllerHarness
from tests.controller.conftest import AgentFactory
from tests.controller.studio_reads import deadline_settings, studio, until_status
from tests.fake_agent import FakeAgent, checkpoint_uri, observed


async def _running(
    h: ControllerHarness, agent: FakeAgent, name: str, sid: str | None = None
) -> tuple[str, pb.SessionDesired]:
    """Create (or start) a studio and have `agent` run it."""
    mark = len(agent.responses)
    if sid is None:
        _, body = await h.request(
            "POST", "/studios", {"name": name, "computeEnvId": h.compute_env_id}, expect=200
        )
        sid = str(body["studio"]["sessionId"])
    else:
        await h.request("PUT", f"/studios/{sid}/start", expect=200)
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    await agent.report(sid, desired.generation, pb.SESSION_STATUS_RUNNING, tool_port=1)
    await until_status(h, sid, "running")
    return sid, desired


async def _checkpoints(h: ControllerHarness, sid: str) -> list[Checkpoint]:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        rows = await session.scalars(
            select(Checkpoint).where(Checkpoint.session_id == sid).order_by(Checkpoint.id)
        )
        return list(rows.all())


async def test_lost_agent_errors_its_studios_which_can_be_deleted(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent("agent-1")
    await agent.connect()
    sid, _ = await _running(h, agent, "orphan")
    kept, _ = await _running(h, agent, "kept")
    deadline_settings(h).agent_lost_seconds = 1.0
    # Within the grace period a silent agent is not lost: its stream is still open here.
    await asyncio.sleep(1.5)
    assert (await studio(h, sid))["statusInfo"]["status"] == "running"
    await agent.close()
    body = await until_status(h, sid, "errored")
    message = body["statusInfo"]["message"]
    assert message.startswith("agent lost: agent-1 last seen 20"), message
    assert message.endswith("Z")
    await h.request("DELETE", f"/studios/{sid}", expect=204)
    status, _ = await h.request("GET", f"/studios/{sid}")
    assert status == 404
    # The other studio errored too, and starts again once an agent is there (not the
    # lost one: placement picks connected agents only).
    await until_status(h, kept, "errored")
    other = make_agent("agent-2")
    await other.connect()
    await _running(h, other, "kept", sid=kept)
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        row = await session.get(Studio, kept)
        assert row is not None and row.agent_id == "agent-2"


async def test_lost_agent_back_before_anything_else_stops_with_the_studios_own_checkpoint(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent("agent-1")
    await agent.connect()
    sid, desired = await _running(h, agent, "patient")
    g = desired.generation
    deadline_settings(h).agent_lost_seconds = 0.5
    await agent.close()
    await until_status(h, sid, "errored")
    # It comes back still running the session: told to stop it (no second copy anywhere).
    back = make_agent("agent-1")
    await back.connect(inventory=[observed(sid, g, pb.SESSION_STATUS_RUNNING, tool_port=1)])
    await back.wait_desired(sid, pb.DESIRED_STATUS_STOPPED)
    await back.report(sid, g, pb.SESSION_STATUS_STOPPING)
    await back.checkpoint(sid, g, "final-1")
    assert (await back.wait_ack(sid, "final-1")).result == pb.CHECKPOINT_ACK_RESULT_RECORDED
    await back.report(sid, g, pb.SESSION_STATUS_STOPPED, message="stopped")
    await until_status(h, sid, "stopped")
    rows = await _checkpoints(h, sid)
    assert [(r.key, r.recovered_from_agent) for r in rows] == [("final-1", None)]
    # ... and it is what the next start restores.
    mark = len(back.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    again = await back.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert again.restore.uri == checkpoint_uri(sid, "final-1")


async def test_lost_agent_back_after_the_studio_moved_keeps_a_named_checkpoint(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    first = make_agent("agent-1")
    await first.connect()
    sid, desired = await _running(h, first, "wanderer")
    g1 = desired.generation
    await first.checkpoint(sid, g1, "interim-1", pb.CHECKPOINT_STATUS_INTERIM)
    await first.wait_ack(sid, "interim-1")
    deadline_settings(h).agent_lost_seconds = 0.5
    await first.close()
    await until_status(h, sid, "errored")
    # Started elsewhere: the last checkpoint is restored there.
    second = make_agent("agent-2")
    await second.connect()
    sid, moved = await _running(h, second, "wanderer", sid=sid)
    g2 = moved.generation
    assert g2 == g1 + 1
    assert moved.restore.uri == checkpoint_uri(sid, "interim-1")
    await second.checkpoint(sid, g2, "interim-2", pb.CHECKPOINT_STATUS_INTERIM)
    await second.wait_ack(sid, "interim-2")

    # The lost agent returns, still running generation 1: it is told to stop it (the
    # studio runs elsewhere), not to forget it, until its final checkpoint is recorded —
    # a DELETED would drop the run's data if that checkpoint failed — and that
    # checkpoint is kept, by name; then it is told to forget it.
    back = make_agent("agent-1")
    await back.connect(inventory=[observed(sid, g1, pb.SESSION_STATUS_RUNNING, tool_port=1)])
    stop = await back.wait_desired(sid, pb.DESIRED_STATUS_STOPPED)
    assert stop.generation == g1
    assert not any(
        d.session_id == sid and d.status == pb.DESIRED_STATUS_DELETED
        for m in back.responses
        if m.HasField("desired")
        for d in m.desired.sessions
    )
    await back.report(sid, g1, pb.SESSION_STATUS_STOPPING)
    await back.checkpoint(sid, g1, "final-1", size=4321)
    ack = await back.wait_ack(sid, "final-1")
    assert ack.result == pb.CHECKPOINT_ACK_RESULT_RECORDED, ack
    mark = len(back.responses)
    await back.report(sid, g1, pb.SESSION_STATUS_STOPPED)
    await back.wait_desired(sid, pb.DESIRED_STATUS_DELETED, start=mark)
    # A copy of the event changes nothing.
    mark = len(back.responses)
    await back.checkpoint(sid, g1, "final-1", size=4321)
    assert (await back.wait_ack(sid, "final-1", start=mark)).result == (
        pb.CHECKPOINT_ACK_RESULT_RECORDED
    )

    body = await studio(h, sid)
    # Nothing the returning agent said changed the studio: one session, on agent-2.
    assert body["statusInfo"]["status"] == "running"
    rows = await _checkpoints(h, sid)
    recovered = [r for r in rows if r.recovered_from_agent]
    assert len(recovered) == 1
    assert recovered[0].name == "wanderer_(recovered_from_agent_agent-1)"
    assert (recovered[0].key, recovered[0].generation, recovered[0].size_bytes) == (
        "final-1",
        g1,
        4321,
    )
    # The run's earlier row (what generation 2 restored) is left as it was.
    interim = next(r for r in rows if r.key == "interim-1")
    assert interim.status == "interim" and interim.recovered_from_agent is None
    _, listing = await h.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert "wanderer_(recovered_from_agent_agent-1)" in {c["name"] for c in listing["checkpoints"]}

    # The default restore point stays the studio's own newest: agent-2's.
    mark = len(second.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await second.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    await second.report(sid, g2, pb.SESSION_STATUS_STOPPED)
    await until_status(h, sid, "stopped")
    mark = len(second.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    third = await second.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert third.restore.uri == checkpoint_uri(sid, "interim-2")


async def test_rogue_agents_cannot_inject_checkpoints(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    """The attack: agents that did not run a studio's generation (one that never ran the
    studio, one that ran another generation of it, the right agent naming a generation it
    did not run or another session's manifest) send a well-formed final checkpoint in the
    studio's store, hoping it is recorded. Each is refused and nothing is kept."""
    h = controller_harness
    first = make_agent("agent-1")
    await first.connect()
    sid, desired = await _running(h, first, "target")
    g1 = desired.generation
    victim, _ = await _running(h, first, "victim")
    deadline_settings(h).agent_lost_seconds = 0.5
    await first.close()
    await until_status(h, sid, "errored")
    second = make_agent("agent-2")
    await second.connect()
    sid, moved = await _running(h, second, "target", sid=sid)
    g2 = moved.generation
    rogue = make_agent("rogue")
    await rogue.connect()
    attempts: list[tuple[FakeAgent, str, int, str]] = [
        (rogue, sid, g1, "rogue-g1"),  # never ran the studio
        (rogue, sid, g2, "rogue-g2"),
        (second, sid, g1, "second-g1"),  # ran the studio, not generation 1
        (rogue, victim, 1, "rogue-victim"),
    ]
    for agent, session_id, generation, key in attempts:
        await agent.checkpoint(session_id, generation, key)
        ack = await agent.wait_ack(session_id, key)
        assert ack.result == pb.CHECKPOINT_ACK_RESULT_REFUSED, (key, ack)
    back = make_agent("agent-1")
    await back.connect()
    for session_id, generation, key, uri in (
        (sid, g2, "back-g2", None),  # the generation agent-2 runs
        (sid, g1, "back-other", checkpoint_uri(victim, "back-other")),  # another's store
    ):
        await back.checkpoint(session_id, generation, key, uri=uri)
        ack = await back.wait_ack(session_id, key)
        assert ack.result == pb.CHECKPOINT_ACK_RESULT_REFUSED, (key, ack)
    assert {r.key for r in await _checkpoints(h, sid)} == set()
    assert {r.key for r in await _checkpoints(h, victim)} == set()
    # The one it may send: its own run's final checkpoint.
    await back.checkpoint(sid, g1, "back-g1")
    assert (await back.wait_ack(sid, "back-g1")).result == pb.CHECKPOINT_ACK_RESULT_RECORDED


async def test_start_and_stop_deadlines_name_the_stuck_step(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent("agent-1")
    await agent.connect()
    _, body = await h.request(
        "POST", "/studios", {"name": "slow", "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    g = desired.generation
    restoring = pb.ProgressStep(
        name="restoring the checkpoint",
        status=pb.STEP_STATUS_IN_PROGRESS,
        message="restored 10.0 MiB of 900.0 MiB",
    )
    await agent.report(sid, g, pb.SESSION_STATUS_STARTING, progress=[restoring])
    await asyncio.sleep(0.3)
    mark = len(agent.responses)
    deadline_settings(h).starting_deadline_seconds = 0.5
    body = await until_status(h, sid, "errored")
    message = body["statusInfo"]["message"]
    assert message == (
        "start did not finish within 0.5 s: stuck in restoring the checkpoint: "
        "restored 10.0 MiB of 900.0 MiB"
    ), message
    # The agent is told to give it up.
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    await agent.report(sid, g, pb.SESSION_STATUS_STOPPED)
    await until_status(h, sid, "stopped")

    deadline_settings(h).starting_deadline_seconds = 1800
    sid, desired = await _running(h, agent, "slow", sid=sid)
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    saving = pb.ProgressStep(name="saving the final checkpoint", status=pb.STEP_STATUS_IN_PROGRESS)
    await agent.report(sid, desired.generation, pb.SESSION_STATUS_STOPPING, progress=[saving])
    deadline_settings(h).stopping_deadline_seconds = 0.5
    body = await until_status(h, sid, "errored")
    assert body["statusInfo"]["message"] == (
        "stop did not finish within 0.5 s: stuck in saving the final checkpoint"
    )
    # A stop that finishes after all is still taken.
    await agent.report(sid, desired.generation, pb.SESSION_STATUS_STOPPED)
    await until_status(h, sid, "stopped")
