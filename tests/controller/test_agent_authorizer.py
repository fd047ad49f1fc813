"""Which agent may say what (issue 12, the node-authorizer idea).

A rogue agent (another agent's stream) reports state, connections and checkpoints for a
studio placed on the first agent: nothing of it is applied, each is logged with the
agent, the session and the reason. The right agent's checkpoint events are recorded only
when their URI is a manifest of that session in the studio's compute-environment store,
and a restore point outside the store is never sent: the start errors instead.

Two levels: `ObservationHandler` and `build_desired_state` on a real (SQLite) database,
and the real controller in process with fake agents (real gRPC clients) as the rogue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from studios.agent.v1 import agent_pb2 as pb

from controller import agent_authorizer as authz
from controller.agent_hub import AgentStream
from controller.bootstrap import bootstrap
from controller.db import Database
from controller.desired import build_desired_state, session_desired
from controller.models import Agent, Checkpoint, ComputeEnv, Studio
from controller.mounts import DataLinkMountSpec
from controller.observed import ObservationHandler
from tests.conftest import ControllerHarness
from tests.fake_agent import FakeAgent

RECORDED = pb.CHECKPOINT_ACK_RESULT_RECORDED
REFUSED = pb.CHECKPOINT_ACK_RESULT_REFUSED
FINALIZED = pb.CHECKPOINT_STATUS_FINALIZED
INTERIM = pb.CHECKPOINT_STATUS_INTERIM

ENV = "e000000000000001"
WORK = "s3://victim-bucket/work"
STORE = f"{WORK}/.studios/checkpoints"
SID = "aaaa0001"
OTHER = "bbbb0002"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'authz.db'}")
    await database.migrate()
    (tmp_path / "data").mkdir()
    await bootstrap(database, tmp_path / "data")
    async with database.transaction() as s:
        s.add(ComputeEnv(id=ENV, workspace_id=1, name="e", platform="studio-agent", work_dir=WORK))
        for sid in (SID, OTHER):
            s.add(
                Studio(
                    session_id=sid,
                    workspace_id=1,
                    user_id=1,
                    name=f"studio {sid}",
                    template_repository="t",
                    tool="t",
                    compute_env_id=ENV,
                    status="running",
                    desired_status="running",
                    generation=2,
                    agent_id="agent-a",
                    tool_port=41000,
                )
            )
    try:
        yield database
    finally:
        await database.close()


def _stream(agent_id: str) -> AgentStream:
    return AgentStream(agent_id=agent_id, compute_env_id=ENV)


async def _studio(db: Database, sid: str = SID) -> Studio:
    async with db.transaction() as s:
        studio = await s.get(Studio, sid)
        assert studio is not None
        s.expunge(studio)
        return studio


async def _checkpoints(db: Database, sid: str = SID) -> list[Checkpoint]:
    async with db.transaction() as s:
        return list((await s.scalars(select(Checkpoint).where(Checkpoint.session_id == sid))).all())


def _event(
    uri: str, generation: int = 2, key: str = "k1", status: int = FINALIZED, sid: str = SID
) -> pb.CheckpointEvent:
    return pb.CheckpointEvent(
        session_id=sid,
        generation=generation,
        key=f"manifests/{sid}/{key}",
        uri=uri,
        status=status,  # type: ignore[arg-type]
        size_bytes=10,
        saved_at=1_700_000_000,
    )


def _warned(caplog: pytest.LogCaptureFixture, *parts: str) -> bool:
    return any(
        r.levelno == logging.WARNING and all(p in r.getMessage() for p in parts)
        for r in caplog.records
    )


# ---------------------------------------------------------------- observed state


async def test_a_rogue_agents_state_report_is_ignored_and_logged(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    handler = ObservationHandler(db)
    rogue = _stream("agent-b")
    caplog.set_level(logging.DEBUG, "controller")
    for status in (pb.SESSION_STATUS_ERRORED, pb.SESSION_STATUS_STOPPED):
        obs = pb.SessionObserved(
            session_id=SID, generation=2, status=status, message="pwned", tool_port=1, root_dir="/x"
        )
        # The rogue is told to forget the session (DELETED, never its spec).
        assert await handler.session_observed(rogue, obs) == {SID}
    studio = await _studio(db)
    assert (studio.status, studio.status_message) == ("running", None)
    assert (studio.tool_port, studio.root_dir) == (41000, None)
    assert SID in rogue.foreign_sessions
    assert _warned(caplog, "agent-b", SID, "placed on agent agent-a")

    # In an inventory too; and the rogue's inventory loses nothing of agent-a's.
    await handler.inventory(
        rogue, pb.Inventory(sessions=[pb.SessionObserved(session_id=SID, generation=2)])
    )
    assert (await _studio(db)).status == "running"
    assert (await _studio(db, OTHER)).status == "running"

    # An unknown session: ignored, logged, the agent told to forget it.
    caplog.clear()
    ghost = pb.SessionObserved(
        session_id="dead0000", generation=1, status=pb.SESSION_STATUS_RUNNING
    )
    assert await handler.session_observed(rogue, ghost) == {"dead0000"}
    assert _warned(caplog, "agent-b", "dead0000", "unknown to the controller")


async def test_the_placed_agent_is_heard_for_the_current_generation_only(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    handler = ObservationHandler(db)
    a = _stream("agent-a")
    caplog.set_level(logging.DEBUG, "controller")
    old = pb.SessionObserved(session_id=SID, generation=1, status=pb.SESSION_STATUS_ERRORED)
    assert await handler.session_observed(a, old) == set()
    assert (await _studio(db)).status == "running"
    future = pb.SessionObserved(session_id=SID, generation=3, status=pb.SESSION_STATUS_ERRORED)
    assert await handler.session_observed(a, future) == set()
    assert (await _studio(db)).status == "running"
    assert _warned(caplog, "agent-a", SID, "generation 3 is newer")
    assert SID not in a.foreign_sessions
    now = pb.SessionObserved(
        session_id=SID, generation=2, status=pb.SESSION_STATUS_ERRORED, message="tool died"
    )
    await handler.session_observed(a, now)
    studio = await _studio(db)
    assert (studio.status, studio.status_message) == ("errored", "tool died")


async def test_a_deleted_studio_still_placed_here_is_forgotten_quietly(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async with db.transaction() as s:
        studio = await s.get(Studio, SID)
        assert studio is not None
        studio.deleted, studio.status, studio.desired_status = True, "stopped", "deleted"
    caplog.set_level(logging.DEBUG, "controller")
    a = _stream("agent-a")
    obs = pb.SessionObserved(session_id=SID, generation=2, status=pb.SESSION_STATUS_STOPPED)
    assert await ObservationHandler(db).session_observed(a, obs) == {SID}
    assert SID in a.foreign_sessions
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_rogue_agents_connections_are_ignored(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    handler = ObservationHandler(db)
    conns = pb.SessionConnections(
        session_id=SID,
        connections=[pb.ActiveConnection(user_id=1, user_name="admin", last_active=1)],
    )
    await handler.connections(_stream("agent-b"), conns)
    assert (await _studio(db)).active_connections == []
    assert _warned(caplog, "agent-b", SID, "connections")
    await handler.connections(_stream("agent-a"), conns)
    assert [c["id"] for c in (await _studio(db)).active_connections] == [1]


# ---------------------------------------------------------------- a replaced stream


async def test_an_inventory_of_a_replaced_stream_declares_nothing_lost(db: Database) -> None:
    """An agent reconnects; its old stream's Inventory, read before and applied after,
    leaves out a studio the new stream has started since: it must not error it (CI saw
    "session lost" for a start the agent had just reported running)."""
    handler = ObservationHandler(db)
    old = _stream("agent-a")
    old.replaced.set()
    assert await handler.inventory(old, pb.Inventory()) == set()
    assert (await _studio(db)).status == "running"
    stopped = pb.SessionObserved(session_id=SID, generation=2, status=pb.SESSION_STATUS_STOPPED)
    assert await handler.session_observed(old, stopped) == set()
    assert (await _studio(db)).status == "running"

    # The same messages on the live stream are applied: the studio is lost there.
    assert await handler.inventory(_stream("agent-a"), pb.Inventory()) == {SID, OTHER}
    lost = await _studio(db)
    assert lost.status == "errored" and "session lost" in (lost.status_message or "")


async def test_an_inventory_of_a_stream_another_controller_took_over_is_ignored(
    db: Database,
) -> None:
    """Several controllers: the agent reconnected to ctl-b while ctl-a still applied a
    message of its old stream. The agent's row names the holder."""
    async with db.transaction() as s:
        s.add(Agent(agent_id="agent-a", compute_env_id=ENV, controller_id="ctl-b"))
    handler = ObservationHandler(db)
    at_a = _stream("agent-a")
    at_a.controller_id = "ctl-a"
    assert await handler.inventory(at_a, pb.Inventory()) == set()
    assert (await _studio(db)).status == "running"

    at_b = _stream("agent-a")
    at_b.controller_id = "ctl-b"
    assert await handler.inventory(at_b, pb.Inventory()) == {SID, OTHER}
    assert (await _studio(db)).status == "errored"


