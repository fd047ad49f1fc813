"""The connect access feed: `SessionDesired.access` lists exactly who may connect, and
every change that narrows (or widens) it reaches the agent within a couple of seconds.

Who "may connect" is checked against the connect endpoint itself: for every user,
membership in the list must equal "GET /studios/{id}/connect answers 302".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from studios.agent.v1 import agent_pb2 as pb

from controller.auth import hash_token, new_token
from controller.models import ApiToken, Participant, User
from tests.conftest import ControllerHarness
from tests.fake_agent import FakeAgent

WSP = "/orgs/1/workspaces/1"
# "Within seconds": the push is immediate; allow for a slow CI machine.
PROMPT = 3.0


@pytest.fixture
async def agent(controller_harness: ControllerHarness) -> AsyncIterator[FakeAgent]:
    h = controller_harness
    fake = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="agent-1", compute_env_id=h.compute_env_id
    )
    await fake.connect()
    yield fake
    await fake.close()


async def add_user(h: ControllerHarness, name: str, role: str | None) -> tuple[int, str]:
    """A user (with a direct role in workspace 1 unless None) and their API token."""
    assert h.controller is not None and h.controller.db is not None
    token = new_token()
    async with h.controller.db.transaction() as session:
        user = User(user_name=name, email=f"{name}@example.org")
        session.add(user)
        await session.flush()
        if role is not None:
            session.add(Participant(workspace_id=1, user_id=user.id, role=role))
        session.add(ApiToken(user_id=user.id, name="test", token_hash=hash_token(token)))
        return user.id, token


async def participant_id(
    h: ControllerHarness, *, member: int | None = None, team: int | None = None
) -> int:
    _, body = await h.request("GET", f"{WSP}/participants", expect=200)
    for p in body["participants"]:
        if (member is not None and p.get("memberId") == member) or (
            team is not None and p.get("teamId") == team
        ):
            return int(p["participantId"])
    raise AssertionError(f"no participant for member {member} / team {team}")


async def start_running(
    h: ControllerHarness, agent: FakeAgent, name: str, token: str = "admin", **extra: object
) -> str:
    _, body = await h.request(
        "POST",
        "/studios",
        {"name": name, "computeEnvId": h.compute_env_id, **extra},
        token=token,
        expect=200,
    )
    sid = str(body["studio"]["sessionId"])
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await agent.report(sid, desired.generation, pb.SESSION_STATUS_RUNNING, tool_port=41000)
    for _ in range(200):
        _, studio = await h.request("GET", f"/studios/{sid}", expect=200)
        if studio["statusInfo"]["status"] == "running":
            return sid
        await asyncio.sleep(0.05)
    raise AssertionError(f"studio {sid} did not become running")


def _latest_access(agent: FakeAgent, sid: str) -> pb.SessionDesired | None:
    for msg in reversed(agent.responses):
        if msg.HasField("desired"):
            for s in msg.desired.sessions:
                if s.session_id == sid:
                    return s
    return None


async def wait_access(
    agent: FakeAgent, sid: str, check: Callable[[set[int]], bool], *, start: int
) -> set[int]:
    """The access list of the first SessionDesired of `sid` since `start` that passes `check`."""

    def matches(msg: pb.ConnectResponse) -> bool:
        return msg.HasField("desired") and any(
            s.session_id == sid and s.HasField("access") and check(set(s.access.user_ids))
            for s in msg.desired.sessions
        )

    msg = await agent.wait_for(matches, start=start, timeout=PROMPT)
    return next(set(s.access.user_ids) for s in msg.desired.sessions if s.session_id == sid)


async def can_connect(h: ControllerHarness, sid: str, token: str) -> bool:
    assert h.http is not None
    async with h.http.get(
        f"{h.url}/studios/{sid}/connect",
        headers={"Authorization": f"Bearer {token}"},
        allow_redirects=False,
    ) as resp:
        # 404: no role in the workspace at all (it looks as if the studio did not exist).
        assert resp.status in (302, 403, 404), await resp.text()
        return resp.status == 302


async def assert_matches_connect(
    h: ControllerHarness, sid: str, access: set[int], tokens: dict[int, str]
) -> None:
    for user_id, token in tokens.items():
        assert (user_id in access) == await can_connect(h, sid, token), user_id


async def test_access_lists_connect_role_and_above(
    controller_harness: ControllerHarness, agent: FakeAgent
) -> None:
    h = controller_harness
    tokens = {1: h.admin_token}
    users = {}
    for name, role in (("m", "maintain"), ("l", "launch"), ("c", "connect"), ("v", "view")):
        users[name], tokens[users[name]] = await add_user(h, name, role)
    outsider, tokens[0] = await add_user(h, "outsider", None)
    sid = await start_running(h, agent, "open")
    access = await wait_access(agent, sid, lambda ids: True, start=0)
    assert access == {1, users["m"], users["l"], users["c"]}
    assert users["v"] not in access and outsider not in access
    tokens.pop(0)  # another workspace's user: 404, not part of the comparison
    await assert_matches_connect(h, sid, access, tokens)


async def test_participant_removed_and_roles_changed(
    controller_harness: ControllerHarness, agent: FakeAgent
) -> None:
    h = controller_harness
    alice, alice_token = await add_user(h, "alice", "connect")
    bob, bob_token = await add_user(h, "bob", "launch")
    carol, carol_token = await add_user(h, "carol", "view")
    tokens = {1: h.admin_token, alice: alice_token, bob: bob_token, carol: carol_token}
    sid = await start_running(h, agent, "shared")
    access = await wait_access(agent, sid, lambda ids: True, start=0)
    assert access == {1, alice, bob}

    # Removed participant.
    mark = len(agent.responses)
    await h.request(
        "DELETE", f"{WSP}/participants/{await participant_id(h, member=alice)}", expect=204
    )
    access = await wait_access(agent, sid, lambda ids: alice not in ids, start=mark)
    assert access == {1, bob}
    tokens.pop(alice)
    await assert_matches_connect(h, sid, access, tokens)

    # Role lowered below connect.
    mark = len(agent.responses)
    await h.request(
        "PUT",
        f"{WSP}/participants/{await participant_id(h, member=bob)}/role",
        {"role": "view"},
        expect=204,
    )
    access = await wait_access(agent, sid, lambda ids: bob not in ids, start=mark)
    assert access == {1}
    await assert_matches_connect(h, sid, access, tokens)

    # Role raised: the agent must learn that too, or it would refuse the new user.
    mark = len(agent.responses)
    await h.request(
        "PUT",
        f"{WSP}/participants/{await participant_id(h, member=carol)}/role",
        {"role": "connect"},
        expect=204,
    )
    access = await wait_access(agent, sid, lambda ids: carol in ids, start=mark)
    assert access == {1, carol}
    await assert_matches_connect(h, sid, access, tokens)

    # A user who leaves the workspace.
    mark = len(agent.responses)
    await h.request("DELETE", f"{WSP}/participants", token=carol_token, expect=204)
    access = await wait_access(agent, sid, lambda ids: carol not in ids, start=mark)
    assert access == {1}

    # A new participant (launch by default) is added to the list.
    dave, _ = await add_user(h, "dave", None)
    mark = len(agent.responses)
    await h.request("PUT", f"{WSP}/participants/add", {"memberId": dave}, expect=200)
    access = await wait_access(agent, sid, lambda ids: dave in ids, start=mark)
    assert access == {1, dave}


async def test_team_membership_and_team_role(
    controller_harness: ControllerHarness, agent: FakeAgent
) -> None:
    h = controller_harness
    erin, erin_token = await add_user(h, "erin", None)
    frank, frank_token = await add_user(h, "frank", "view")
    _, team = await h.request("POST", "/orgs/1/teams", {"team": {"name": "analysts"}}, expect=200)
    team_id = team["team"]["teamId"]
    for name in ("erin", "frank"):
        await h.request(
            "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": name}, expect=200
        )
    await h.request("PUT", f"{WSP}/participants/add", {"teamId": team_id}, expect=200)
    sid = await start_running(h, agent, "team studio")
    # Both get the team's launch role (frank: the higher of view and launch).
    access = await wait_access(agent, sid, lambda ids: True, start=0)
    assert access == {1, erin, frank}
    tokens = {1: h.admin_token, erin: erin_token, frank: frank_token}
    await assert_matches_connect(h, sid, access, tokens)

    # Removed from the team: erin had no other role, frank keeps view (cannot connect).
    mark = len(agent.responses)
    await h.request("DELETE", f"/orgs/1/teams/{team_id}/members/{erin}/delete", expect=204)
    access = await wait_access(agent, sid, lambda ids: erin not in ids, start=mark)
    assert access == {1, frank}

    # The team's role lowered to view.
    mark = len(agent.responses)
    team_participant = await participant_id(h, team=team_id)
    await h.request(
        "PUT", f"{WSP}/participants/{team_participant}/role", {"role": "view"}, expect=204
    )
    access = await wait_access(agent, sid, lambda ids: frank not in ids, start=mark)
    assert access == {1}
    await assert_matches_connect(h, sid, access, tokens)

    # Back to connect, and erin rejoins the team: both are listed again.
    mark = len(agent.responses)
    await h.request(
        "PUT", f"{WSP}/participants/{team_participant}/role", {"role": "connect"}, expect=204
    )
    await h.request(
        "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "erin"}, expect=200
    )
    access = await wait_access(agent, sid, lambda ids: {erin, frank} <= ids, start=mark)
    assert access == {1, erin, frank}

    # The team removed as a participant.
    mark = len(agent.responses)
    await h.request("DELETE", f"{WSP}/participants/{team_participant}", expect=204)
    access = await wait_access(agent, sid, lambda ids: not ({erin, frank} & ids), start=mark)
    assert access == {1}


async def test_private_studios(controller_harness: ControllerHarness, agent: FakeAgent) -> None:
    h = controller_harness
    maya, maya_token = await add_user(h, "maya", "maintain")
    alice, alice_token = await add_user(h, "alice", "connect")
    bob, bob_token = await add_user(h, "bob", "launch")
    tokens = {1: h.admin_token, maya: maya_token, alice: alice_token, bob: bob_token}
    # Created by maya, private, alice allowed: the owner (admin) may not connect.
    sid = await start_running(
        h, agent, "private", token=maya_token, isPrivate=True, allowedUserIds=[alice]
    )
    access = await wait_access(agent, sid, lambda ids: True, start=0)
    assert access == {maya, alice}
    await assert_matches_connect(h, sid, access, tokens)

    # An allowed user whose role drops below connect loses access.
    mark = len(agent.responses)
    await h.request(
        "PUT",
        f"{WSP}/participants/{await participant_id(h, member=alice)}/role",
        {"role": "view"},
        expect=204,
    )
    access = await wait_access(agent, sid, lambda ids: alice not in ids, start=mark)
    assert access == {maya}

    # The creator removed from the workspace: nobody may connect, and the list
    # says so (present and empty, not absent).
    mark = len(agent.responses)
    await h.request(
        "DELETE", f"{WSP}/participants/{await participant_id(h, member=maya)}", expect=204
    )
    access = await wait_access(agent, sid, lambda ids: not ids, start=mark)
    assert access == set()
    latest = _latest_access(agent, sid)
    assert latest is not None and latest.HasField("access") and not latest.access.user_ids


async def test_access_only_for_active_sessions(
    controller_harness: ControllerHarness, agent: FakeAgent
) -> None:
    h = controller_harness
    sid = await start_running(h, agent, "short")
    await wait_access(agent, sid, lambda ids: ids == {1}, start=0)
    # Stopping: the proxy may still serve, so access is still sent.
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    stopping = await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    assert stopping.HasField("access") and list(stopping.access.user_ids) == [1]
    await agent.report(sid, stopping.generation, pb.SESSION_STATUS_STOPPED)
    for _ in range(200):
        _, studio = await h.request("GET", f"/studios/{sid}", expect=200)
        if studio["statusInfo"]["status"] == "stopped":
            break
        await asyncio.sleep(0.05)
    # A stopped session has no proxy route: no access list (full resync after reconnect).
    again = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="agent-1", compute_env_id=h.compute_env_id
    )
    await again.connect()
    try:
        stopped = await again.wait_desired(sid, full=True)
        assert stopped.status == pb.DESIRED_STATUS_STOPPED and not stopped.HasField("access")
    finally:
        await again.close()


async def test_allowed_users_follow_each_start(
    controller_harness: ControllerHarness, agent: FakeAgent
) -> None:
    """allowedUserIds change only at start (edits are refused while a session is active),
    and each start's desired state carries the list of that run."""
    h = controller_harness
    alice, _ = await add_user(h, "alice", "connect")
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": "priv", "computeEnvId": h.compute_env_id, "isPrivate": True},
        expect=200,
    )
    sid = body["studio"]["sessionId"]

    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/start", {"allowedUserIds": [alice]}, expect=200)
    first = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert set(first.access.user_ids) == {1, alice}
    await agent.report(sid, first.generation, pb.SESSION_STATUS_RUNNING, tool_port=41000)
    for _ in range(200):
        _, studio = await h.request("GET", f"/studios/{sid}", expect=200)
        if studio["statusInfo"]["status"] == "running":
            break
        await asyncio.sleep(0.05)
    status, refused = await h.request("PUT", f"/studios/{sid}", {"name": "renamed"})
    assert status == 409 and "stop it" in refused["message"]

    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    stopping = await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    await agent.report(sid, stopping.generation, pb.SESSION_STATUS_STOPPED)
    for _ in range(200):
        _, studio = await h.request("GET", f"/studios/{sid}", expect=200)
        if studio["statusInfo"]["status"] == "stopped":
            break
        await asyncio.sleep(0.05)
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/start", {"allowedUserIds": []}, expect=200)
    second = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert second.generation == first.generation + 1
    assert list(second.access.user_ids) == [1]
