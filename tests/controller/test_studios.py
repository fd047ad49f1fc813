"""The rest of the /studios API: update, validate, compatible compute
environments, mounted data-links, checkpoints (search, get, rename), lifespans,
add as new, search and pagination, bad input; tokens, participants, user-info.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from controller.models import Studio
from tests.conftest import ControllerHarness
from tests.controller.test_roles import add_checkpoint, add_user, create, mark_running
from tests.fake_agent import FakeAgent


async def _db_studio(h: ControllerHarness, sid: str, **changes: object) -> None:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        studio = await session.get(Studio, sid)
        assert studio is not None
        for key, value in changes.items():
            setattr(studio, key, value)


async def test_update(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    sid = await create(h, "editable", configuration={"cpu": 1})
    await create(h, "taken")
    _, body = await h.request(
        "PUT",
        f"/studios/{sid}",
        {"name": "edited", "description": "d", "configuration": {"cpu": 2, "memory": 512}},
        expect=200,
    )
    assert body["name"] == "edited" and body["description"] == "d"
    assert body["configuration"] == {"cpu": 2, "memory": 512}
    status, body = await h.request("PUT", f"/studios/{sid}", {"name": "taken"})
    assert status == 409 and "taken" in body["message"]
    # Compute environments: compatible = same workspace, platform and workDir.
    _, env = await h.request(
        "POST",
        "/compute-envs",
        {"computeEnv": {"name": "twin", "config": {"workDir": "file:///tmp/work/"}}},
        expect=200,
    )
    _, other = await h.request(
        "POST",
        "/compute-envs",
        {"computeEnv": {"name": "elsewhere", "config": {"workDir": "/elsewhere"}}},
        expect=200,
    )
    _, body = await h.request("GET", f"/studios/{sid}/compatible-ce", expect=200)
    assert {e["id"] for e in body["computeEnvs"]} == {h.compute_env_id, env["computeEnvId"]}
    status, body = await h.request(
        "PUT", f"/studios/{sid}", {"computeEnvId": other["computeEnvId"]}
    )
    assert status == 400 and "compatible" in body["message"]
    status, _ = await h.request("PUT", f"/studios/{sid}", {"computeEnvId": "0" * 16})
    assert status == 404
    _, body = await h.request(
        "PUT", f"/studios/{sid}", {"computeEnvId": env["computeEnvId"]}, expect=200
    )
    assert body["computeEnv"]["id"] == env["computeEnvId"]
    # Only when not running.
    await mark_running(h, sid)
    status, body = await h.request("PUT", f"/studios/{sid}", {"description": "x"})
    assert status == 409 and "running" in body["message"]


async def test_validate_name(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    await create(h, "exists")
    assert (await h.request("GET", "/studios/validate?name=free"))[0] == 204
    assert (await h.request("GET", "/studios/validate?name=exists"))[0] == 409
    assert (await h.request("GET", "/studios/validate?name="))[0] == 400
    assert (await h.request("GET", "/studios/validate"))[0] == 400
    assert (await h.request("GET", "/studios/validate?name=" + "x" * 81))[0] == 400
    assert (await h.request("GET", "/studios/validate?name=x&workspaceId=9"))[0] == 404


async def test_mounted_data_links(controller_harness: ControllerHarness) -> None:
    from tests.controller.test_datalinks import add_credentials, add_link

    h = controller_harness
    keys = await add_credentials(h)
    dl1, dl2, dl3 = [
        (await add_link(h, f"link {n}", f"s3://bucket-{n}", keys))["id"] for n in (1, 2, 3)
    ]
    a = await create(
        h, "a", configuration={"mountDataV2": [{"dataLinkId": dl1}, {"dataLinkId": dl2}]}
    )
    b = await create(h, "b", configuration={"mountDataV2": [{"dataLinkId": dl3, "path": "x"}]})
    await mark_running(h, b)
    _, body = await h.request("GET", "/studios/data-links", expect=200)
    assert sorted(body["dataLinkIds"]) == sorted([dl1, dl2, dl3])
    _, body = await h.request("GET", "/studios/data-links?status=running", expect=200)
    assert body == {"dataLinkIds": [dl3]}
    _, body = await h.request("GET", f"/studios/data-links?exclude={a}", expect=200)
    assert body == {"dataLinkIds": [dl3]}
    _, body = await h.request("GET", "/studios/data-links?orgId=1", expect=200)
    assert len(body["dataLinkIds"]) == 3
    assert (await h.request("GET", "/studios/data-links?workspaceId=7"))[0] == 404
    # An id that names no data-link is refused, naming it.
    status, body = await h.request(
        "POST",
        "/studios",
        {
            "name": "ghost",
            "computeEnvId": h.compute_env_id,
            "configuration": {"mountDataV2": [{"dataLinkId": "dl-missing"}]},
        },
    )
    assert status == 400 and "dl-missing" in body["message"]


async def test_checkpoints_search_get_rename(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    sid = await create(h, "ck")
    ids = [await add_checkpoint(h, sid, f"ck_{n}") for n in (1, 2, 3)]
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert [c["id"] for c in body["checkpoints"]] == ids[::-1]  # newest first
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints?search=ck_2", expect=200)
    assert [c["name"] for c in body["checkpoints"]] == ["ck_2"]
    _, body = await h.request(
        "GET", f"/studios/{sid}/checkpoints?search=status:finalized&max=1", expect=200
    )
    assert body["totalSize"] == 3 and len(body["checkpoints"]) == 1
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints?search=status:interim")
    assert body["totalSize"] == 0
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints?search=before:{tomorrow}")
    assert body["totalSize"] == 3
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints?search=after:{tomorrow}")
    assert body["totalSize"] == 0
    status, body = await h.request("GET", f"/studios/{sid}/checkpoints?search=before:soon")
    assert status == 400 and "before" in body["message"]

    _, body = await h.request("GET", f"/studios/{sid}/checkpoints/{ids[0]}", expect=200)
    assert body["name"] == "ck_1" and body["status"] == "finalized"
    assert (await h.request("GET", f"/studios/{sid}/checkpoints/999999"))[0] == 404
    assert (await h.request("GET", f"/studios/{sid}/checkpoints/abc"))[0] == 400
    other = await create(h, "other")
    assert (await h.request("GET", f"/studios/{other}/checkpoints/{ids[0]}"))[0] == 404

    _, body = await h.request(
        "PUT", f"/studios/{sid}/checkpoints/{ids[0]}", {"name": " my  best one "}, expect=200
    )
    assert body["name"] == "my__best_one"
    status, body = await h.request(
        "PUT", f"/studios/{sid}/checkpoints/{ids[1]}", {"name": "my best_one"}
    )
    assert status == 200 and body["name"] == "my_best_one"
    status, body = await h.request(
        "PUT", f"/studios/{sid}/checkpoints/{ids[1]}", {"name": "my__best_one"}
    )
    assert status == 409 and "my__best_one" in body["message"]
    status, body = await h.request("PUT", f"/studios/{sid}/checkpoints/{ids[1]}", {"name": "  "})
    assert status == 400
    status, body = await h.request("PUT", f"/studios/{sid}/checkpoints/{ids[1]}", {"name": 5})
    assert status == 400 and body["message"].startswith("name")


async def test_lifespan_enforced_and_extended(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.reconciler is not None
    enforcer = h.controller.reconciler.lifespans
    assert enforcer is not None
    sid = await create(h, "short", configuration={"lifespanHours": 2})
    unlimited = await create(h, "forever")
    status, body = await h.request("POST", f"/studios/{sid}/lifespan")
    assert status == 400 and "running" in body["message"]
    long_ago = datetime.now(UTC) - timedelta(hours=3)
    for studio in (sid, unlimited):
        await mark_running(h, studio)
        await _db_studio(h, studio, last_started=long_ago)
    status, body = await h.request("POST", f"/studios/{unlimited}/lifespan")
    assert status == 400 and "unlimited" in body["message"]
    _, body = await h.request("POST", f"/studios/{sid}/lifespan", expect=200)
    assert body["effectiveLifespanHours"] == 4
    assert await enforcer.enforce_once() == []
    assert await enforcer.enforce_once(datetime.now(UTC) + timedelta(hours=2)) == [sid]
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    assert body["statusInfo"]["status"] == "stopping"
    assert body["statusInfo"]["stopReason"] == "LIFESPAN_EXPIRED"
    assert "lifespan" in body["statusInfo"]["message"]
    _, body = await h.request("GET", f"/studios/{unlimited}", expect=200)
    assert body["statusInfo"]["status"] == "running" and body["effectiveLifespanHours"] == 0


async def test_lifespan_stop_reason_survives_the_agents_stop(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.reconciler is not None
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="agent-1", compute_env_id=h.compute_env_id
    )
    await agent.connect()
    try:
        _, body = await h.request(
            "POST",
            "/studios",
            {
                "name": "timed",
                "computeEnvId": h.compute_env_id,
                "configuration": {"lifespanHours": 1},
            },
            expect=200,
        )
        sid = body["studio"]["sessionId"]
        desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
        await agent.report(sid, desired.generation, pb.SESSION_STATUS_RUNNING, tool_port=1)
        enforcer = h.controller.reconciler.lifespans
        assert enforcer is not None
        mark = len(agent.responses)
        later = datetime.now(UTC) + timedelta(hours=2)
        for _ in range(50):
            if await enforcer.enforce_once(later):
                break
        await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
        await agent.report(sid, desired.generation, pb.SESSION_STATUS_STOPPED, message="done")
        for _ in range(100):
            _, body = await h.request("GET", f"/studios/{sid}", expect=200)
            if body["statusInfo"]["status"] == "stopped":
                break
        assert body["statusInfo"]["status"] == "stopped"
        assert body["statusInfo"]["stopReason"] == "LIFESPAN_EXPIRED"
        # A new start clears it.
        _, start = await h.request("PUT", f"/studios/{sid}/start", expect=200)
        assert "stopReason" not in start["statusInfo"]
    finally:
        await agent.close()


async def test_add_as_new(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    parent = await create(
        h,
        "parent",
        configuration={"condaEnvironment": "numpy", "lifespanHours": 3, "cpu": 1},
    )
    older = await add_checkpoint(h, parent, "parent_1", generation=0)
    newest = await add_checkpoint(h, parent, "parent_2", generation=1)
    await mark_running(h, parent)  # generation 1: parent_2 is being written

    def clone(name: str, checkpoint: int, **extra: object) -> dict[str, Any]:
        return {
            "name": name,
            "computeEnvId": h.compute_env_id,
            "initialCheckpointId": checkpoint,
            **extra,
        }

    status, body = await h.request("POST", "/studios?autoStart=false", clone("c0", newest))
    assert status == 409 and "being written" in body["message"]
    _, body = await h.request(
        "POST", "/studios?autoStart=false", clone("c1", older, configuration={"cpu": 4})
    )
    studio = body["studio"]
    assert studio["parentCheckpoint"] == {
        "checkpointId": older,
        "checkpointName": "parent_1",
        "sessionId": parent,
        "studioName": "parent",
    }
    assert studio["configuration"] == {"cpu": 4, "condaEnvironment": "numpy", "lifespanHours": 3}
    assert studio["template"]["repository"] == "studios/python-http:3.11-0.1"
    # Inherited fields are fixed.
    inherited: list[tuple[dict[str, Any], str]] = [
        ({"configuration": {"condaEnvironment": "scipy"}}, "condaEnvironment"),
        ({"configuration": {"lifespanHours": 9}}, "lifespanHours"),
        ({"dataStudioToolUrl": "studios/python-http:3.10-0.1"}, "dataStudioToolUrl"),
        ({"dataStudioToolUrl": "ghcr.io/acme/other:9.9-0.1"}, "dataStudioToolUrl"),
    ]
    for extra, field in inherited:
        status, body = await h.request("POST", "/studios", clone("bad", older, **extra))
        assert status == 400 and field in body["message"], (extra, body)
    _, env = await h.request(
        "POST", "/compute-envs", {"computeEnv": {"name": "e2", "config": {"workDir": "/x"}}}
    )
    status, body = await h.request(
        "POST", "/studios", {**clone("bad", older), "computeEnvId": env["computeEnvId"]}
    )
    assert status == 400 and "computeEnvId" in body["message"]
    cid = studio["sessionId"]
    status, body = await h.request(
        "PUT", f"/studios/{cid}", {"configuration": {"condaEnvironment": "x"}}
    )
    assert status == 400
    status, body = await h.request("PUT", f"/studios/{cid}", {"computeEnvId": env["computeEnvId"]})
    assert status == 400
    # A newer version of the same tool is a migration.
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        clone("migrated", older, dataStudioToolUrl="studios/python-http:3.12-0.1"),
    )
    assert body["studio"]["template"]["repository"] == "studios/python-http:3.12-0.1"
    # Unknown / invalid checkpoints.
    assert (await h.request("POST", "/studios", clone("x", 987654)))[0] == 404
    # A string id on purpose: the API refuses it.
    assert (await h.request("POST", "/studios", clone("x", "1")))[0] == 400  # type: ignore[arg-type]
    # The clone's first start restores the parent checkpoint, later ones its own.
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="agent-1", compute_env_id=h.compute_env_id
    )
    await agent.connect()
    try:
        await h.request("PUT", f"/studios/{cid}/start", expect=200)
        desired = await agent.wait_desired(cid, pb.DESIRED_STATUS_RUNNING)
        assert desired.restore.checkpoint_id == older
        assert desired.restore.uri.endswith("parent_1")
    finally:
        await agent.close()


async def test_search_and_pagination(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    alice_id, alice = await add_user(h, "alice", "maintain")
    names = ["alpha one", "alpha two", "beta", "Ünïcode studio", "50% off_"]
    for name in names:
        await create(h, name)
    await create(h, "alice's", token=alice)
    running = await create(h, "gamma")
    await mark_running(h, running)

    async def search(text: str, **params: object) -> dict[str, Any]:
        query = {"search": text, **params}
        page: dict[str, Any] = (await h.request("GET", "/studios", params=query, expect=200))[1]
        return page

    assert (await search("alpha"))["totalSize"] == 2
    assert (await search("ALPHA ONE"))["totalSize"] == 1
    assert (await search('"alpha one"'))["totalSize"] == 1
    assert (await search("status:running"))["totalSize"] == 1
    assert (await search("status:running status:stopped"))["totalSize"] == 7
    assert (await search("status:running alpha"))["totalSize"] == 0
    assert (await search("status:nonsense"))["totalSize"] == 0
    assert (await search(f"userId:{alice_id}"))["totalSize"] == 1
    assert (await search("userId:alice"))["totalSize"] == 1
    assert (await search(f"computeEnvId:{h.compute_env_id} beta"))["totalSize"] == 1
    assert (await search("Ünïcode"))["totalSize"] == 1
    assert (await search("50%"))["totalSize"] == 1
    assert (await search("%"))["totalSize"] == 1
    assert (await search("_"))["totalSize"] == 1
    assert (await search("python-http"))["totalSize"] == 7
    for nasty in [
        "'; DROP TABLE studios; --",
        '"unbalanced',
        "a:b:c",
        "status:",
        ":::",
        "\\",
        "' OR 1=1 --",
        "😀",
        "userId:99999999999999999999999",
    ]:
        body = await search(nasty)
        assert body["totalSize"] == 0, nasty
    # Control characters in a query parameter are refused, naming it (issue 13; PostgreSQL
    # cannot even take a NUL in text).
    for control in ("x\x00y", "a\nb", "a\rb"):
        status, body = await h.request("GET", "/studios", params={"search": control})
        assert status == 400 and body["message"].startswith("search: control character"), control
    assert (await search(""))["totalSize"] == 7
    # Sorted newest first; pages are consistent.
    body = await search("", max=3)
    assert len(body["studios"]) == 3 and body["totalSize"] == 7
    seen = []
    for offset in range(0, 7, 3):
        seen += [s["name"] for s in (await search("", max=3, offset=offset))["studios"]]
    assert seen == [s["name"] for s in (await search("", max=100))["studios"]]
    assert seen[0] == "gamma"
    body = await search("", offset=1000)
    assert body["studios"] == [] and body["totalSize"] == 7
    assert (await search("", max=0))["studios"] == []
    for bad in ({"max": -1}, {"max": 1001}, {"offset": "x"}, {"offset": 2**40}):
        status, body = await h.request("GET", "/studios", params=bad)
        assert status == 400, bad


async def test_field_limits_and_types(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    base = {"name": "ok", "computeEnvId": h.compute_env_id}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": ""}, "name"),
        ({"name": "x" * 81}, "name"),
        ({"name": 5}, "name"),
        ({"description": "x" * 2049}, "description"),
        ({"configuration": {"condaEnvironment": "x" * 2049}}, "configuration.condaEnvironment"),
        ({"configuration": {"cpu": -1}}, "configuration.cpu"),
        ({"configuration": {"gpu": -1}}, "configuration.gpu"),
        ({"configuration": {"memory": -1}}, "configuration.memory"),
        ({"configuration": {"lifespanHours": -1}}, "configuration.lifespanHours"),
        ({"configuration": {"cpu": "2"}}, "configuration.cpu"),
        ({"configuration": {"cpu": 1.5}}, "configuration.cpu"),
        ({"configuration": {"environment": {"A": 1}}}, "configuration.environment.A"),
        ({"configuration": {"mountDataV2": [{"path": "x"}]}}, "configuration.mountDataV2.0"),
        ({"configuration": "big"}, "configuration"),
        ({"isPrivate": "yes"}, "isPrivate"),
        ({"allowedUserIds": ["1"]}, "allowedUserIds.0"),
        ({"initialCheckpointId": -1}, "initialCheckpointId"),
        ({"computeEnvId": 7}, "computeEnvId"),
    ]
    for extra, field in cases:
        status, body = await h.request("POST", "/studios", {**base, **extra})
        assert status == 400 and body["message"].startswith(field), (extra, body)
    # At the limits: accepted. Unknown fields: ignored.
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {
            **base,
            "name": "n" * 80,
            "description": "d" * 2048,
            "configuration": {"condaEnvironment": "c" * 2048, "cpu": 0, "gpu": 0, "memory": 0},
            "spot": True,
            "remoteConfig": {"repository": "x"},
            # Labels are tests/controller/test_labels.py's: none here.
            "labelIds": [],
            "whatever": [1],
        },
        expect=200,
    )
    assert "whatever" not in body["studio"] and "labels" not in body["studio"]
    sid = body["studio"]["sessionId"]
    status, body = await h.request("PUT", f"/studios/{sid}", {"description": ["x"]})
    assert status == 400 and body["message"].startswith("description")
    status, body = await h.request("PUT", f"/studios/{sid}/start", {"configuration": {"gpu": -2}})
    assert status == 400 and body["message"].startswith("configuration.gpu")
    status, body = await h.request("POST", "/studios", raw=b"[1, 2]")
    assert status == 400


async def test_tokens(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    _, body = await h.request("GET", "/tokens", expect=200)
    assert len(body["tokens"]) == 1  # the bootstrap admin token
    _, body = await h.request("POST", "/tokens", {"name": "ci"}, expect=200)
    key, token = body["accessKey"], body["token"]
    assert token["name"] == "ci" and "accessKey" not in token
    _, info = await h.request("GET", "/user-info", token=key, expect=200)
    assert info["user"]["userName"] == "admin" and info["defaultWorkspaceId"] == 1
    _, body = await h.request("GET", "/tokens", expect=200)
    listed = {t["name"]: t for t in body["tokens"]}
    assert "ci" in listed and all(key not in str(t) for t in body["tokens"])
    assert (await h.request("POST", "/tokens", {"name": "ci"}))[0] == 409
    assert (await h.request("POST", "/tokens", {"name": ""}))[0] == 400
    assert (await h.request("POST", "/tokens", {"name": "x" * 51}))[0] == 400
    _, other = await add_user(h, "other", "view")
    assert (await h.request("DELETE", f"/tokens/{token['id']}", token=other))[0] == 404
    await h.request("DELETE", f"/tokens/{token['id']}", expect=204)
    assert (await h.request("GET", "/user-info", token=key))[0] == 401
    assert (await h.request("DELETE", "/tokens/abc"))[0] == 400
    # Stored hashed: the value is nowhere in the database.
    assert key.encode() not in (h.data_dir / "studios.db").read_bytes()


async def test_participants(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    _, maintainer = await add_user(h, "maint", "maintain")
    bob_id, bob = await add_user(h, "bob", None)
    base = "/orgs/1/workspaces/1/participants"
    _, body = await h.request("GET", base, expect=200)
    assert {p["userName"]: p["wspRole"] for p in body["participants"]} == {
        "admin": "owner",
        "maint": "maintain",
    }
    _, body = await h.request("PUT", base + "/add", {"memberId": bob_id}, token=maintainer)
    participant = body["participant"]
    # bob was in no organisation: added to a workspace, he is a collaborator of it.
    assert participant["type"] == "COLLABORATOR" and participant["orgRole"] == "collaborator"
    assert participant["wspRole"] == "launch"
    assert participant["memberId"] == bob_id and participant["userName"] == "bob"
    assert (await h.request("PUT", base + "/add", {"userNameOrEmail": "bob@example.org"}))[0] == 409
    assert (await h.request("PUT", base + "/add", {"userNameOrEmail": "nobody"}))[0] == 404
    assert (await h.request("PUT", base + "/add", {}))[0] == 400
    pid = participant["participantId"]
    await h.request("GET", "/studios", token=bob, expect=200)
    # Nobody grants above their own role or touches someone above them.
    status, body = await h.request("PUT", f"{base}/{pid}/role", {"role": "admin"}, token=maintainer)
    assert status == 403
    await h.request("PUT", f"{base}/{pid}/role", {"role": "maintain"}, token=maintainer, expect=204)
    assert (await h.request("PUT", f"{base}/{pid}/role", {"role": "boss"}))[0] == 400
    _, body = await h.request("GET", base + "?search=bob", expect=200)
    assert body["totalSize"] == 1 and body["participants"][0]["wspRole"] == "maintain"
    owner_pid = next(
        p["participantId"]
        for p in (await h.request("GET", base))[1]["participants"]
        if p["userName"] == "admin"
    )
    assert (await h.request("DELETE", f"{base}/{owner_pid}", token=maintainer))[0] == 403
    status, body = await h.request("PUT", f"{base}/{owner_pid}/role", {"role": "admin"})
    assert status == 400 and "owner" in body["message"]
    assert (await h.request("DELETE", base))[0] == 400  # the last owner cannot leave
    await h.request("DELETE", base, token=bob, expect=204)
    assert (await h.request("GET", "/studios", token=bob))[0] == 404
    assert (await h.request("DELETE", f"{base}/{pid}"))[0] == 404
    assert (await h.request("GET", "/orgs/1/workspaces/abc/participants"))[0] == 400
    assert (await h.request("GET", "/orgs/5/workspaces/1/participants"))[0] == 404


async def test_progress_and_reason_stay_readable_after_errored(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="agent-1", compute_env_id=h.compute_env_id
    )
    await agent.connect()
    try:
        _, body = await h.request(
            "POST", "/studios", {"name": "failing", "computeEnvId": h.compute_env_id}, expect=200
        )
        sid = body["studio"]["sessionId"]
        desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
        step = pb.ProgressStep
        await agent.report(
            sid,
            desired.generation,
            pb.SESSION_STATUS_STARTING,
            progress=[
                step(name="preparing the volume", status=pb.STEP_STATUS_SUCCEEDED),
                step(
                    name="restoring the checkpoint",
                    status=pb.STEP_STATUS_IN_PROGRESS,
                    percent=42,
                ),
            ],
        )
        for _ in range(100):
            _, body = await h.request("GET", f"/studios/{sid}", expect=200)
            if len(body["progress"]) == 2:
                break
        assert body["progress"][1] == {
            "message": "restoring the checkpoint (42%)",
            "status": "in-progress",
            "warnings": [],
        }
        await agent.report(
            sid,
            desired.generation,
            pb.SESSION_STATUS_ERRORED,
            message="the tool did not answer on its port",
            progress=[
                step(name="preparing the volume", status=pb.STEP_STATUS_SUCCEEDED),
                step(name="restoring the checkpoint", status=pb.STEP_STATUS_SUCCEEDED),
                step(
                    name="waiting for the tool to answer",
                    status=pb.STEP_STATUS_ERRORED,
                    message="no answer after 60 s",
                    warnings=["port 8888 closed"],
                ),
            ],
        )
        for _ in range(100):
            _, body = await h.request("GET", f"/studios/{sid}", expect=200)
            if body["statusInfo"]["status"] == "errored":
                break
        assert body["statusInfo"]["message"] == "the tool did not answer on its port"
        assert body["progress"][-1] == {
            "message": "waiting for the tool to answer: no answer after 60 s",
            "status": "errored",
            "warnings": ["port 8888 closed"],
        }
    finally:
        await agent.close()