# ---------------------------------------------------------------- checkpoint events


async def test_a_checkpoint_from_an_agent_that_does_not_run_the_studio_is_refused(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    handler = ObservationHandler(db)
    ack = await handler.checkpoint(_stream("agent-b"), _event(f"{STORE}/manifests/{SID}/k1"))
    assert ack.result == REFUSED and "placed on agent agent-a" in ack.message
    assert await _checkpoints(db) == []
    assert _warned(caplog, "agent-b", SID, "checkpoint")


@pytest.mark.parametrize(
    "uri",
    [
        # the attack seen: a store outside the compute environment
        f"s3://attacker-bucket/work/.studios/checkpoints/manifests/{SID}/k1",
        f"file:///work/.studios/checkpoints/manifests/{SID}/k1",
        # another session's manifests in the right store
        f"{STORE}/manifests/{OTHER}/k1",
        # detours
        f"{STORE}/manifests/{SID}/../{OTHER}/k1",
        f"{STORE}/../../../attacker/.studios/checkpoints/manifests/{SID}/k1",
        f"{STORE}x/manifests/{SID}/k1",
        # not a manifest (the archive format is only read any more, never written)
        f"{STORE}/{SID}/20240101T000000Z-ab.tar.gz",
        f"{STORE}/data/ab/abcdef",
        "",
    ],
)
async def test_a_checkpoint_outside_the_sessions_store_is_refused(db: Database, uri: str) -> None:
    ack = await ObservationHandler(db).checkpoint(_stream("agent-a"), _event(uri))
    assert ack.result == REFUSED and "outside the compute environment's store" in ack.message
    assert await _checkpoints(db) == []


async def test_the_placed_agents_checkpoints_in_the_store_are_recorded(db: Database) -> None:
    handler = ObservationHandler(db)
    a = _stream("agent-a")
    ack = await handler.checkpoint(a, _event(f"{STORE}/manifests/{SID}/k1", status=INTERIM))
    assert ack.result == RECORDED
    # A late event of an ended run of the same agent is still its own.
    ack = await handler.checkpoint(a, _event(f"{STORE}/manifests/{SID}/k0", generation=1, key="k0"))
    assert ack.result == RECORDED
    # A run that has not started yet is nobody's.
    ack = await handler.checkpoint(a, _event(f"{STORE}/manifests/{SID}/k9", generation=3))
    assert ack.result == REFUSED and "generation 3 is newer" in ack.message
    assert sorted((c.generation, c.uri) for c in await _checkpoints(db)) == [
        (1, f"{STORE}/manifests/{SID}/k0"),
        (2, f"{STORE}/manifests/{SID}/k1"),
    ]


def test_decisions_without_a_database() -> None:
    studio = Studio(session_id=SID, agent_id="agent-a", generation=2, deleted=False)
    env = ComputeEnv(id=ENV, work_dir=WORK)
    good = f"{STORE}/manifests/{SID}/k"
    assert authz.checkpoint_event("agent-a", SID, 2, good, studio, env).accepted
    assert not authz.checkpoint_event("agent-a", SID, 2, good, studio, None).accepted
    assert not authz.checkpoint_event("agent-a", SID, 2, good, None, env).accepted
    unplaced = Studio(session_id=SID, agent_id=None, generation=2, deleted=False)
    refused = authz.checkpoint_event("agent-a", SID, 2, good, unplaced, env)
    assert not refused.accepted and "placed on no agent" in refused.reason
    assert authz.session_observed("agent-a", SID, 1, studio).verdict is authz.Verdict.STALE
    assert authz.connections("agent-b", SID, studio).foreign


# ---------------------------------------------------------------- what the controller sends


async def _with_restore(db: Database, sid: str, uri: str, *, status: str = "starting") -> int:
    async with db.transaction() as s:
        row = Checkpoint(
            session_id=sid, name=f"{sid}_1", key="k", uri=uri, status="finalized", generation=1
        )
        s.add(row)
        await s.flush()
        studio = await s.get(Studio, sid)
        assert studio is not None
        studio.status, studio.restore_checkpoint_id = status, row.id
        return row.id


async def test_a_restore_point_outside_the_store_errors_the_start_and_is_never_sent(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # A row an older controller recorded from a client that did not run the studio.
    evil = f"s3://attacker-bucket/.studios/checkpoints/manifests/{SID}/k"
    await _with_restore(db, SID, evil)
    # A clone's parent checkpoint in the same store restores (another session's manifest).
    good = f"{STORE}/manifests/{SID}/k2"
    await _with_restore(db, OTHER, good)
    async with db.transaction() as s:
        desired = await build_desired_state(s, "agent-a", full=True)
    sent = {d.session_id: d for d in desired.sessions}
    assert sent[SID].status == pb.DESIRED_STATUS_STOPPED and not sent[SID].HasField("restore")
    assert "attacker-bucket" not in str(desired)
    assert sent[OTHER].status == pb.DESIRED_STATUS_RUNNING and sent[OTHER].restore.uri == good
    studio = await _studio(db)
    assert (studio.status, studio.desired_status) == ("errored", "stopped")
    assert studio.status_message is not None
    assert "lies outside the compute environment's checkpoint store" in studio.status_message
    assert evil in studio.status_message and "not restored" in studio.status_message
    assert _warned(caplog, SID, "start refused")


async def test_a_running_session_is_not_errored_for_its_restore_point(db: Database) -> None:
    await _with_restore(db, SID, "s3://elsewhere/manifests/x/k", status="running")
    async with db.transaction() as s:
        desired = await build_desired_state(s, "agent-a", full=False, session_ids=[SID])
    [sent] = desired.sessions
    assert sent.status == pb.DESIRED_STATUS_RUNNING and not sent.HasField("restore")
    assert (await _studio(db)).status == "running"


def test_data_link_keys_travel_only_with_a_start() -> None:
    link = DataLinkMountSpec(
        data_link_id="d",
        mount_name="m",
        resource_ref="s3://b",
        read_only=True,
        region="",
        endpoint="",
        access_key_id="AKIAONLYWITHASTART",
        secret_access_key="only-with-a-start",
    )
    assert "only-with-a-start" not in repr(link)
    studio = Studio(
        session_id=SID,
        generation=2,
        deleted=False,
        desired_status="running",
        name="s",
        template_repository="t",
        tool="t",
        configuration={},
    )
    assert session_desired(studio, None, None, [link]).spec.data_links[0].secret_access_key
    for desired_status, deleted in (("stopped", False), ("deleted", True)):
        studio.desired_status, studio.deleted = desired_status, deleted
        assert not session_desired(studio, None, None, [link]).spec.data_links


# ---------------------------------------------------------------- a rogue agent on the wire


@pytest.fixture
async def agents(controller_harness: ControllerHarness) -> AsyncIterator[list[FakeAgent]]:
    started: list[FakeAgent] = []
    yield started
    for agent in started:
        await agent.close()


async def _agent(
    h: ControllerHarness,
    started: list[FakeAgent],
    agent_id: str,
    inventory: list[pb.SessionObserved] | None = None,
) -> FakeAgent:
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id=agent_id, compute_env_id=h.compute_env_id
    )
    started.append(agent)
    await agent.connect(inventory=inventory or [])
    return agent


async def _status(h: ControllerHarness, sid: str) -> dict[str, Any]:
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    return dict(body["statusInfo"])


async def _wait_status(h: ControllerHarness, sid: str, status: str) -> dict[str, Any]:
    for _ in range(200):
        info = await _status(h, sid)
        if info["status"] == status:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"studio {sid} is {info}, not {status}")


