"""Roles on the label and compute-environment endpoints of issue 14 (studio-roles.md): any
participant lists and describes; maintain and above manage labels ("edit studio resource
labels"); admins and owners manage compute environments. Another workspace's objects are
404 to everyone of this one, never 403."""

from __future__ import annotations

import pytest

from controller.models import Participant, Workspace
from tests.conftest import ControllerHarness
from tests.controller.test_roles import ROLES, add_user

EVERYONE = set(ROLES)
MAINTAIN = {"owner", "admin", "maintain"}
ADMIN = {"owner", "admin"}

# name: (method, path template, body, success status, roles allowed). {label} is a label
# and {env} a compute environment of workspace 1, made fresh for each role.
ENDPOINTS: dict[str, tuple[str, str, object, int, set[str]]] = {
    "list labels": ("GET", "/labels", None, 200, EVERYONE),
    "create a label": ("POST", "/labels", {"name": "new-{role}"}, 200, MAINTAIN),
    "update a label": ("PUT", "/labels/{label}", {"name": "renamed-{role}"}, 200, MAINTAIN),
    "delete a label": ("DELETE", "/labels/{label}", None, 204, MAINTAIN),
    "list compute envs": ("GET", "/compute-envs", None, 200, EVERYONE),
    "validate a compute env name": ("GET", "/compute-envs/validate?name=f", None, 204, EVERYONE),
    "describe a compute env": ("GET", "/compute-envs/{env}", None, 200, EVERYONE),
    "update a compute env": ("PUT", "/compute-envs/{env}", {"description": "d"}, 204, ADMIN),
    "disable a compute env": ("POST", "/compute-envs/{env}/disable", None, 204, ADMIN),
    "enable a compute env": ("POST", "/compute-envs/{env}/enable", None, 204, ADMIN),
    "make a compute env primary": ("POST", "/compute-envs/{env}/primary", None, 204, ADMIN),
    "validate a compute env": ("POST", "/compute-envs/{env}/validate", None, 200, ADMIN),
    "delete a compute env": ("DELETE", "/compute-envs/{env}", None, 204, ADMIN),
}


async def _fresh(h: ControllerHarness, role: str, workspace_id: int = 1) -> tuple[int, str]:
    """A label and a compute environment of the workspace, made by its admin (token)."""
    _, label = await h.request(
        "POST", f"/labels?workspaceId={workspace_id}", {"name": f"l-{role}"}, expect=200
    )
    _, env = await h.request(
        "POST",
        f"/compute-envs?workspaceId={workspace_id}",
        {"computeEnv": {"name": f"e-{role}", "config": {"workDir": "/w"}}},
        expect=200,
    )
    return int(label["id"]), str(env["computeEnvId"])


def _fill(text: str, role: str, label: int, env: str) -> str:
    return text.replace("{role}", role).replace("{label}", str(label)).replace("{env}", env)


@pytest.mark.parametrize("role", ROLES)
async def test_every_endpoint_for_every_role(
    controller_harness: ControllerHarness, role: str
) -> None:
    h = controller_harness
    _, token = await add_user(h, f"user-{role}", role)
    failures = []
    for n, (name, (method, path, body, success, allowed)) in enumerate(ENDPOINTS.items()):
        label, env = await _fresh(h, f"{role}-{n}")
        filled_body = None
        if isinstance(body, dict):
            filled_body = {k: _fill(str(v), role, label, env) for k, v in body.items()}
        status, _ = await h.request(method, _fill(path, role, label, env), filled_body, token=token)
        expected = success if role in allowed else 403
        if status != expected:
            failures.append(f"{name}: {status}, expected {expected}")
    assert not failures, failures


async def test_another_workspace_is_404(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        session.add(Workspace(id=2, org_id=1, name="elsewhere"))
        await session.flush()
        # The bootstrap admin (user 1) owns it, to make its objects.
        session.add(Participant(workspace_id=2, user_id=1, role="owner"))
    label, env = await _fresh(h, "theirs", workspace_id=2)
    for role in ROLES:
        _, token = await add_user(h, f"outsider-{role}", role)  # a role in workspace 1 only
        for name, (method, path, body, _success, _allowed) in ENDPOINTS.items():
            if "{" not in path and "workspaceId" not in path:
                # Workspace-scoped listings: asked for workspace 2, 404.
                path = path + ("&" if "?" in path else "?") + "workspaceId=2"
            filled = _fill(path, role, label, env)
            filled_body = (
                {k: _fill(str(v), role, label, env) for k, v in body.items()}
                if isinstance(body, dict)
                else None
            )
            status, _ = await h.request(method, filled, filled_body, token=token)
            assert status == 404, (role, name, status)
