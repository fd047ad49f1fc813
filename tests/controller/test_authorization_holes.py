"""Authorization rules beyond the role table (issue 13), each an attack that worked:

- a workspace admin of workspace 2 put herself in a team that is owner of workspace 1
  (teams are now the organisation owners' alone, issue 14);
- an admin who may not connect to a private studio restarted it with
  `allowedUserIds: [self]`, or cloned its checkpoint as a public studio;
- a compute environment mounted any host path (`/`, `/etc`, the agent's state);
- one session could grow over the whole disk budget (`sessionDiskCapGb`).

The agent's own host-path check and the cap's enforcement: tests/agent/sessions/
test_host_path_and_cap.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from controller.desired import session_desired
from controller.models import ComputeEnv, Participant, Studio, Workspace
from tests.conftest import ControllerHarness
from tests.controller.test_roles import add_checkpoint, add_user, create, mark_running

WSP1 = "/orgs/1/workspaces/1"
WSP2 = "/orgs/1/workspaces/2"


async def _workspace2(h: ControllerHarness, *, admin_role: str | None = None) -> None:
    """Workspace 2 of org 1; the harness admin (user 1, owner of workspace 1) takes part
    in it with `admin_role` (None: not at all)."""
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        session.add(Workspace(id=2, org_id=1, name="second"))
        await session.flush()
        if admin_role is not None:
            session.add(Participant(workspace_id=2, user_id=1, role=admin_role))


async def _team_in(h: ControllerHarness, name: str, roles: dict[int, str]) -> int:
    """A team of org 1 that takes part in each workspace of `roles` with that role."""
    _, body = await h.request("POST", "/orgs/1/teams", {"team": {"name": name}}, expect=200)
    team_id = int(body["team"]["teamId"])
    for workspace_id, role in roles.items():
        wsp = f"/orgs/1/workspaces/{workspace_id}"
        _, body = await h.request("PUT", f"{wsp}/participants/add", {"teamId": team_id}, expect=200)
        pid = body["participant"]["participantId"]
        await h.request("PUT", f"{wsp}/participants/{pid}/role", {"role": role}, expect=204)
    return team_id


# ---------------------------------------------------------------- teams


async def test_a_workspace_admin_cannot_join_a_team_that_owns_another_workspace(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    await _workspace2(h, admin_role="owner")
    _, eve = await add_user(h, "eve", "admin", workspace_id=2)
    team_id = await _team_in(h, "wsp1-owners", {1: "owner", 2: "launch"})
    sid = await create(h, "owned by workspace 1")
    assert (await h.request("GET", f"/studios/{sid}", token=eve))[0] == 404

    status, body = await h.request(
        "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "eve"}, token=eve
    )
    # eve takes part in a workspace only (a collaborator): the organisation's teams are
    # not hers to see or change.
    assert status == 403, body
    assert "organization role 'collaborator' may not manage teams" in body["message"]
    # Nothing changed: eve still has no role in workspace 1.
    assert (await h.request("GET", f"/studios/{sid}", token=eve))[0] == 404
    _, body = await h.request("GET", "/orgs/1/teams", expect=200)
    assert body["teams"][0]["membersCount"] == 0

    # Removing members is the same change: refused too.
    victim_id, _ = await add_user(h, "victim", None)
    await h.request(
        "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "victim"}, expect=200
    )
    status, body = await h.request(
        "DELETE", f"/orgs/1/teams/{team_id}/members/{victim_id}/delete", token=eve
    )
    assert status == 403 and "may not manage teams" in body["message"]
    # The organisation's owner may.
    await h.request("DELETE", f"/orgs/1/teams/{team_id}/members/{victim_id}/delete", expect=204)


async def test_only_organisation_owners_change_teams(
    controller_harness: ControllerHarness,
) -> None:
    """Workspace owners, admins and maintainers who are members of the organisation
    (not owners of it) cannot change who is in a team, nor create one; its owners can."""
    h = controller_harness
    await _workspace2(h)
    await add_user(h, "newbie", None)
    team_id = await _team_in(h, "launchers", {1: "launch"})
    for name, role in (("olga", "owner"), ("ada", "admin"), ("mark", "maintain")):
        _, token = await add_user(h, name, role)
        await h.request("PUT", "/orgs/1/members/add", {"user": name}, expect=200)
        status, body = await h.request(
            "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "newbie"}, token=token
        )
        assert status == 403, body
        assert "organization role 'member' may not manage teams" in body["message"]
        status, _ = await h.request(
            "POST", "/orgs/1/teams", {"team": {"name": f"{name}-team"}}, token=token
        )
        assert status == 403
        # Members see the teams.
        await h.request("GET", "/orgs/1/teams", token=token, expect=200)
    await h.request(
        "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "newbie"}, expect=200
    )


# ---------------------------------------------------------------- private studios


async def _private_world(h: ControllerHarness) -> dict[str, Any]:
    world: dict[str, Any] = {}
    world["maya_id"], world["maya"] = await add_user(h, "maya", "maintain")  # the creator
    world["friend_id"], world["friend"] = await add_user(h, "friend", "maintain")  # allowed
    world["adam_id"], world["adam"] = await add_user(h, "adam", "admin")  # may not connect
    world["carl_id"], world["carl"] = await add_user(h, "carl", "connect")
    sid = await create(
        h, "secret", token=world["maya"], isPrivate=True, allowedUserIds=[world["friend_id"]]
    )
    world["sid"] = sid
    world["checkpoint"] = await add_checkpoint(h, sid, "secret_1")
    return world


async def _allowed(h: ControllerHarness, sid: str) -> list[int]:
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    return [u["id"] for u in body["allowedUsers"]]


async def _connect_status(h: ControllerHarness, sid: str, token: str) -> int:
    status, _ = await h.request(
        "GET", f"/studios/{sid}/connect", token=token, allow_redirects=False
    )
    return status


async def test_an_admin_cannot_widen_a_private_studio_at_start(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    w = await _private_world(h)
    sid = w["sid"]
    for token, wanted in (
        (w["adam"], [w["adam_id"]]),
        (w["adam"], [w["friend_id"], w["adam_id"]]),
        (h.admin_token, [w["carl_id"]]),
        # An allowed user who is not the creator may not widen it either.
        (w["friend"], [w["friend_id"], w["carl_id"]]),
    ):
        status, body = await h.request(
            "PUT", f"/studios/{sid}/start", {"allowedUserIds": wanted}, token=token
        )
        assert status == 403, body
        assert "only its creator" in body["message"]
        _, studio = await h.request("GET", f"/studios/{sid}", expect=200)
        assert studio["statusInfo"]["status"] == "stopped"
        assert await _allowed(h, sid) == [w["friend_id"]]
    # Admins may still start it as it is, and the list keeps or narrows.
    await h.request("PUT", f"/studios/{sid}/start", {}, token=w["adam"], expect=200)
    await mark_running(h, sid)
    assert await _connect_status(h, sid, w["adam"]) == 403
    await h.request("PUT", f"/studios/{sid}/stop", token=w["adam"], expect=200)
    await _stopped(h, sid)
    await h.request(
        "PUT",
        f"/studios/{sid}/start",
        {"allowedUserIds": [w["friend_id"]]},
        token=w["adam"],
        expect=200,
    )
    await _stopped(h, sid)
    await h.request(
        "PUT", f"/studios/{sid}/start", {"allowedUserIds": []}, token=w["adam"], expect=200
    )
    assert await _allowed(h, sid) == []
    await _stopped(h, sid)
    # The creator widens as she likes.
    await h.request(
        "PUT",
        f"/studios/{sid}/start",
        {"allowedUserIds": [w["adam_id"], w["carl_id"]]},
        token=w["maya"],
        expect=200,
    )
    assert await _allowed(h, sid) == [w["adam_id"], w["carl_id"]]


async def _stopped(h: ControllerHarness, sid: str) -> None:
    """Record the studio as stopped (no agent is connected in these tests to do it)."""
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        studio = await session.get(Studio, sid)
        assert studio is not None
        studio.status = "stopped"
        studio.desired_status = "stopped"
        studio.agent_id = None


def _clone_body(h: ControllerHarness, name: str, checkpoint: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "computeEnvId": h.compute_env_id,
        "initialCheckpointId": checkpoint,
        **extra,
    }


async def test_cloning_a_private_studio_needs_the_right_to_connect(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    w = await _private_world(h)
    for token in (w["adam"], h.admin_token):
        for extra in ({"isPrivate": False}, {}, {"isPrivate": True}):
            status, body = await h.request(
                "POST",
                "/studios?autoStart=false",
                _clone_body(h, "stolen", w["checkpoint"], **extra),
                token=token,
            )
            assert status == 403, (extra, body)
            assert "connect" in body["message"]
    _, body = await h.request("GET", "/studios?search=stolen", expect=200)
    assert body["totalSize"] == 0


async def test_a_clone_of_a_private_studio_is_private_to_the_cloning_user(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    w = await _private_world(h)
    checkpoint = w["checkpoint"]
    # An allowed user's clone may not be public, nor open to anyone who could not connect.
    for extra in ({"isPrivate": False}, {"allowedUserIds": [w["carl_id"]]}):
        status, body = await h.request(
            "POST",
            "/studios?autoStart=false",
            _clone_body(h, "leak", checkpoint, **extra),
            token=w["friend"],
        )
        assert status == 403, (extra, body)
        assert "private" in body["message"]
    # Without a say, the clone is private to its cloning user, even where studios are
    # public by default.
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        _clone_body(h, "friend's copy", checkpoint),
        token=w["friend"],
        expect=200,
    )
    clone = body["studio"]
    assert clone["isPrivate"] is True and clone["allowedUsers"] == []
    assert clone["user"]["id"] == w["friend_id"]
    await mark_running(h, clone["sessionId"])
    assert await _connect_status(h, clone["sessionId"], w["friend"]) == 409
    for token in (w["carl"], w["adam"], w["maya"]):
        assert await _connect_status(h, clone["sessionId"], token) == 403
    # Users who could already connect to the parent may be named.
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        _clone_body(h, "shared copy", checkpoint, allowedUserIds=[w["maya_id"]]),
        token=w["friend"],
        expect=200,
    )
    assert body["studio"]["isPrivate"] is True
    assert [u["id"] for u in body["studio"]["allowedUsers"]] == [w["maya_id"]]
    # The creator clones it as she likes: public here.
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        _clone_body(h, "maya's public copy", checkpoint, isPrivate=False),
        token=w["maya"],
        expect=200,
    )
    assert body["studio"]["isPrivate"] is False


# ---------------------------------------------------------------- host paths


def _env(name: str, **config: Any) -> dict[str, Any]:
    return {
        "computeEnv": {
            "name": name,
            "platform": "studio-agent",
            "config": {"workDir": "file:///tmp/work", **config},
        }
    }


@pytest.mark.parametrize(
    "host_path",
    [
        "/",
        "/etc",
        "/etc/ssl",
        "/proc",
        "/sys/fs",
        "/dev",
        "/root",
        "/boot",
        "/var/lib/studios",
        "/var/lib/studios-agent/sessions",
        "/run",
        "/usr",
        "/bin",
        "/srv/./data",
        "/srv//data",
        "/srv/data//",
        "/etc/",
        "/srv/../etc",
        "/srv/data\x00",
    ],
)
async def test_plainly_unsafe_host_paths_are_refused(
    controller_harness: ControllerHarness, host_path: str
) -> None:
    h = controller_harness
    status, body = await h.request(
        "POST",
        "/compute-envs",
        _env("unsafe", fileSystemMounts=[{"hostPath": host_path, "mountPath": "/efs"}]),
    )
    assert status == 400, body
    assert "hostPath" in body["message"]


async def test_a_host_path_elsewhere_is_accepted(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    _, body = await h.request(
        "POST",
        "/compute-envs",
        _env("efs", fileSystemMounts=[{"hostPath": "/srv/efs/team-a", "mountPath": "/efs"}]),
        expect=200,
    )
    assert body["computeEnvId"]


# ---------------------------------------------------------------- per-session disk cap


async def test_session_disk_cap_is_stored_shown_and_sent(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    _, body = await h.request(
        "POST", "/compute-envs", _env("capped", bootDiskSizeGb=30, sessionDiskCapGb=8), expect=200
    )
    env_id = body["computeEnvId"]
    _, body = await h.request("GET", "/compute-envs", expect=200)
    by_id = {e["id"]: e for e in body["computeEnvs"]}
    assert by_id[env_id]["config"]["sessionDiskCapGb"] == 8
    # Absent: no cap of its own (the whole budget), and not shown (never null: issue 14).
    assert "sessionDiskCapGb" not in by_id[h.compute_env_id]["config"]
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        env = await session.get(ComputeEnv, env_id)
        plain = await session.get(ComputeEnv, h.compute_env_id)
        assert env is not None and plain is not None
        studio = Studio(
            session_id="abcd0001",
            name="s",
            template_repository="img",
            tool="python-http",
            desired_status="running",
            generation=1,
            deleted=False,
            configuration={},
        )
        assert session_desired(studio, env, None).spec.session_disk_cap_gb == 8
        assert session_desired(studio, env, None).spec.boot_disk_size_gb == 30
        assert session_desired(studio, plain, None).spec.session_disk_cap_gb == 0


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"bootDiskSizeGb": 10, "sessionDiskCapGb": 11}, "sessionDiskCapGb"),
        ({"sessionDiskCapGb": 0}, "sessionDiskCapGb"),
        ({"sessionDiskCapGb": "8"}, "sessionDiskCapGb"),
    ],
)
async def test_session_disk_cap_bad_values(
    controller_harness: ControllerHarness, config: dict[str, Any], field: str
) -> None:
    status, body = await controller_harness.request("POST", "/compute-envs", _env("bad", **config))
    assert status == 400 and field in body["message"], body
