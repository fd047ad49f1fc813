"""Organisations, members, workspaces, teams and users in Seqera's shapes (issue 14).

Every response is also checked against the reference (tests.api_contract, through the
harness). The role matrix of the new endpoints: test_orgs_roles.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from studios.agent.v1 import agent_pb2 as pb

from controller.db import alembic_config
from controller.models import Participant, Studio, TeamMember, User
from tests.conftest import ControllerHarness
from tests.controller.test_access import agent, start_running, wait_access  # noqa: F401
from tests.controller.test_roles import add_user, create, mark_running
from tests.fake_agent import FakeAgent


def _org(name: str, **extra: Any) -> dict[str, Any]:
    return {"organization": {"name": name, "fullName": f"{name} Inc.", **extra}}


def _wsp(name: str, **extra: Any) -> dict[str, Any]:
    return {"workspace": {"name": name, "fullName": f"The {name}", **extra}}


async def new_org(h: ControllerHarness, name: str, token: str = "admin") -> int:
    _, body = await h.request("POST", "/orgs", _org(name), token=token, expect=200)
    return int(body["organization"]["orgId"])


async def new_workspace(h: ControllerHarness, org_id: int, name: str, token: str = "admin") -> int:
    _, body = await h.request(
        "POST", f"/orgs/{org_id}/workspaces", _wsp(name), token=token, expect=200
    )
    return int(body["workspace"]["id"])


# ---------------------------------------------------------------- organisations


async def test_bootstrap_organisation_and_admin_owner(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    _, body = await h.request("GET", "/orgs", expect=200)
    assert body == {
        "organizations": [
            {
                "orgId": 1,
                "name": "default",
                "fullName": "default",
                "memberId": 1,
                "memberRole": "owner",
            }
        ],
        "totalSize": 1,
    }
    _, body = await h.request("GET", "/orgs/1/workspaces", expect=200)
    assert body == {
        "workspaces": [{"id": 1, "name": "default", "fullName": "default", "visibility": "PRIVATE"}]
    }


async def test_organisation_crud_and_validate(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    _, carol = await add_user(h, "carol", None)
    await h.request("GET", "/orgs/validate?name=acme", token=carol, expect=204)
    _, body = await h.request(
        "POST",
        "/orgs",
        _org("acme", location="Barcelona", website="https://acme.test"),
        token=carol,
    )
    org = body["organization"]
    assert org["name"] == "acme" and org["fullName"] == "acme Inc."
    assert org["memberRole"] == "owner" and org["location"] == "Barcelona"
    assert "description" not in org  # no value, no field (never null)
    org_id = org["orgId"]
    await h.request("GET", "/orgs/validate?name=ACME", token=carol, expect=409)

    await h.request(
        "PUT",
        f"/orgs/{org_id}",
        {"fullName": "Acme Corporation", "description": "rockets"},
        token=carol,
        expect=204,
    )
    _, body = await h.request("GET", f"/orgs/{org_id}", token=carol, expect=200)
    assert body["organization"]["fullName"] == "Acme Corporation"
    assert body["organization"]["description"] == "rockets"
    # Another user's organisation does not exist for the admin (no role in it).
    await h.request("GET", f"/orgs/{org_id}", expect=404)
    _, body = await h.request("GET", "/orgs", token=carol, expect=200)
    assert [o["name"] for o in body["organizations"]] == ["acme"]

    await h.request("DELETE", f"/orgs/{org_id}", token=carol, expect=204)
    await h.request("GET", f"/orgs/{org_id}", token=carol, expect=404)
    # Its name is free again.
    await h.request("GET", "/orgs/validate?name=acme", token=carol, expect=204)
    await new_org(h, "acme", token=carol)


@pytest.mark.parametrize(
    "name",
    ["a", "-abc", "abc-", "a--b", "a b", "x" * 40, "émile", "a.b", ""],
)
async def test_invalid_names_are_400(controller_harness: ControllerHarness, name: str) -> None:
    h = controller_harness
    status, body = await h.request("POST", "/orgs", _org(name))
    assert status == 400 and "organization.name" in body["message"], body
    status, body = await h.request("POST", "/orgs/1/workspaces", _wsp(name))
    assert status == 400 and "workspace.name" in body["message"], body
    status, body = await h.request("POST", "/orgs/1/teams", {"team": {"name": name}})
    assert status == 400 and "team.name" in body["message"], body
    for path in ("/orgs/validate", "/orgs/1/workspaces/validate", "/orgs/1/teams/validate"):
        status, body = await h.request("GET", f"{path}?name={name}")
        assert status == 400 and body["message"].startswith("name:"), (path, body)


async def test_other_invalid_fields_are_400(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    for bad, field in (
        ({"organization": {"name": "okname"}}, "organization.fullName"),
        (_org("okname", description="d" * 1001), "organization.description"),
        (_org("okname", location="l" * 101), "organization.location"),
    ):
        status, body = await h.request("POST", "/orgs", bad)
        assert status == 400 and field in body["message"], body
    status, body = await h.request("POST", "/orgs/1/workspaces", _wsp("w1", visibility="PUBLIC"))
    assert status == 400 and "workspace.visibility" in body["message"]
    status, body = await h.request("PUT", "/orgs/1/members/1/role", {"role": "admin"})
    assert status == 400 and "role" in body["message"]


async def test_duplicate_names_are_409_naming_the_field(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    status, body = await h.request("POST", "/orgs", _org("Default"))
    assert status == 409 and body["message"].startswith("organization.name:"), body
    await new_workspace(h, 1, "lab")
    status, body = await h.request("POST", "/orgs/1/workspaces", _wsp("LAB"))
    assert status == 409 and body["message"].startswith("workspace.name:"), body
    await h.request("GET", "/orgs/1/workspaces/validate?name=lab", expect=409)
    status, body = await h.request("PUT", "/orgs/1/workspaces/1", {"name": "lab"})
    assert status == 409 and body["message"].startswith("name:")
    await h.request("POST", "/orgs/1/teams", {"team": {"name": "crew"}}, expect=200)
    status, body = await h.request("POST", "/orgs/1/teams", {"team": {"name": "Crew"}})
    assert status == 409 and body["message"].startswith("team.name:"), body
    other = await new_org(h, "other")
    status, body = await h.request("PUT", f"/orgs/{other}", {"name": "default"})
    assert status == 409 and body["message"].startswith("name:")
    # The same workspace name in another organisation is fine.
    await new_workspace(h, other, "lab")


# ---------------------------------------------------------------- workspaces


async def test_workspace_crud_and_participant(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    bob_id, bob = await add_user(h, "bob", None)
    _, body = await h.request(
        "POST", "/orgs/1/workspaces", _wsp("lab", description="wet lab"), expect=200
    )
    wsp = body["workspace"]
    assert wsp["name"] == "lab" and wsp["visibility"] == "PRIVATE"
    assert wsp["description"] == "wet lab" and wsp["dateCreated"].endswith("Z")
    wid = wsp["id"]
    # The creator is its owner participant.
    _, body = await h.request("GET", f"/orgs/1/workspaces/{wid}/participants", expect=200)
    assert [(p["userName"], p["wspRole"]) for p in body["participants"]] == [("admin", "owner")]
    _, body = await h.request(
        "PUT", f"/orgs/1/workspaces/{wid}", {"fullName": "Lab 2", "visibility": "SHARED"}
    )
    assert body["workspace"]["fullName"] == "Lab 2" and body["workspace"]["visibility"] == "SHARED"
    # bob is nobody in the organisation: 404.
    await h.request("GET", f"/orgs/1/workspaces/{wid}", token=bob, expect=404)
    await h.request(
        "PUT",
        f"/orgs/1/workspaces/{wid}/participants/add",
        {"userNameOrEmail": "bob"},
        expect=200,
    )
    # Added from outside the organisation: a collaborator of it, and listed as one.
    _, body = await h.request("GET", f"/orgs/1/workspaces/{wid}/participants", expect=200)
    assert sorted((p["userName"], p["type"], p["orgRole"]) for p in body["participants"]) == [
        ("admin", "MEMBER", "owner"),
        ("bob", "COLLABORATOR", "collaborator"),
    ]
    _, body = await h.request("GET", "/orgs/1/collaborators", expect=200)
    assert [(m["userName"], m["role"]) for m in body["members"]] == [("bob", "collaborator")]
    _, body = await h.request("GET", f"/orgs/1/workspaces/{wid}", token=bob, expect=200)
    assert body["workspace"]["name"] == "lab"
    # A collaborator sees only their own workspaces.
    _, body = await h.request("GET", "/orgs/1/workspaces", token=bob, expect=200)
    assert [w["id"] for w in body["workspaces"]] == [wid]
    await h.request("GET", "/orgs/1/workspaces/1", token=bob, expect=404)
    _, body = await h.request("GET", f"/user/{bob_id}/workspaces", token=bob, expect=200)
    assert body["orgsAndWorkspaces"] == [
        {"orgId": 1, "orgName": "default", "roles": ["collaborator"]},
        {
            "orgId": 1,
            "orgName": "default",
            "workspaceId": wid,
            "workspaceName": "lab",
            "workspaceFullName": "Lab 2",
            "visibility": "SHARED",
            "roles": ["launch"],
        },
    ]
    await h.request("GET", "/user/1/workspaces", token=bob, expect=403)
    await h.request("DELETE", f"/orgs/1/workspaces/{wid}", expect=204)
    await h.request("GET", f"/orgs/1/workspaces/{wid}", expect=404)
    await h.request("GET", f"/orgs/1/workspaces/{wid}/participants", expect=404)
    _, body = await h.request("GET", "/orgs/1/workspaces", expect=200)
    assert [w["id"] for w in body["workspaces"]] == [1]


async def test_deleting_with_running_studios_is_409_naming_them(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    stopped = await create(h, "idle one")
    sid = await create(h, "busy one")
    await mark_running(h, sid)
    for path in ("/orgs/1/workspaces/1", "/orgs/1"):
        status, body = await h.request("DELETE", path)
        assert status == 409, body
        assert f"'busy one' ({sid}, running)" in body["message"]
        assert "idle one" not in body["message"]
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        studio = await session.get(Studio, sid)
        assert studio is not None
        studio.status = "stopped"
        studio.desired_status = "stopped"
    await h.request("DELETE", "/orgs/1/workspaces/1", expect=204)
    async with h.controller.db.transaction() as session:
        for studio_id in (sid, stopped):
            studio = await session.get(Studio, studio_id)
            assert studio is not None and studio.deleted  # kept for its checkpoints
    await h.request("GET", f"/studios/{sid}", expect=404)


# ---------------------------------------------------------------- members


async def test_members_add_role_leave_and_last_owner(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    dana_id, dana = await add_user(h, "dana", None)
    await h.request("PUT", "/orgs/1/members/add", {"user": "nobody"}, expect=404)
    _, body = await h.request("PUT", "/orgs/1/members/add", {"user": "dana@example.org"})
    assert body["member"] == {
        "memberId": dana_id,
        "userId": dana_id,
        "userName": "dana",
        "email": "dana@example.org",
        "role": "member",
    }
    status, body = await h.request("PUT", "/orgs/1/members/add", {"user": "dana"})
    assert status == 409 and body["message"].startswith("user:")
    _, body = await h.request("GET", "/orgs/1/members?search=DAN", expect=200)
    assert body["totalSize"] == 1 and body["members"][0]["userName"] == "dana"
    _, body = await h.request("GET", "/orgs/1/members?max=1&offset=0", expect=200)
    assert body["totalSize"] == 2 and len(body["members"]) == 1

    # The last owner can neither leave, be removed nor be demoted.
    for method, path, payload in (
        ("DELETE", "/orgs/1/members/leave", None),
        ("DELETE", "/orgs/1/members/1", None),
        ("PUT", "/orgs/1/members/1/role", {"role": "member"}),
    ):
        status, body = await h.request(method, path, payload)
        assert status == 409 and "last owner" in body["message"], (path, body)
    # Two owners: one may go.
    await h.request("PUT", f"/orgs/1/members/{dana_id}/role", {"role": "owner"}, expect=204)
    await h.request("PUT", "/orgs/1/members/1/role", {"role": "member"}, token=dana, expect=204)
    await h.request("PUT", "/orgs/1/members/1/role", {"role": "owner"}, token=dana, expect=204)
    await h.request("DELETE", "/orgs/1/members/leave", token=dana, expect=204)
    await h.request("GET", "/orgs/1", token=dana, expect=404)
    await h.request("DELETE", f"/orgs/1/members/{dana_id}", expect=404)


async def test_removing_a_member_removes_their_roles_and_team_places(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    eli_id, eli = await add_user(h, "eli", "maintain")
    await h.request("PUT", "/orgs/1/members/add", {"user": "eli"}, expect=200)
    _, body = await h.request("POST", "/orgs/1/teams", {"team": {"name": "crew"}}, expect=200)
    team_id = body["team"]["teamId"]
    await h.request(
        "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "eli"}, expect=200
    )
    await h.request("GET", "/studios", token=eli, expect=200)
    await h.request("DELETE", f"/orgs/1/members/{eli_id}", expect=204)
    await h.request("GET", "/studios", token=eli, expect=404)
    _, body = await h.request("GET", f"/orgs/1/teams/{team_id}/members", expect=200)
    assert body == {"members": [], "totalSize": 0}


async def test_collaborators_do_not_see_members_or_teams(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    _, cleo = await add_user(h, "cleo", "admin")  # a participant only: a collaborator
    for path in ("/orgs/1/members", "/orgs/1/collaborators", "/orgs/1/teams"):
        status, body = await h.request("GET", path, token=cleo)
        assert status == 403 and "collaborator" in body["message"], (path, body)
    _, body = await h.request("GET", "/orgs/1", token=cleo, expect=200)
    assert body["organization"]["memberRole"] == "collaborator"


# ---------------------------------------------------------------- teams


async def test_teams_in_the_reference_shape(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    fay_id, _ = await add_user(h, "fay", None)
    await h.request("GET", "/orgs/1/teams/validate?name=crew", expect=204)
    _, body = await h.request(
        "POST", "/orgs/1/teams", {"team": {"name": "crew", "description": "the crew"}}
    )
    assert body["team"] == {
        "teamId": body["team"]["teamId"],
        "name": "crew",
        "description": "the crew",
        "membersCount": 0,
    }
    team_id = body["team"]["teamId"]
    await h.request("GET", "/orgs/1/teams/validate?name=crew", expect=400)
    _, body = await h.request(
        "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "fay"}, expect=200
    )
    # fay was nobody in the organisation: now a member of it.
    assert body["member"]["role"] == "member" and body["member"]["memberId"] == fay_id
    await h.request(
        "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "fay"}, expect=409
    )
    _, body = await h.request("GET", f"/orgs/1/teams/{team_id}", expect=200)
    assert body["team"]["membersCount"] == 1
    await h.request("PUT", f"/orgs/1/teams/{team_id}", {"name": "crew2"}, expect=204)
    _, body = await h.request("GET", "/orgs/1/teams?search=CREW", expect=200)
    assert [t["name"] for t in body["teams"]] == ["crew2"] and body["totalSize"] == 1

    _, body = await h.request(
        "PUT", "/orgs/1/workspaces/1/participants/add", {"teamId": team_id}, expect=200
    )
    _, body = await h.request("GET", f"/orgs/1/teams/{team_id}/workspaces", expect=200)
    assert body == {
        "workspaces": [
            {
                "orgId": 1,
                "orgName": "default",
                "workspaceId": 1,
                "workspaceName": "default",
                "workspaceFullName": "default",
                "participantId": body["workspaces"][0]["participantId"],
                "participantRole": "launch",
            }
        ],
        "totalSize": 1,
    }
    await h.request("DELETE", f"/orgs/1/teams/{team_id}/members/{fay_id}/delete", expect=204)
    await h.request("DELETE", f"/orgs/1/teams/{team_id}/members/{fay_id}/delete", expect=404)
    await h.request("DELETE", f"/orgs/1/teams/{team_id}", expect=204)
    _, body = await h.request("GET", "/orgs/1/workspaces/1/participants", expect=200)
    assert all(p["type"] != "TEAM" for p in body["participants"])
    # Another organisation's team is 404.
    other = await new_org(h, "other")
    _, body = await h.request("POST", f"/orgs/{other}/teams", {"team": {"name": "t2"}})
    await h.request("GET", f"/orgs/1/teams/{body['team']['teamId']}", expect=404)


def test_migration_keeps_teams_and_makes_members(tmp_path: Path) -> None:
    """0009 on a database of 0008: teams and their members are kept; the bootstrap admin
    becomes owner of organisation 1 and everyone else taking part (directly or through a
    team) a member; names become full names."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0008")
        now = "2026-01-01 00:00:00"
        for sql in (
            f"INSERT INTO organizations (id, name, date_created) VALUES (1, 'default', '{now}')",
            "INSERT INTO workspaces (id, org_id, name, lifespan_hours, "
            f"private_studio_by_default, date_created) VALUES (1, 1, 'default', 0, 0, '{now}')",
            f"INSERT INTO users (id, user_name, email, date_created) VALUES "
            f"(1, 'admin', 'a@x', '{now}'), (2, 'bea', 'b@x', '{now}'), "
            f"(3, 'cy', 'c@x', '{now}'), (4, 'idle', 'i@x', '{now}')",
            f"INSERT INTO teams (id, org_id, name, date_created) VALUES (1, 1, 'crew', '{now}')",
            f"INSERT INTO team_members (id, team_id, user_id, date_created) VALUES "
            f"(1, 1, 3, '{now}')",
            "INSERT INTO participants (id, workspace_id, user_id, team_id, role, date_created) "
            f"VALUES (1, 1, 1, NULL, 'owner', '{now}'), (2, 1, 2, NULL, 'view', '{now}'), "
            f"(3, 1, NULL, 1, 'launch', '{now}')",
        ):
            conn.execute(sa.text(sql))
        command.upgrade(alembic_config(conn), "0009")
        members = conn.execute(
            sa.text("SELECT org_id, user_id, role FROM org_members ORDER BY user_id")
        ).all()
        assert [tuple(m) for m in members] == [(1, 1, "owner"), (1, 2, "member"), (1, 3, "member")]
        assert conn.execute(sa.text("SELECT name FROM teams")).scalar() == "crew"
        assert conn.execute(sa.text("SELECT user_id FROM team_members")).scalar() == 3
        assert conn.execute(sa.text("SELECT full_name FROM workspaces")).scalar() == "default"
        assert conn.execute(sa.text("SELECT visibility FROM workspaces")).scalar() == "PRIVATE"
    engine.dispose()


