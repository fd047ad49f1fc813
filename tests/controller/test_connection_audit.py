"""The connection audit (issue 13): `GET /studios/{sessionId}/connections`.

Fake agents report visits (`ConnectionVisit`) over the real gRPC stream; the controller
records them, acks each copy, and lists them newest first to workspace admins and owners
only (403 below, 404 from another workspace), also once the studio is deleted. A proxy
that restarted (a new `Hello.proxy_instance_id`) has its predecessor's open visits
closed; a rogue agent can neither record visits of another agent's studio nor touch
another agent's records.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from studios.agent.v1 import agent_pb2 as pb

from controller import agent_authorizer as authz
from controller import enrollment
from controller.models import Studio, StudioConnection, Workspace
from tests.conftest import ControllerHarness
from tests.controller.conftest import AgentFactory
from tests.controller.test_agent_service import _start_running, _wait_status
from tests.controller.test_roles import add_user
from tests.fake_agent import FakeAgent

RUN_1 = "1" * 32
RUN_2 = "2" * 32
T0 = int(time.time() * 1000) - 3_600_000


def _visit(
    sid: str,
    n: int,
    *,
    user_id: int = 1,
    user_name: str = "admin",
    opened: int = T0,
    closed: int = 0,
    run: str = RUN_1,
    address: str = "127.0.0.1",
) -> pb.ConnectionVisit:
    return pb.ConnectionVisit(
        # Unique per studio (scenarios share one database on PostgreSQL).
        visit_id=f"{sid[:8]}{n:024x}",
        session_id=sid,
        user_id=user_id,
        user_name=user_name,
        client_address=address,
        opened_at_ms=opened,
        closed_at_ms=closed,
        proxy_instance_id=run,
    )


async def _connections(
    h: ControllerHarness, sid: str, query: str = "", token: str = "admin", expect: int = 200
) -> Any:
    _, body = await h.request(
        "GET", f"/studios/{sid}/connections{query}", token=token, expect=expect
    )
    return body


def _iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


async def _rows(h: ControllerHarness, sid: str) -> list[StudioConnection]:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        query = select(StudioConnection).where(StudioConnection.session_id == sid)
        return list((await session.scalars(query)).all())


async def _agent(make_agent: AgentFactory, agent_id: str, run: str) -> FakeAgent:
    agent = make_agent(agent_id, proxy_instance_id=run)
    await agent.connect()
    assert agent.welcome is not None and agent.welcome.connection_visits
    return agent


async def test_visits_are_listed_newest_first_and_paginated(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    await _listed_newest_first(controller_harness, make_agent)


async def _listed_newest_first(h: ControllerHarness, make_agent: AgentFactory) -> None:
    agent = await _agent(make_agent, "agent-1", RUN_1)
    sid, _gen = await _start_running(h, agent, name="listed")
    assert await _connections(h, sid) == {"connections": [], "totalSize": 0}

    bob_id, _ = await add_user(h, f"bob-{sid}", "connect")
    first = await agent.visit(_visit(sid, 1, opened=T0))
    assert (first.visit_id, first.closed_at_ms, first.refused) == (f"{sid}{1:024x}", 0, False)
    await agent.visit(
        _visit(sid, 2, user_id=bob_id, user_name="bob", opened=T0 + 10_000, address="::1")
    )
    # A copy changes nothing; the close fills in the end.
    await agent.visit(_visit(sid, 1, opened=T0))
    closed = await agent.visit(_visit(sid, 1, opened=T0, closed=T0 + 65_400))
    assert (closed.closed_at_ms, closed.refused) == (T0 + 65_400, False)

    body = await _connections(h, sid)
    assert body["totalSize"] == 2
    newest, oldest = body["connections"]
    assert newest["user"] == {"id": bob_id, "userName": f"bob-{sid}"}
    assert newest["clientAddress"] == "::1"
    assert _iso_ms(newest["openedAt"]) == T0 + 10_000
    # Open: no closedAt and no duration (absent, not null).
    assert "closedAt" not in newest and "durationSeconds" not in newest
    assert oldest["user"] == {"id": 1, "userName": "admin"}
    assert oldest["clientAddress"] == "127.0.0.1"
    assert (_iso_ms(oldest["openedAt"]), _iso_ms(oldest["closedAt"])) == (T0, T0 + 65_400)
    assert oldest["durationSeconds"] == 65
    assert "closedBy" not in oldest

    page = await _connections(h, sid, "?max=1&offset=1")
    assert page["totalSize"] == 2
    assert [c["id"] for c in page["connections"]] == [oldest["id"]]
    assert (await _connections(h, sid, "?max=1"))["connections"][0]["id"] == newest["id"]
    assert (await _connections(h, sid, "?offset=5"))["connections"] == []
    await _connections(h, sid, "?max=1001", expect=400)


async def test_only_admins_and_owners_see_the_audit(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = await _agent(make_agent, "agent-1", RUN_1)
    sid, _gen = await _start_running(h, agent)
    await agent.visit(_visit(sid, 1))
    tokens = {}
    for role in ("owner", "admin", "maintain", "launch", "connect", "view"):
        _, tokens[role] = await add_user(h, f"user-{role}", role)
    for role in ("owner", "admin"):
        body = await _connections(h, sid, token=tokens[role])
        assert body["totalSize"] == 1, role
    for role in ("maintain", "launch", "connect", "view"):
        _, body = await h.request(
            "GET", f"/studios/{sid}/connections", token=tokens[role], expect=403
        )
        assert "role" in body["message"], body

    # Outside the workspace: 404, whether by role or by the workspaceId asked for.
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        session.add(Workspace(id=2, org_id=1, name="elsewhere"))
    _, stranger = await add_user(h, "stranger", "owner", workspace_id=2)
    await _connections(h, sid, token=stranger, expect=404)
    await _connections(h, sid, "?workspaceId=2", expect=404)
    await _connections(h, sid, "?workspaceId=1", expect=200)
    await _connections(h, "0badc0de", expect=404)
    await _connections(h, "not-an-id", expect=404)
    await h.request("GET", f"/studios/{sid}/connections", token=None, expect=401)

    # A private studio admins may not connect to is still theirs to audit.
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        studio = await session.get(Studio, sid)
        assert studio is not None
        studio.is_private = True
    assert (await _connections(h, sid, token=tokens["admin"]))["totalSize"] == 1


async def test_the_audit_outlives_the_studio(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = await _agent(make_agent, "agent-1", RUN_1)
    sid, gen = await _start_running(h, agent, name="short lived")
    await agent.visit(_visit(sid, 1))
    await agent.visit(_visit(sid, 2, opened=T0 + 1000))

    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED)
    await agent.report(sid, gen, pb.SESSION_STATUS_STOPPED)
    await _wait_status(h, sid, "stopped")
    # The stop ended the visit; its close may come after the delete.
    await agent.visit(_visit(sid, 1, closed=T0 + 5000))
    await h.request("DELETE", f"/studios/{sid}", expect=204)
    await h.request("GET", f"/studios/{sid}", expect=404)
    late = await agent.visit(_visit(sid, 2, opened=T0 + 1000, closed=T0 + 9000))
    assert not late.refused, late.message

    body = await _connections(h, sid)
    assert body["totalSize"] == 2
    assert [c["durationSeconds"] for c in body["connections"]] == [8, 5]
    _, maintainer = await add_user(h, "maintainer", "maintain")
    await _connections(h, sid, token=maintainer, expect=403)
    (row, _other) = sorted(await _rows(h, sid), key=lambda r: r.visit_id)
    assert row.studio_name == "short lived"


async def test_the_audit_goes_with_its_workspace(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = await _agent(make_agent, "agent-1", RUN_1)
    sid, gen = await _start_running(h, agent, name="in a workspace")
    await agent.visit(_visit(sid, 1))
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED)
    await agent.report(sid, gen, pb.SESSION_STATUS_STOPPED)
    await _wait_status(h, sid, "stopped")
    assert len(await _rows(h, sid)) == 1

    await h.request("DELETE", "/orgs/1/workspaces/1", expect=204)
    assert await _rows(h, sid) == []
    # A close that arrives later does not bring the record back.
    late = await agent.visit(_visit(sid, 1, closed=T0 + 5000))
    assert late.refused and "workspace" in late.message and "deleted" in late.message
    assert await _rows(h, sid) == []


async def test_revoking_an_agent_closes_the_visits_it_left_open(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = await _agent(make_agent, "agent-1", RUN_1)
    sid, _gen = await _start_running(h, agent, name="revoked host")
    await agent.visit(_visit(sid, 1))
    await agent.visit(_visit(sid, 2, closed=T0 + 2000))
    assert h.controller is not None and h.controller.db is not None
    revoked = await enrollment.revoke_agent(h.controller.db, "agent-1")

    closed = {
        c["clientAddress"] + str(c.get("closedBy")): c
        for c in (await _connections(h, sid))["connections"]
    }
    by_revocation = closed["127.0.0.1agentRevoked"]
    assert _iso_ms(by_revocation["closedAt"]) == int(revoked.revoked_at.timestamp() * 1000)
    # A visit the proxy closed itself keeps its own close.
    assert _iso_ms(closed["127.0.0.1None"]["closedAt"]) == T0 + 2000


async def test_a_restarted_proxy_closes_the_visits_its_predecessor_left_open(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    await _restarted_proxy(controller_harness, make_agent)


async def _restarted_proxy(h: ControllerHarness, make_agent: AgentFactory) -> None:
    agent = await _agent(make_agent, "agent-1", RUN_1)
    sid, _gen = await _start_running(h, agent, name="restarted")
    await agent.visit(_visit(sid, 1))
    await agent.visit(_visit(sid, 2, closed=T0 + 2000))

    # The stream breaks, the same proxy run reconnects: nothing is closed.
    await agent.close()
    again = await _agent(make_agent, "agent-1", RUN_1)
    body = await _connections(h, sid)
    assert ["closedAt" in c for c in body["connections"]] == [True, False]

    # The agent restarts (a new proxy run): its predecessor's open visit ended with it.
    await again.close()
    before = time.time() * 1000
    restarted = await _agent(make_agent, "agent-1", RUN_2)
    # (Both opened at T0: the later recorded first.)
    visit_2, visit_1 = (await _connections(h, sid))["connections"]
    assert _iso_ms(visit_2["closedAt"]) == T0 + 2000 and "closedBy" not in visit_2
    assert visit_1["closedBy"] == "agentRestart"
    assert _iso_ms(visit_1["closedAt"]) >= before - 1000

    # An open copy of the old run, sent late from the agent's outbox, is recorded closed;
    # a real close from the outbox replaces the time the controller guessed.
    await restarted.visit(_visit(sid, 3, opened=T0 + 3000, run=RUN_1))
    await restarted.visit(_visit(sid, 1, closed=T0 + 7000, run=RUN_1))
    # The new run's open visits stay open.
    await restarted.visit(_visit(sid, 4, opened=T0 + 4000, run=RUN_2))
    rows = {r.visit_id[-1]: r for r in await _rows(h, sid)}
    assert rows["3"].closed_by == "agentRestart" and rows["3"].closed_at is not None
    assert rows["1"].closed_by is None
    assert _iso_ms((await _connections(h, sid))["connections"][-1]["closedAt"]) == T0 + 7000
    assert rows["4"].closed_at is None


async def test_a_rogue_agent_can_neither_record_nor_touch_another_agents_visits(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    await _rogue_agent(controller_harness, make_agent)


async def _rogue_agent(h: ControllerHarness, make_agent: AgentFactory) -> None:
    victim = await _agent(make_agent, "agent-1", RUN_1)
    sid, _gen = await _start_running(h, victim, name="victim")
    await victim.visit(_visit(sid, 1))

    rogue = await _agent(make_agent, "agent-2", RUN_2)
    # A visit to a studio placed on another agent: refused (acked so, never recorded).
    forged = await rogue.visit(_visit(sid, 9, user_id=1, address="10.6.6.6"))
    assert forged.refused and "placed on agent agent-1" in forged.message
    # Closing (or re-addressing) the victim's visit by its id: not the rogue's record.
    spoof = await rogue.visit(_visit(sid, 1, closed=T0 + 1, address="10.6.6.6", run=RUN_2))
    assert spoof.refused
    # An unknown session.
    ghost = await rogue.visit(_visit("dead0000", 8))
    assert ghost.refused and "unknown" in ghost.message

    (row,) = await _rows(h, sid)
    assert (row.agent_id, row.closed_at, row.client_address) == ("agent-1", None, "127.0.0.1")
    body = await _connections(h, sid)
    assert body["totalSize"] == 1 and "closedAt" not in body["connections"][0]

    # Malformed reports are refused too, from the right agent.
    for bad in (
        _visit(sid, 5, address="not an address"),
        pb.ConnectionVisit(visit_id="zz", session_id=sid, user_id=1, opened_at_ms=T0),
        _visit(sid, 6, user_id=0),
        _visit(sid, 6, user_id=2**31),
        _visit(sid + "\x00", 6),
        _visit(sid, 6, run="\x00" * 8),
        _visit(sid, 7, opened=0),
        _visit(sid, 8, closed=1 << 62),
    ):
        assert (await victim.visit(bad)).refused, bad
    # A visit id names one session: another session's copy of it is refused.
    # So that the next studio is placed on the victim: the controller must have seen the
    # rogue's stream end, or placement may still pick it (it runs fewer studios).
    await rogue.close()
    assert h.controller is not None
    deadline = time.monotonic() + 10
    while h.controller.hub.is_connected("agent-2"):
        assert time.monotonic() < deadline, "the controller never saw agent-2 disconnect"
        await asyncio.sleep(0.02)
    other, _ = await _start_running(h, victim, name="other studio")
    moved = _visit(other, 1, closed=T0 + 1)
    moved.visit_id = _visit(sid, 1).visit_id
    assert (await victim.visit(moved)).refused
    assert len(await _rows(h, sid)) == 1 and await _rows(h, other) == []


async def test_on_postgresql(tmp_path: Path, postgres_database: str) -> None:
    """The same recording and listing against a real PostgreSQL (`postgres_url` in
    tests/conftest.py says which): its locks, its stricter types."""
    h = ControllerHarness(tmp_path / "data", database_url=postgres_database)
    await h.start()
    agents: list[FakeAgent] = []

    def make_agent(agent_id: str = "agent-1", **kwargs: Any) -> FakeAgent:
        agent = FakeAgent(
            h.grpc_target,
            h.agent_token,
            agent_id=agent_id,
            compute_env_id=h.compute_env_id,
            **kwargs,
        )
        agents.append(agent)
        return agent

    try:
        await _listed_newest_first(h, make_agent)
        for agent in agents:
            await agent.close()
        await _restarted_proxy(h, make_agent)
        for agent in agents:
            await agent.close()
        await _rogue_agent(h, make_agent)
    finally:
        for agent in agents:
            await agent.close()
        await h.close()


def test_the_rule_for_new_visits() -> None:
    studio = Studio(session_id="aaaa0001", agent_id="agent-a", deleted=False)
    assert authz.connection_visit("agent-a", "aaaa0001", studio).accepted
    assert authz.connection_visit("agent-b", "aaaa0001", studio).foreign
    assert not authz.connection_visit("agent-a", "aaaa0001", None).accepted
    studio.deleted = True  # still placed there: its late reports are heard
    assert authz.connection_visit("agent-a", "aaaa0001", studio).accepted
    assert not authz.connection_visit("agent-b", "aaaa0001", studio).accepted
    studio.agent_id = None
    assert not authz.connection_visit("agent-a", "aaaa0001", studio).accepted
