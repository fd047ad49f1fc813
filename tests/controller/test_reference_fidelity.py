"""Answers as Seqera's reference describes them (issue 14).

A typed client generated from `tests/reference/seqera-studios-openapi.yaml` walks every
`/studios` operation of the reference through a studio's life (create with a data-link, run
with progress and a connected user, edit, extend, stop with a checkpoint, checkpoints, add as
new, start again, delete): every body validates against the reference's schema (the harness
checks each answer, `tests.api_contract`) and holds no `null` at all (none of these fields
is one the reference lets us send as null with a meaning). Then the check itself: a `null`
where the reference declares a string, an object or an enum fails it, as does a value
outside the reference's enum; the one overlay (`studio-agent` among the platforms) applies.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from studios.agent.v1 import agent_pb2 as pb

from tests import api_contract
from tests.conftest import ControllerHarness
from tests.controller.conftest import AgentFactory
from tests.controller.test_datalinks import add_credentials, add_link

REFERENCE = api_contract.REFERENCE_PATHS[0]


def _reference_studios_operations() -> set[tuple[str, str]]:
    spec = yaml.safe_load(REFERENCE.read_text())
    return {
        (method.upper(), template)
        for template, item in spec["paths"].items()
        if template.startswith("/studios")
        for method in item
        if method in ("get", "put", "post", "delete")
    }


def _nulls(body: Any, where: str = "") -> list[str]:
    """Where in `body` a null is."""
    if body is None:
        return [where or "(body)"]
    if isinstance(body, dict):
        return [n for k, v in body.items() for n in _nulls(v, f"{where}/{k}")]
    if isinstance(body, list):
        return [n for i, v in enumerate(body) for n in _nulls(v, f"{where}/{i}")]
    return []


class TypedClient:
    """Calls the harness and keeps what a typed client would have parsed."""

    def __init__(self, harness: ControllerHarness) -> None:
        self.h = harness
        # (method, our template) -> the reference document that validated a body of it.
        self.validated: dict[tuple[str, str], str] = {}

    async def call(self, method: str, path: str, body: Any = None, *, expect: int) -> Any:
        status, answer = await self.h.request(method, path, body, expect=expect)
        # The harness has checked it already; this says which document did.
        checked = api_contract.check_response(
            method, path, status, "application/json" if answer is not None else "", answer
        )
        if answer is not None:  # None: no body (a 204)
            assert not _nulls(answer), f"{method} {path}: null at {_nulls(answer)}: {answer}"
        key = (method, checked.template)
        if checked.reference is not None:
            self.validated[key] = checked.reference
        elif status == 204:
            # No body: nothing to validate, the operation is the reference's all the same.
            assert api_contract.reference_operation(method, checked.template) is not None
            self.validated[key] = "(no body)"
        return answer


async def _running(h: ControllerHarness, agent: Any, sid: str, *, start: int = 0) -> int:
    """Have the agent run `sid` (its desired generation) with progress; the generation."""
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=start)
    step = pb.ProgressStep(message="pulling", status=pb.STEP_STATUS_SUCCEEDED)
    await agent.send(
        pb.ConnectRequest(
            session=pb.SessionObserved(
                session_id=sid,
                generation=desired.generation,
                status=pb.SESSION_STATUS_RUNNING,
                runtime="local",
                tool_port=1,
                progress=[step],
            )
        )
    )
    for _ in range(200):
        _, studio = await h.request("GET", f"/studios/{sid}", expect=200)
        if studio["statusInfo"]["status"] == "running":
            return int(desired.generation)
    raise AssertionError(f"studio {sid} is not running: {studio}")


async def test_a_typed_client_walks_every_studios_operation(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    client = TypedClient(h)
    agent = make_agent()
    await agent.connect()

    templates = await client.call("GET", "/studios/templates", expect=200)
    assert templates["templates"]
    await client.call("GET", "/studios/validate?name=walk", expect=204)
    credentials = await add_credentials(h)
    link = await add_link(h, "inputs", "s3://walk-bucket", credentials)
    created = await client.call(
        "POST",
        "/studios",
        {
            "name": "walk",
            "description": "a typed client's walk",
            "computeEnvId": h.compute_env_id,
            "configuration": {
                "cpu": 1,
                "lifespanHours": 2,
                "mountDataV2": [{"dataLinkId": link["id"]}],
            },
        },
        expect=200,
    )
    studio = created["studio"]
    sid = studio["sessionId"]
    # Never set, so absent (each was a null before issue 14).
    assert "parentCheckpoint" not in studio and "labels" not in studio
    assert "region" not in studio["computeEnv"] and "credentialsId" not in studio["computeEnv"]
    assert "stopReason" not in studio["statusInfo"]
    [mounted] = studio["mountedDataLinks"]
    assert mounted["mountName"] == "inputs" and "mountState" not in mounted

    generation = await _running(h, agent, sid)
    await agent.send(
        pb.ConnectRequest(
            connections=pb.SessionConnections(
                session_id=sid,
                connections=[
                    pb.ActiveConnection(user_id=1, user_name="admin", connections=1, last_active=1)
                ],
            )
        )
    )
    for _ in range(200):
        studio = await client.call("GET", f"/studios/{sid}", expect=200)
        if studio["activeConnections"]:
            break
    [connected] = studio["activeConnections"]
    assert connected["lastActive"] == "1970-01-01T00:00:01.000Z" and "avatar" not in connected
    assert studio["lastStarted"].endswith("Z") and studio["progress"]

    listing = await client.call("GET", "/studios?search=walk", expect=200)
    assert [s["sessionId"] for s in listing["studios"]] == [sid]
    mounted_ids = await client.call("GET", "/studios/data-links", expect=200)
    assert mounted_ids["dataLinkIds"] == [link["id"]]
    extended = await client.call("POST", f"/studios/{sid}/lifespan", expect=200)
    assert extended["effectiveLifespanHours"] > 2
    compatible = await client.call("GET", f"/studios/{sid}/compatible-ce", expect=200)
    assert [e["id"] for e in compatible["computeEnvs"]] == [h.compute_env_id]

    mark = len(agent.responses)
    stopping = await client.call("PUT", f"/studios/{sid}/stop", expect=200)
    assert stopping["jobSubmitted"] is True and "stopReason" not in stopping["statusInfo"]
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    await agent.checkpoint(sid, generation, "walk-1")
    await agent.wait_ack(sid, "walk-1")
    await agent.report(sid, generation, pb.SESSION_STATUS_STOPPED)
    for _ in range(200):
        studio = await client.call("GET", f"/studios/{sid}", expect=200)
        if studio["statusInfo"]["status"] == "stopped":
            break
    assert studio["statusInfo"]["status"] == "stopped", studio
    assert "stopReason" not in studio["statusInfo"]
    # Edited while stopped (a running studio is 409).
    edited = await client.call("PUT", f"/studios/{sid}", {"description": "edited"}, expect=200)
    assert edited["description"] == "edited"

    checkpoints = await client.call("GET", f"/studios/{sid}/checkpoints", expect=200)
    [checkpoint] = checkpoints["checkpoints"]
    assert checkpoint["status"] == "finalized" and checkpoint["author"]["userName"] == "admin"
    path = f"/studios/{sid}/checkpoints/{checkpoint['id']}"
    await client.call("GET", path, expect=200)
    renamed = await client.call("PUT", path, {"name": "walk-final"}, expect=200)
    assert renamed["name"] == "walk-final"

    clone = await client.call(
        "POST",
        "/studios?autoStart=false",
        {
            "name": "walk-clone",
            "computeEnvId": h.compute_env_id,
            "initialCheckpointId": checkpoint["id"],
        },
        expect=200,
    )
    assert clone["studio"]["parentCheckpoint"] == {
        "checkpointId": checkpoint["id"],
        "checkpointName": "walk-final",
        "sessionId": sid,
        "studioName": "walk",
    }
    started = await client.call("PUT", f"/studios/{sid}/start", expect=200)
    assert started["statusInfo"]["status"] == "starting"
    await client.call("DELETE", f"/studios/{clone['studio']['sessionId']}", expect=204)

    walked = set()
    for method, template in client.validated:
        found = api_contract.reference_operation(method, template)
        assert found is not None
        walked.add((method, found.template))
    missing = _reference_studios_operations() - walked
    assert not missing, f"operations of the reference not walked: {sorted(missing)}"
    assert len(_reference_studios_operations()) == 15


def _studio_body(**status_info: Any) -> dict[str, Any]:
    return {
        "sessionId": "0123abcd",
        "workspaceId": 1,
        "user": {"id": 1, "userName": "admin", "email": "admin@localhost"},
        "name": "s",
        "template": {"repository": "studios/python-http:3.11-0.1", "tool": "python-http"},
        "customImage": False,
        "computeEnv": {"id": "e", "name": "local", "platform": "studio-agent", "workDir": "/w"},
        "configuration": {},
        "dateCreated": "2024-05-01T12:00:00.000Z",
        "lastUpdated": "2024-05-01T12:00:00.000Z",
        "statusInfo": {"status": "stopped", **status_info},
        "studioUrl": "http://localhost/studios/0123abcd/connect",
        "progress": [],
        "activeConnections": [],
        "isPrivate": False,
        "effectiveLifespanHours": 0,
        "mountedDataLinks": [],
    }


def test_the_check_catches_what_a_typed_client_breaks_on() -> None:
    check = api_contract.check_response
    checked = check("GET", "/studios/0123abcd", 200, "application/json", _studio_body())
    assert checked.reference == "seqera-studios-openapi.yaml"
    for bad, why in [
        (_studio_body(stopReason=None), "None for not nullable"),
        (_studio_body(stopReason="USER_REQUEST"), "is not one of"),
        ({**_studio_body(), "parentCheckpoint": None}, "None for not nullable"),
        (_studio_body(lastUpdate="2024-05-01 12:00"), "is not a 'date-time'"),
    ]:
        with pytest.raises(AssertionError, match=why):
            check("GET", "/studios/0123abcd", 200, "application/json", bad)
    # Our own fields beside the reference's pass (its schemas do not forbid them).
    check("GET", "/studios/0123abcd", 200, "application/json", {**_studio_body(), "extra": 1})
    # Additions of ours are checked against our document only.
    assert api_contract.reference_operation("GET", "/agents") is None
    assert api_contract.reference_operation("GET", "/studios/{sessionId}/connect") is None
    # The same structure under other parameter names is the reference's operation.
    found = api_contract.reference_operation("GET", "/studios/{id}/checkpoints/{cp}")
    assert found is not None and found.document == "seqera-studios-openapi.yaml"
    assert found.template == "/studios/{sessionId}/checkpoints/{checkpointId}"


def test_the_one_overlay_is_our_platform() -> None:
    """`studio-agent` joins the reference's compute-environment platforms, nothing else."""
    orgs = api_contract.reference_spec("seqera-orgs-openapi.yaml")
    schemas = orgs["components"]["schemas"]
    for name in ("ComputeEnvResponseDto", "ComputeEnv_ComputeConfig_"):
        enum = schemas[name]["properties"]["platform"]["enum"]
        assert enum[-1] == api_contract.OUR_PLATFORM and "local-platform" in enum
    errors = list(
        api_contract.schema_errors(
            orgs, schemas["ComputeEnvResponseDto"], {"platform": "studio-agent"}
        )
    )
    assert errors == []
    original = yaml.safe_load(api_contract.REFERENCE_PATHS[1].read_text())
    assert "studio-agent" not in str(original)
