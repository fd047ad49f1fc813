"""Every new endpoint of issue 14 (organisations, members, workspaces, teams, users) for
each organisation role (owner, member, collaborator), each of the six workspace roles
(held by members of the organisation), and someone outside it; another organisation's
objects are 404 to all of them. reference/studio-roles.md, "Organisation roles".

A caller that may act gets the action's success status; a caller who sees the
organisation but may not act gets 403 (as the reference answers); a caller who may not
see the object gets 404. Destructive actions run the allowed caller last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.auth import Role, hash_token, new_token
from controller.models import ApiToken, OrgMember, Participant, User
from tests.conftest import ControllerHarness

WSP_ROLES = [r.value for r in Role]
CALLERS = ["outsider", "collaborator", "org-member", *(f"wsp-{r}" for r in WSP_ROLES)]
# The organisation's owner acts last (destructive actions succeed once).
ALL = [*CALLERS, "org-owner"]
MEMBERS = {"org-owner", "org-member", *(f"wsp-{r}" for r in WSP_ROLES)}


@dataclass
class World:
    h: ControllerHarness
    tokens: dict[str, str] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    team: int = 0
    shared_wsp: int = 0
    other_org: int = 0
    other_wsp: int = 0
    other_team: int = 0


async def _user(w: World, name: str, org_role: str | None, wsp_role: str | None) -> None:
    assert w.h.controller is not None and w.h.controller.db is not None
    token = new_token()
    async with w.h.controller.db.transaction() as session:
        user = User(user_name=name, email=f"{name}@example.org")
        session.add(user)
        await session.flush()
        if org_role is not None:
            session.add(OrgMember(org_id=1, user_id=user.id, role=org_role))
        if wsp_role is not None:
            session.add(Participant(workspace_id=1, user_id=user.id, role=wsp_role))
        session.add(ApiToken(user_id=user.id, name="t", token_hash=hash_token(token)))
        w.tokens[name], w.ids[name] = token, user.id


async def _world(h: ControllerHarness) -> World:
    w = World(h)
    await _user(w, "outsider", None, None)
    await _user(w, "collaborator", None, "launch")
    await _user(w, "org-member", "member", None)
    await _user(w, "org-owner", "owner", None)
    for role in WSP_ROLES:
        await _user(w, f"wsp-{role}", "member", role)
    for spare in ("spare", "spare2", "victim"):
        await _user(w, spare, None, None)
    await h.request("PUT", "/orgs/1/members/add", {"user": "victim"}, expect=200)
    _, body = await h.request("POST", "/orgs/1/teams", {"team": {"name": "crew"}}, expect=200)
    w.team = body["team"]["teamId"]
    _, body = await h.request(
        "POST",
        "/orgs/1/workspaces",
        {"workspace": {"name": "shared", "fullName": "Shared", "visibility": "SHARED"}},
        expect=200,
    )
    w.shared_wsp = body["workspace"]["id"]
    _, body = await h.request(
        "POST", "/orgs", {"organization": {"name": "other", "fullName": "Other"}}, expect=200
    )
    w.other_org = body["organization"]["orgId"]
    _, body = await h.request(
        "POST",
        f"/orgs/{w.other_org}/workspaces",
        {"workspace": {"name": "w2", "fullName": "W2"}},
        expect=200,
    )
    w.other_wsp = body["workspace"]["id"]
    _, body = await h.request(
        "POST", f"/orgs/{w.other_org}/teams", {"team": {"name": "t2"}}, expect=200
    )
    w.other_team = body["team"]["teamId"]
    return w


Expect = Callable[[str], int]


def allowed(success: int, who: set[str], *, seen_by: set[str] | None = None) -> Expect:
    """success for `who`, 403 for those who see the object (default: anyone in the
    organisation), 404 for the rest."""
    seers = seen_by if seen_by is not None else {c for c in ALL if c != "outsider"}

    def expect(caller: str) -> int:
        if caller in who:
            return success
        return 403 if caller in seers else 404

    return expect


OWNER = {"org-owner"}
IN_ORG = {c for c in ALL if c != "outsider"}


def actions(w: World) -> list[tuple[str, str, str, Any, Expect]]:
    t = f"/orgs/1/teams/{w.team}"
    return [
        ("describe org", "GET", "/orgs/1", None, allowed(200, IN_ORG)),
        ("update org", "PUT", "/orgs/1", {"description": "d"}, allowed(204, OWNER)),
        ("list members", "GET", "/orgs/1/members", None, allowed(200, MEMBERS)),
        ("list collaborators", "GET", "/orgs/1/collaborators", None, allowed(200, MEMBERS)),
        ("add member", "PUT", "/orgs/1/members/add", {"user": "spare"}, allowed(200, OWNER)),
        (
            "member role",
            "PUT",
            f"/orgs/1/members/{w.ids['spare']}/role",
            {"role": "collaborator"},
            allowed(204, OWNER),
        ),
        (
            "delete member",
            "DELETE",
            f"/orgs/1/members/{w.ids['victim']}",
            None,
            allowed(204, OWNER),
        ),
        ("list workspaces", "GET", "/orgs/1/workspaces", None, allowed(200, IN_ORG)),
        (
            "validate workspace",
            "GET",
            "/orgs/1/workspaces/validate?name=x1",
            None,
            allowed(204, MEMBERS),
        ),
        (
            "create workspace",
            "POST",
            "/orgs/1/workspaces",
            {"workspace": {"name": "fresh", "fullName": "Fresh"}},
            allowed(200, OWNER),
        ),
        (
            "describe workspace 1",
            "GET",
            "/orgs/1/workspaces/1",
            None,
            # A member who takes no part in a PRIVATE workspace does not see it.
            allowed(200, IN_ORG - {"org-member"}, seen_by=set()),
        ),
        (
            "update workspace 1",
            "PUT",
            "/orgs/1/workspaces/1",
            {"description": "d"},
            allowed(200, {"org-owner", "wsp-owner"}, seen_by=IN_ORG - {"org-member"}),
        ),
        (
            "delete a shared workspace",
            "DELETE",
            f"/orgs/1/workspaces/{w.shared_wsp}",
            None,
            # Members see a SHARED workspace; collaborators do not.
            allowed(204, OWNER, seen_by=MEMBERS),
        ),
        ("list teams", "GET", "/orgs/1/teams", None, allowed(200, MEMBERS)),
        ("validate team", "GET", "/orgs/1/teams/validate?name=zz", None, allowed(204, MEMBERS)),
        (
            "create team",
            "POST",
            "/orgs/1/teams",
            {"team": {"name": "new-team"}},
            allowed(200, OWNER),
        ),
        ("describe team", "GET", t, None, allowed(200, MEMBERS)),
        ("update team", "PUT", t, {"description": "d"}, allowed(204, OWNER)),
        ("team members", "GET", f"{t}/members", None, allowed(200, MEMBERS)),
        (
            "add team member",
            "POST",
            f"{t}/members",
            {"userNameOrEmail": "spare2"},
            allowed(200, OWNER),
        ),
        (
            "remove team member",
            "DELETE",
            f"{t}/members/{w.ids['spare2']}/delete",
            None,
            allowed(204, OWNER),
        ),
        ("team workspaces", "GET", f"{t}/workspaces", None, allowed(200, MEMBERS)),
        ("delete team", "DELETE", t, None, allowed(204, OWNER)),
        ("describe user 1", "GET", "/users/1", None, lambda c: 200 if c in MEMBERS else 404),
        # Another organisation's objects: 404 to everyone here.
        ("other org", "GET", f"/orgs/{w.other_org}", None, lambda c: 404),
        ("other org members", "GET", f"/orgs/{w.other_org}/members", None, lambda c: 404),
        (
            "other workspace",
            "GET",
            f"/orgs/{w.other_org}/workspaces/{w.other_wsp}",
            None,
            lambda c: 404,
        ),
        (
            "other org's workspace under org 1",
            "GET",
            f"/orgs/1/workspaces/{w.other_wsp}",
            None,
            lambda c: 404,
        ),
        ("other team", "GET", f"/orgs/{w.other_org}/teams/{w.other_team}", None, lambda c: 404),
        (
            "other team under org 1",
            "GET",
            f"/orgs/1/teams/{w.other_team}",
            None,
            # Collaborators see no team of organisation 1 at all (403 before any lookup).
            lambda c: 403 if c == "collaborator" else 404,
        ),
        ("delete other org", "DELETE", f"/orgs/{w.other_org}", None, lambda c: 404),
    ]


async def test_every_new_endpoint_for_every_role(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    w = await _world(h)
    failures = []
    for name, method, path, body, expect in actions(w):
        for caller in ALL:
            status, answer = await h.request(method, path, body, token=w.tokens[caller])
            if status != expect(caller):
                failures.append(
                    f"{name} as {caller}: {status} (expected {expect(caller)}) {answer}"
                )
    assert not failures, "\n".join(failures)


async def test_own_workspaces_for_every_role(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    w = await _world(h)
    for caller in ALL:
        _, body = await h.request(
            "GET", f"/user/{w.ids[caller]}/workspaces", token=w.tokens[caller], expect=200
        )
        ids = {e.get("workspaceId") for e in body["orgsAndWorkspaces"]}
        if caller == "outsider":
            assert ids == set()
        elif caller == "org-owner":
            assert {1, w.shared_wsp} <= ids
        elif caller == "org-member":
            assert ids == {None}
        else:
            assert 1 in ids
        # Anyone else's list: 403.
        await h.request("GET", "/user/1/workspaces", token=w.tokens[caller], expect=403)
