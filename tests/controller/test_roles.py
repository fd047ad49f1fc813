"""Authorisation exactly as reference/studio-roles.md: one table-driven test over
all six roles and every action of the table, plus private studios, team roles
and other workspaces (404, never 403).

"Allowed" means the answer is the action's success status; "refused" means 403.
Connecting is checked on a studio recorded as running on an agent that is not
connected: an allowed caller gets past authorisation to 409 ("agent not
connected"), a refused one gets 403. The data-links row of the table is
exercised for all six roles in tests/controller/test_datalinks.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from controller.auth import Role, hash_token, new_token
from controller.models import (
    Agent,
    ApiToken,
    Checkpoint,
    Participant,
    Studio,
    User,
    Workspace,
)
from tests.conftest import ControllerHarness
from tests.fake_agent import checkpoint_uri

ROLES = [r.value for r in Role]


async def add_user(
    h: ControllerHarness,
    name: str,
    role: str | None,
    workspace_id: int = 1,
) -> tuple[int, str]:
    """A user (with a direct role unless None) and their API token."""
    assert h.controller is not None and h.controller.db is not None
    token = new_token()
    async with h.controller.db.transaction() as session:
        user = User(user_name=name, email=f"{name}@example.org")
        session.add(user)
        await session.flush()
        if role is not None:
            session.add(Participant(workspace_id=workspace_id, user_id=user.id, role=role))
        session.add(ApiToken(user_id=user.id, name="test", token_hash=hash_token(token)))
        return user.id, token


async def create(h: ControllerHarness, name: str, token: str = "admin", **extra: Any) -> str:
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": name, "computeEnvId": h.compute_env_id, **extra},
        token=token,
        expect=200,
    )
    return str(body["studio"]["sessionId"])


async def add_checkpoint(h: ControllerHarness, sid: str, name: str, generation: int = 0) -> int:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        checkpoint = Checkpoint(
            session_id=sid,
            name=name,
            key=f"key-{name}",
            uri=checkpoint_uri(sid, name),
            status="finalized",
            generation=generation,
        )
        session.add(checkpoint)
        await session.flush()
        return checkpoint.id


async def mark_running(h: ControllerHarness, sid: str) -> None:
    """Record the studio as running on an agent that is not connected."""
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        if await session.get(Agent, "gone") is None:
            session.add(Agent(agent_id="gone", compute_env_id=h.compute_env_id))
        studio = await session.get(Studio, sid)
        assert studio is not None
        studio.status = "running"
        studio.desired_status = "running"
        studio.agent_id = "gone"
        studio.generation = 1


@dataclass
class World:
    h: ControllerHarness
    tokens: dict[str, str] = field(default_factory=dict)
    shared: str = ""
    running: str = ""
    checkpoint: int = 0
    # Per role: a studio of its own to start, stop, delete.
    own: dict[str, str] = field(default_factory=dict)


Action = Callable[[World, str], Awaitable[int]]


async def _status(w: World, role: str, method: str, path: str, body: Any = None, **kw: Any) -> int:
    status, _ = await w.h.request(method, path, body, token=w.tokens[role], **kw)
    return status


ACTIONS: dict[str, tuple[Action, int, set[str]]] = {
    # name: (action, success status, roles allowed)
    "list studios": (
        lambda w, r: _status(w, r, "GET", "/studios?search=shared"),
        200,
        set(ROLES),
    ),
    "view a studio": (lambda w, r: _status(w, r, "GET", f"/studios/{w.shared}"), 200, set(ROLES)),
    "list checkpoints": (
        lambda w, r: _status(w, r, "GET", f"/studios/{w.shared}/checkpoints"),
        200,
        set(ROLES),
    ),
    "view a checkpoint": (
        lambda w, r: _status(w, r, "GET", f"/studios/{w.shared}/checkpoints/{w.checkpoint}"),
        200,
        set(ROLES),
    ),
    "validate a name": (
        lambda w, r: _status(w, r, "GET", f"/studios/validate?name=free-{r}"),
        204,
        set(ROLES),
    ),
    "connect": (
        lambda w, r: _status(w, r, "GET", f"/studios/{w.running}/connect", allow_redirects=False),
        409,
        {"owner", "admin", "maintain", "launch", "connect"},
    ),
    "add a studio": (
        lambda w, r: _status(
            w,
            r,
            "POST",
            "/studios?autoStart=false",
            {"name": f"new-{r}", "computeEnvId": w.h.compute_env_id},
        ),
        200,
        {"owner", "admin", "maintain"},
    ),
    "edit a studio": (
        lambda w, r: _status(w, r, "PUT", f"/studios/{w.shared}", {"description": r}),
        200,
        {"owner", "admin", "maintain"},
    ),
    "edit resource labels": (
        lambda w, r: _status(w, r, "PUT", f"/studios/{w.shared}", {"labelIds": [1]}),
        200,
        {"owner", "admin", "maintain"},
    ),
    "stop a session": (
        lambda w, r: _status(w, r, "PUT", f"/studios/{w.own[r]}/stop"),
        200,
        {"owner", "admin", "maintain"},
    ),
    "start a session": (
        lambda w, r: _status(w, r, "PUT", f"/studios/{w.own[r]}/start"),
        200,
        {"owner", "admin", "maintain"},
    ),
    "delete a studio": (
        # Started above (allowed roles) and so not deletable: use the checkpoint-less twin.
        lambda w, r: _status(w, r, "DELETE", f"/studios/{w.own[r + '-del']}"),
        204,
        {"owner", "admin", "maintain"},
    ),
    "add as new": (
        lambda w, r: _status(
            w,
            r,
            "POST",
            "/studios?autoStart=false",
            {
                "name": f"clone-{r}",
                "computeEnvId": w.h.compute_env_id,
                "initialCheckpointId": w.checkpoint,
            },
        ),
        200,
        {"owner", "admin", "maintain"},
    ),
    "rename a checkpoint": (
        lambda w, r: _status(
            w,
            r,
            "PUT",
            f"/studios/{w.shared}/checkpoints/{w.checkpoint}",
            {"name": f"renamed by {r}"},
        ),
        200,
        {"owner", "admin", "maintain"},
    ),
    "edit workspace Studios settings": (
        lambda w, r: _status(
            w, r, "PUT", "/orgs/1/workspaces/1/settings/studios", {"lifespanHours": 8}
        ),
        204,
        {"owner", "admin"},
    ),
    "view workspace Studios settings": (
        lambda w, r: _status(w, r, "GET", "/orgs/1/workspaces/1/settings/studios"),
        200,
        set(ROLES),
    ),
    "add a compute environment": (
        lambda w, r: _status(
            w,
            r,
            "POST",
            "/compute-envs",
            {
                "computeEnv": {
                    "name": f"ce-{r}",
                    "platform": "studio-agent",
                    "config": {"workDir": "/w"},
                }
            },
        ),
        200,
        {"owner", "admin"},
    ),
    "add a participant": (
        lambda w, r: _status(
            w,
            r,
            "PUT",
            "/orgs/1/workspaces/1/participants/add",
            {"userNameOrEmail": f"newcomer-{r}"},
        ),
        200,
        {"owner", "admin", "maintain"},
    ),
    "list participants": (
        lambda w, r: _status(w, r, "GET", "/orgs/1/workspaces/1/participants"),
        200,
        set(ROLES),
    ),
}


@pytest.fixture
async def world(controller_harness: ControllerHarness) -> World:
    h = controller_harness
    w = World(h)
    for role in ROLES:
        _, w.tokens[role] = await add_user(h, f"user-{role}", role)
        await add_user(h, f"newcomer-{role}", None)
        w.own[role] = await create(h, f"own {role}")
        w.own[role + "-del"] = await create(h, f"own {role} del")
    w.shared = await create(h, "shared")
    # Label 1, for "edit resource labels".
    await h.request(
        "POST", "/labels", {"name": "env", "value": "prod", "resource": True}, expect=200
    )
    w.checkpoint = await add_checkpoint(h, w.shared, "shared_1")
    w.running = await create(h, "running")
    await mark_running(h, w.running)
    return w


@pytest.mark.parametrize("role", ROLES)
async def test_every_action_for_every_role(world: World, role: str) -> None:
    failures = []
    for name, (action, success, allowed) in ACTIONS.items():
        status = await action(world, role)
        expected = success if role in allowed else 403
        if status != expected:
            failures.append(f"{name}: {status}, expected {expected}")
    assert not failures, f"role {role}: " + "; ".join(failures)


async def test_private_studio(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    creator_id, creator = await add_user(h, "creator", "maintain")
    friend_id, friend = await add_user(h, "friend", "connect")
    _, other = await add_user(h, "other", "maintain")
    _, admin = await add_user(h, "wsp-admin", "admin")
    _, viewer = await add_user(h, "viewer", "view")
    sid = await create(h, "private one", token=creator, isPrivate=True, allowedUserIds=[friend_id])
    _, body = await h.request("GET", f"/studios/{sid}", token=viewer, expect=200)
    assert body["isPrivate"] is True
    assert [u["id"] for u in body["allowedUsers"]] == [friend_id]
    assert body["user"]["id"] == creator_id
    await mark_running(h, sid)

    async def connect(token: str) -> int:
        status, _ = await h.request(
            "GET", f"/studios/{sid}/connect", token=token, allow_redirects=False
        )
        return status

    assert await connect(creator) == 409  # past authorisation: the agent is not connected
    assert await connect(friend) == 409
    for token in (other, admin, h.admin_token, viewer):
        assert await connect(token) == 403
    status, body = await h.request("GET", f"/studios/{sid}/connect", token=admin)
    assert status == 403 and "private" in body["message"]
    # Admins and owners may stop, start and delete it; other maintainers may not.
    status, body = await h.request("PUT", f"/studios/{sid}/stop", token=other)
    assert status == 403 and "private" in body["message"]
    await h.request("PUT", f"/studios/{sid}/stop", token=admin, expect=200)
    status, _ = await h.request("PUT", f"/studios/{sid}", {"description": "x"}, token=other)
    assert status == 403
    # Unknown or foreign allowed users are refused.
    status, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {
            "name": "p2",
            "computeEnvId": h.compute_env_id,
            "isPrivate": True,
            "allowedUserIds": [999],
        },
        token=creator,
    )
    assert status == 400 and "allowedUserIds" in body["message"]


async def test_private_by_default_setting(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    await h.request(
        "PUT",
        "/orgs/1/workspaces/1/settings/studios",
        {"privateStudioByDefault": True, "lifespanHours": 4},
        expect=204,
    )
    _, body = await h.request("GET", "/orgs/1/workspaces/1/settings/studios", expect=200)
    assert body == {
        "orgId": 1,
        "wspId": 1,
        "lifespanHours": 4,
        "privateStudioByDefault": True,
        "containerRepository": None,
        "nameStrategy": None,
    }
    sid = await create(h, "by default")
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    assert body["isPrivate"] is True and body["effectiveLifespanHours"] == 4
    sid = await create(h, "explicitly public", isPrivate=False)
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    assert body["isPrivate"] is False
    status, body = await h.request(
        "PUT", "/orgs/1/workspaces/1/settings/studios", {"lifespanHours": -1}
    )
    assert status == 400 and "lifespanHours" in body["message"]
    status, _ = await h.request("GET", "/orgs/2/workspaces/1/settings/studios")
    assert status == 404


async def test_team_role_is_inherited_and_highest_wins(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    user_id, token = await add_user(h, "teamed", "view")
    sid = await create(h, "team target")
    status, _ = await h.request("PUT", f"/studios/{sid}/stop", token=token)
    assert status == 403
    _, body = await h.request("POST", "/orgs/1/teams", {"team": {"name": "devs"}}, expect=200)
    team_id = body["team"]["teamId"]
    _, body = await h.request(
        "POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "teamed"}, expect=200
    )
    assert body["member"]["memberId"] == user_id
    _, body = await h.request(
        "PUT", "/orgs/1/workspaces/1/participants/add", {"teamId": team_id}, expect=200
    )
    participant = body["participant"]
    assert participant["type"] == "TEAM" and participant["wspRole"] == "launch"
    status, _ = await h.request("PUT", f"/studios/{sid}/stop", token=token)
    assert status == 403  # launch (team) > view (direct), still below maintain
    await h.request(
        "PUT",
        f"/orgs/1/workspaces/1/participants/{participant['participantId']}/role",
        {"role": "maintain"},
        expect=204,
    )
    await h.request("PUT", f"/studios/{sid}/stop", token=token, expect=200)
    # A team member without a direct role still belongs to the workspace.
    _, lone = await add_user(h, "lone", None)
    assert (await h.request("GET", f"/studios/{sid}", token=lone))[0] == 404
    await h.request("POST", f"/orgs/1/teams/{team_id}/members", {"userNameOrEmail": "lone"})
    await h.request("GET", f"/studios/{sid}", token=lone, expect=200)
    _, body = await h.request("GET", "/orgs/1/teams", expect=200)
    assert body["teams"][0]["membersCount"] == 2


async def test_another_workspace_is_404_never_403(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        session.add(Workspace(id=2, org_id=1, name="other"))
    _, outsider = await add_user(h, "outsider", "owner", workspace_id=2)
    sid = await create(h, "ours")
    checkpoint = await add_checkpoint(h, sid, "ours_1")
    for method, path, body in [
        ("GET", f"/studios/{sid}", None),
        ("PUT", f"/studios/{sid}", {"description": "x"}),
        ("DELETE", f"/studios/{sid}", None),
        ("PUT", f"/studios/{sid}/start", None),
        ("PUT", f"/studios/{sid}/stop", None),
        ("POST", f"/studios/{sid}/lifespan", None),
        ("GET", f"/studios/{sid}/checkpoints", None),
        ("GET", f"/studios/{sid}/checkpoints/{checkpoint}", None),
        ("PUT", f"/studios/{sid}/checkpoints/{checkpoint}", {"name": "x"}),
        ("GET", f"/studios/{sid}/compatible-ce", None),
        ("GET", f"/studios/{sid}/connect", None),
        ("GET", "/studios", None),
        ("GET", "/orgs/1/workspaces/1/participants", None),
        ("GET", "/orgs/1/workspaces/1/settings/studios", None),
        ("PUT", "/orgs/1/workspaces/1/settings/studios", {"lifespanHours": 1}),
    ]:
        status, _ = await h.request(method, path, body, token=outsider)
        assert status == 404, f"{method} {path}: {status}"
    # Cloning another workspace's checkpoint: 404 too.
    status, _ = await h.request(
        "POST",
        "/studios?workspaceId=2&autoStart=false",
        {"name": "thief", "computeEnvId": h.compute_env_id, "initialCheckpointId": checkpoint},
        token=outsider,
    )
    assert status == 404
    # The studio asked for with the wrong workspaceId: 404 even for its owner.
    status, _ = await h.request("GET", f"/studios/{sid}?workspaceId=2")
    assert status == 404
