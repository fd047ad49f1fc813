"""REST API of the controller, without agents (tests/conftest.py runs it)."""

from __future__ import annotations

from typing import Any

import yaml

from tests import REPO_ROOT
from tests.conftest import ControllerHarness


async def _create(h: ControllerHarness, name: str = "my studio", **extra: object) -> dict[str, Any]:
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": name, "computeEnvId": h.compute_env_id, **extra},
        expect=200,
    )
    studio: dict[str, Any] = body["studio"]
    return studio


async def test_missing_or_wrong_token_is_401(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    status, body = await h.request("GET", "/studios", token=None)
    assert status == 401 and "Authorization" in body["message"]
    status, body = await h.request("GET", "/studios", token="wrong")
    assert status == 401 and body["message"]
    status, body = await h.request(
        "GET", "/studios", token=None, headers={"Authorization": "Basic abc"}
    )
    assert status == 401


async def test_openapi_is_served_without_token(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    assert h.http is not None
    async with h.http.get(h.url + "/openapi.yaml") as resp:
        assert resp.status == 200
        text = await resp.text()
    import yaml

    spec = yaml.safe_load(text)
    assert "/studios" in spec["paths"] and "/studios/{sessionId}/connect" in spec["paths"]


async def test_unknown_studio_is_404(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    for path in ("/studios/0badc0de", "/studios/not-an-id", "/studios/0badc0de/checkpoints"):
        status, body = await h.request("GET", path)
        assert status == 404 and "not found" in body["message"], path
    status, body = await h.request("PUT", "/studios/0badc0de/start")
    assert status == 404


async def test_create_validation(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    status, body = await h.request("POST", "/studios", raw=b"{not json")
    assert status == 400 and body["message"].startswith("malformed JSON")
    status, body = await h.request("POST", "/studios", {"computeEnvId": h.compute_env_id})
    assert status == 400 and body["message"].startswith("name"), body
    status, body = await h.request("POST", "/studios", {"name": "x"})
    assert status == 400 and "computeEnvId" in body["message"], body
    status, body = await h.request(
        "POST", "/studios", {"name": "x" * 81, "computeEnvId": h.compute_env_id}
    )
    assert status == 400 and body["message"].startswith("name"), body
    status, body = await h.request(
        "POST",
        "/studios",
        {"name": "x", "computeEnvId": h.compute_env_id, "configuration": {"cpu": -1}},
    )
    assert status == 400 and "configuration.cpu" in body["message"], body
    status, body = await h.request(
        "POST",
        "/studios",
        {"name": "x", "computeEnvId": h.compute_env_id, "dataStudioToolUrl": "not an image"},
    )
    assert status == 400 and "dataStudioToolUrl" in body["message"]
    status, body = await h.request(
        "POST", "/studios?workspaceId=abc", {"name": "x", "computeEnvId": h.compute_env_id}
    )
    assert status == 400 and "workspaceId" in body["message"]
    status, body = await h.request("GET", "/studios?max=ten")
    assert status == 400 and "max" in body["message"]
    status, body = await h.request("GET", "/studios?offset=-1")
    assert status == 400 and "offset" in body["message"]
    status, body = await h.request("POST", "/studios", {"name": "x", "computeEnvId": "0" * 16})
    assert status == 404 and "compute environment" in body["message"]
    status, body = await h.request(
        "POST", "/studios?workspaceId=99", {"name": "x", "computeEnvId": h.compute_env_id}
    )
    assert status == 404


async def test_create_without_start_and_dto_shape(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    studio = await _create(
        h,
        description="hello",
        configuration={"cpu": 2, "memory": 2048, "environment": {"A": "1"}},
        isPrivate=True,
        someUnknownField={"ignored": True},
    )
    assert len(studio["sessionId"]) == 8 and int(studio["sessionId"], 16) >= 0
    assert studio["workspaceId"] == 1
    assert studio["user"]["userName"] == "admin"
    assert studio["template"] == {
        "repository": "studios/python-http:3.11-0.1",
        "tool": "python-http",
        "status": "recommended",
    }
    assert studio["customImage"] is False
    assert studio["computeEnv"]["id"] == h.compute_env_id
    assert studio["computeEnv"]["platform"] == "studio-agent"
    assert studio["computeEnv"]["workDir"] == "file:///tmp/work"
    assert studio["configuration"] == {"cpu": 2, "memory": 2048, "environment": {"A": "1"}}
    assert studio["statusInfo"]["status"] == "stopped"
    assert studio["statusInfo"]["lastUpdate"].endswith("Z")
    assert studio["studioUrl"] == f"{h.url}/studios/{studio['sessionId']}/connect"
    assert studio["isPrivate"] is True
    assert studio["activeConnections"] == [] and studio["mountedDataLinks"] == []
    # No value, no field (issue 14): never null.
    assert "parentCheckpoint" not in studio and "labels" not in studio
    assert "region" not in studio["computeEnv"] and "stopReason" not in studio["statusInfo"]
    assert studio["description"] == "hello"

    _, again = await h.request("GET", f"/studios/{studio['sessionId']}", expect=200)
    assert again == studio


async def test_custom_image(controller_harness: ControllerHarness) -> None:
    studio = await _create(controller_harness, dataStudioToolUrl="ghcr.io/acme/jupyter:4.1-0.1")
    assert studio["customImage"] is True
    assert studio["template"]["repository"] == "ghcr.io/acme/jupyter:4.1-0.1"
    assert studio["template"]["tool"] == "jupyter"


async def test_duplicate_name_is_409_and_delete_frees_it(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    studio = await _create(h, "twin")
    status, body = await h.request(
        "POST", "/studios", {"name": "twin", "computeEnvId": h.compute_env_id}
    )
    assert status == 409 and "twin" in body["message"]
    await h.request("DELETE", f"/studios/{studio['sessionId']}", expect=204)
    status, _ = await h.request("GET", f"/studios/{studio['sessionId']}")
    assert status == 404
    await _create(h, "twin")


async def test_list_search_and_pagination(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    for name in ("alpha one", "alpha two", "beta"):
        await _create(h, name)
    _, body = await h.request("GET", "/studios", expect=200)
    assert body["totalSize"] == 3 and len(body["studios"]) == 3
    _, body = await h.request("GET", "/studios?search=alpha", expect=200)
    assert body["totalSize"] == 2
    assert {s["name"] for s in body["studios"]} == {"alpha one", "alpha two"}
    _, body = await h.request("GET", "/studios?search=python-http&max=1&offset=1", expect=200)
    assert body["totalSize"] == 3 and len(body["studios"]) == 1
    _, body = await h.request("GET", "/studios?search=status:running", expect=200)
    assert body["totalSize"] == 0


async def test_templates(controller_harness: ControllerHarness) -> None:
    _, body = await controller_harness.request("GET", "/studios/templates", expect=200)
    repositories = {t["repository"]: t for t in body["templates"]}
    shipped = yaml.safe_load((REPO_ROOT / "controller" / "templates.yaml").read_text())
    # The shipped catalogue, each tool at one version: all recommended.
    assert body["totalSize"] == len(repositories) == len(shipped["templates"])
    assert set(repositories) == {t["repository"] for t in shipped["templates"]}
    assert "studios/jupyterlab:4.6-0.1" in repositories
    assert all(t["status"] == "recommended" for t in body["templates"])


async def test_start_without_agent_waits_and_stop_is_refused(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    studio = await _create(h)
    sid = studio["sessionId"]
    _, body = await h.request("PUT", f"/studios/{sid}/start", expect=200)
    assert body["jobSubmitted"] is True and body["sessionId"] == sid
    assert body["statusInfo"]["status"] == "starting"
    assert h.compute_env_id in body["statusInfo"]["message"]
    _, studio = await h.request("GET", f"/studios/{sid}", expect=200)
    assert studio["progress"][0]["status"] == "pending"
    status, body = await h.request("PUT", f"/studios/{sid}/start", {})
    assert status == 409 and "starting" in body["message"]
    status, body = await h.request("PUT", f"/studios/{sid}/stop")
    assert status == 409 and "starting" in body["message"]
    status, body = await h.request("DELETE", f"/studios/{sid}")
    assert status == 409


async def test_stop_of_stopped_studio_is_idempotent(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    sid = (await _create(h))["sessionId"]
    _, body = await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    assert body["jobSubmitted"] is False and body["statusInfo"]["status"] == "stopped"


async def test_compute_envs_and_agents(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    _, body = await h.request("GET", "/compute-envs", expect=200)
    [env] = body["computeEnvs"]
    assert env["id"] == h.compute_env_id and len(env["id"]) == 16
    assert env["platform"] == "studio-agent" and env["workDir"] == "file:///tmp/work"
    assert env["config"]["bootDiskSizeGb"] == 30
    status, body = await h.request(
        "POST",
        "/compute-envs",
        {"computeEnv": {"name": "local", "platform": "studio-agent", "config": {"workDir": "/w"}}},
    )
    assert status == 409
    status, body = await h.request(
        "POST",
        "/compute-envs",
        {"computeEnv": {"name": "aws", "platform": "aws-batch", "config": {"workDir": "/w"}}},
    )
    assert status == 400 and "platform" in body["message"]
    status, body = await h.request(
        "POST", "/compute-envs", {"computeEnv": {"name": "x", "config": {}}}
    )
    assert status == 400 and "computeEnv.config.workDir" in body["message"], body
    _, body = await h.request("GET", "/agents", expect=200)
    assert body == {"agents": []}


async def test_roles(controller_harness: ControllerHarness) -> None:
    from controller.auth import Role
    from controller.cli import add_user
    from controller.config import ControllerConfig

    h = controller_harness
    config = ControllerConfig(data_dir=h.data_dir)
    viewer = await add_user(config, name="viewer", email="v@x", workspace_id=1, role=Role.VIEW)
    sid = (await _create(h))["sessionId"]
    _, body = await h.request("GET", f"/studios/{sid}", token=viewer, expect=200)
    status, body = await h.request("PUT", f"/studios/{sid}/start", token=viewer)
    assert status == 403 and "maintain" in body["message"]
    status, body = await h.request(
        "POST", "/studios", {"name": "v", "computeEnvId": h.compute_env_id}, token=viewer
    )
    assert status == 403
    status, body = await h.request(
        "POST",
        "/compute-envs",
        {"computeEnv": {"name": "v", "platform": "studio-agent", "config": {"workDir": "/w"}}},
        token=viewer,
    )
    assert status == 403
    status, body = await h.request("GET", f"/studios/{sid}/connect", token=viewer)
    assert status == 403
    # A user of another workspace sees nothing: 404, not 403.
    from controller.models import Workspace

    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        session.add(Workspace(id=2, org_id=1, name="other"))
    outsider = await add_user(config, name="outsider", email="o@x", workspace_id=2, role=Role.OWNER)
    status, _ = await h.request("GET", f"/studios/{sid}", token=outsider)
    assert status == 404
    status, _ = await h.request("PUT", f"/studios/{sid}/stop", token=outsider)
    assert status == 404
    status, _ = await h.request("GET", "/studios", token=outsider)
    assert status == 404
    _, body = await h.request("GET", "/studios?workspaceId=2", token=outsider, expect=200)
    assert body["totalSize"] == 0


async def test_openapi_document_is_valid_and_covers_every_route(
    controller_harness: ControllerHarness,
) -> None:
    """The spec is valid OpenAPI 3.0 and documents every route the app serves.

    (Every response the controller tests see is validated against it by
    `tests.conftest.check_response`.)
    """
    import yaml
    from openapi_spec_validator import validate

    from tests.conftest import SPEC_PATH

    spec = yaml.safe_load(SPEC_PATH.read_text())
    validate(spec)
    h = controller_harness
    assert h.controller is not None and h.controller.runner is not None
    app = h.controller.runner.app
    missing = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method == "HEAD" or path is None:
            continue
        if route.method.lower() not in spec["paths"].get(path, {}):
            missing.append(f"{route.method} {path}")
    assert not missing, f"routes missing from openapi.yaml: {missing}"