async def test_a_rogue_agent_cannot_change_a_studio_or_plant_its_next_restore(
    controller_harness: ControllerHarness,
    agents: list[FakeAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = controller_harness
    store = "file:///tmp/work/.studios/checkpoints"  # the harness's compute environment
    victim = await _agent(h, agents, "victim-agent")
    _, body = await h.request(
        "POST", "/studios", {"name": "victim", "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = str(body["studio"]["sessionId"])
    wanted = await victim.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    gen = wanted.generation
    await victim.report(sid, gen, pb.SESSION_STATUS_RUNNING, tool_port=41000)
    await _wait_status(h, sid, "running")

    rogue = await _agent(h, agents, "rogue-agent")
    mark = len(rogue.responses)
    await rogue.report(sid, gen, pb.SESSION_STATUS_ERRORED, message="pwned")
    await rogue.report(sid, gen, pb.SESSION_STATUS_STOPPED)
    # The rogue is told to forget the session: DELETED, without its spec.
    told = await rogue.wait_desired(sid, pb.DESIRED_STATUS_DELETED, start=mark)
    assert not told.HasField("spec")
    # The forged final checkpoint of the attack: the wrong agent, a store of its own.
    planted = f"file:///tmp/attacker/.studios/checkpoints/manifests/{sid}/evil"
    await rogue.checkpoint(sid, gen, "manifests/evil", FINALIZED, uri=planted)
    ack = await rogue.wait_ack(sid, "manifests/evil")
    assert ack.result == REFUSED and "placed on agent victim-agent" in ack.message
    # The right agent, but outside the store, or another session's manifest.
    for key, uri in (
        ("manifests/a", planted),
        ("manifests/b", f"{store}/manifests/{sid}/../deadbeef/x"),
        ("manifests/c", f"{store}/manifests/deadbeef/x"),
    ):
        await victim.checkpoint(sid, gen, key, INTERIM, uri=uri)
        assert (await victim.wait_ack(sid, key)).result == REFUSED
    info = await _status(h, sid)
    assert info["status"] == "running" and "pwned" not in str(info)
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert body["checkpoints"] == []
    assert _warned(caplog, "rogue-agent", sid, "placed on agent victim-agent")

    # The victim stops (its final checkpoint in the store), and the next start
    # restores that one, never the planted one.
    mine = f"{store}/manifests/{sid}/final"
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await victim.checkpoint(sid, gen, f"manifests/{sid}/final", FINALIZED, uri=mine)
    assert (await victim.wait_ack(sid, f"manifests/{sid}/final")).result == RECORDED
    await victim.report(sid, gen, pb.SESSION_STATUS_STOPPED)
    await _wait_status(h, sid, "stopped")
    await rogue.checkpoint(sid, gen, "manifests/late", FINALIZED, uri=planted)
    assert (await rogue.wait_ack(sid, "manifests/late")).result == REFUSED
    mark = len(victim.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    started = await victim.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert started.restore.uri == mine


async def test_data_link_keys_never_reach_a_log(
    controller_harness: ControllerHarness,
    agents: list[FakeAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.controller.test_datalinks import ACCESS_KEY, SECRET_KEY, add_credentials, add_link

    h = controller_harness
    caplog.set_level(logging.DEBUG)
    cred = await add_credentials(h, "keys")
    link = await add_link(h, "linked", "s3://linked-bucket", cred)
    agent = await _agent(h, agents, "keys-agent")
    bystander = await _agent(h, agents, "bystander-agent")
    _, body = await h.request(
        "POST",
        "/studios",
        {
            "name": "keys",
            "computeEnvId": h.compute_env_id,
            "configuration": {"mountDataV2": [{"dataLinkId": link["id"]}]},
        },
        expect=200,
    )
    sid = str(body["studio"]["sessionId"])
    # Whichever agent the studio is placed on gets the keys, in the start's spec only.
    runner = None
    for _ in range(100):
        for a in (agent, bystander):
            for msg in a.responses:
                if msg.HasField("desired") and any(
                    d.session_id == sid and d.status == pb.DESIRED_STATUS_RUNNING
                    for d in msg.desired.sessions
                ):
                    runner = a
        if runner is not None:
            break
        await asyncio.sleep(0.05)
    assert runner is not None
    other = bystander if runner is agent else agent
    wanted = await runner.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    assert wanted.spec.data_links[0].secret_access_key == SECRET_KEY
    assert not any(SECRET_KEY in str(m) or ACCESS_KEY in str(m) for m in other.responses)

    await runner.report(sid, wanted.generation, pb.SESSION_STATUS_RUNNING, tool_port=41000)
    await _wait_status(h, sid, "running")
    # A later copy of the running session's state (a reconnect's full set) has no keys.
    await runner.close()
    runner = await _agent(
        h,
        agents,
        runner.agent_id,
        [
            pb.SessionObserved(
                session_id=sid, generation=wanted.generation, status=pb.SESSION_STATUS_RUNNING
            )
        ],
    )
    again = await runner.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, full=True)
    assert not again.spec.data_links
    mark = len(runner.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    stop = await runner.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    assert not stop.spec.data_links
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert SECRET_KEY not in text and ACCESS_KEY not in text, record