# ---------------------------------------------------------------- users


async def test_describe_users(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    gus_id, gus = await add_user(h, "gus", "view")
    _, body = await h.request("GET", f"/users/{gus_id}", expect=200)
    assert body["user"]["userName"] == "gus" and body["user"]["deleted"] is False
    _, body = await h.request("GET", f"/users/{gus_id}", token=gus, expect=200)
    assert body["defaultWorkspaceId"] == 1
    # A collaborator sees nobody else.
    await h.request("GET", "/users/1", token=gus, expect=404)
    await h.request("GET", "/users/999", expect=404)


async def test_deleting_a_user(
    controller_harness: ControllerHarness,
    agent: FakeAgent,  # noqa: F811
) -> None:
    """Tokens, memberships and roles go at once and the agent is told; their running
    studio is stopped (a final checkpoint, the agent's stop) and kept; their private
    studio stays private to them, so nobody connects."""
    h = controller_harness
    hal_id, hal = await add_user(h, "hal", "maintain")
    await h.request("PUT", "/orgs/1/members/add", {"user": "hal"}, expect=200)
    _, body = await h.request("POST", "/orgs/1/teams", {"team": {"name": "crew"}}, expect=200)
    await h.request(
        "POST",
        f"/orgs/1/teams/{body['team']['teamId']}/members",
        {"userNameOrEmail": "hal"},
        expect=200,
    )
    # The admin's running studio lists hal among those who may connect.
    shared = await start_running(h, agent, "shared")
    await wait_access(agent, shared, lambda ids: ids == {1, hal_id}, start=0)
    mine = await start_running(h, agent, "hals", token=hal, isPrivate=True)
    await wait_access(agent, mine, lambda ids: ids == {hal_id}, start=0)

    status, body = await h.request("DELETE", "/users/1", token=hal)
    assert status == 403
    mark = len(agent.responses)
    await h.request("DELETE", f"/users/{hal_id}", expect=204)

    # At once: the access list narrows and hal's studio is told to stop.
    await wait_access(agent, shared, lambda ids: ids == {1}, start=mark)
    stopping = await agent.wait_desired(mine, pb.DESIRED_STATUS_STOPPED, start=mark)
    assert not stopping.access.user_ids  # private to a deleted user: nobody
    _, body = await h.request("GET", f"/studios/{mine}", expect=200)
    assert body["statusInfo"]["status"] == "stopping"
    assert "creator" in body["statusInfo"]["message"]
    await agent.report(mine, stopping.generation, pb.SESSION_STATUS_STOPPED)

    # hal's token is gone; nothing of hal is left in the organisation.
    await h.request("GET", "/user-info", token=hal, expect=401)
    await h.request("GET", f"/users/{hal_id}", expect=404)
    _, body = await h.request("GET", "/orgs/1/members", expect=200)
    assert [m["userName"] for m in body["members"]] == ["admin"]
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        user = await session.get(User, hal_id)
        assert user is not None and user.deleted
        assert not (
            await session.scalars(
                Participant.__table__.select().where(Participant.user_id == hal_id)
            )
        ).all()
        assert not (
            await session.scalars(TeamMember.__table__.select().where(TeamMember.user_id == hal_id))
        ).all()
        studio = await session.get(Studio, mine)
        assert studio is not None and not studio.deleted  # kept
    # Still private: the admin may not connect, but may delete it once the agent's
    # `stopped` (sent on its stream, applied by the controller as it reads it) is in.
    status, _ = await h.request("GET", f"/studios/{mine}/connect", allow_redirects=False)
    assert status == 403
    for _ in range(100):
        _, body = await h.request("GET", f"/studios/{mine}", expect=200)
        if body["statusInfo"]["status"] == "stopped":
            break
        await asyncio.sleep(0.1)
    assert body["statusInfo"]["status"] == "stopped", body["statusInfo"]
    await h.request("DELETE", f"/studios/{mine}", expect=204)


async def test_the_last_owner_cannot_be_deleted(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    status, body = await h.request("DELETE", "/users/1")
    assert status == 409 and "last owner" in body["message"]
