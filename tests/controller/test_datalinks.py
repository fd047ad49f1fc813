"""Data-links and their credentials (controller side of issue 7).

CRUD in the reference shapes, validation of resource references and mount
paths, workspace roles, secrets (never in a response, encrypted in the
database file), mount names and read-only flags in the desired state a fake
agent receives, the agent's mount report in the studio view, a data-link
deleted while mounted, and the `status`/`exclude` filters of
GET /studios/data-links. Every response is checked against
controller/openapi.yaml by the harness.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from studios.agent.v1 import agent_pb2 as pb

from controller.models import Credentials, Workspace
from controller.mounts import bucket_allowed, mount_names
from controller.secret_box import SecretBox, SecretError
from tests.conftest import ControllerHarness
from tests.controller.test_roles import add_user, create, mark_running
from tests.fake_agent import FakeAgent

ACCESS_KEY = "AKIAEXAMPLEACCESS42"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYSECRET42"


async def add_credentials(
    h: ControllerHarness,
    name: str = "store",
    *,
    token: str = "admin",
    workspace: int | None = None,
    **extra: Any,
) -> str:
    query = f"?workspaceId={workspace}" if workspace else ""
    _, body = await h.request(
        "POST",
        f"/credentials{query}",
        {
            "credentials": {
                "name": name,
                "provider": "aws",
                "keys": {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY},
                **extra,
            }
        },
        token=token,
        expect=200,
    )
    return str(body["credentialsId"])


async def add_link(
    h: ControllerHarness,
    name: str,
    ref: str,
    credentials_id: str | None = None,
    *,
    token: str = "admin",
    workspace: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    query = f"?workspaceId={workspace}" if workspace else ""
    body: dict[str, Any] = {"name": name, "resourceRef": ref, "provider": "aws", **extra}
    if credentials_id:
        body["credentialsId"] = credentials_id
    _, answer = await h.request("POST", f"/data-links{query}", body, token=token, expect=200)
    return dict(answer)


async def compute_env(h: ControllerHarness, name: str, **config: Any) -> str:
    _, body = await h.request(
        "POST",
        "/compute-envs",
        {"computeEnv": {"name": name, "config": {"workDir": "file:///tmp/work", **config}}},
        expect=200,
    )
    return str(body["computeEnvId"])


@pytest.fixture
async def agents(controller_harness: ControllerHarness) -> AsyncIterator[list[FakeAgent]]:
    started: list[FakeAgent] = []
    yield started
    for agent in started:
        await agent.close()


async def _agent(h: ControllerHarness, started: list[FakeAgent], env_id: str) -> FakeAgent:
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id=f"agent-{env_id}", compute_env_id=env_id
    )
    started.append(agent)
    await agent.connect(inventory=[])
    return agent


async def _wait_status(h: ControllerHarness, sid: str, status: str) -> dict[str, Any]:
    for _ in range(200):
        _, body = await h.request("GET", f"/studios/{sid}", expect=200)
        if body["statusInfo"]["status"] == status:
            return dict(body)
        await asyncio.sleep(0.05)
    raise AssertionError(f"studio {sid} is {body['statusInfo']}, not {status}")


# ------------------------------------------------------------ units


def test_mount_names_are_lower_case_safe_and_unique_in_order() -> None:
    names = ["My Data", "my data", "MY-DATA", "my_data", "Ünï cöde!", ".", "..", "a/b"]
    assert mount_names(names) == [
        "my-data",
        "my-data-2",
        "my-data-3",
        "my_data",
        "n--c-de-",
        "data-link",
        "data-link-2",
        "a-b",
    ]
    # Never hidden or option-like; a suffixed name already taken by a real one moves on.
    assert mount_names(["-rf", ".hidden", "_x", "x", "x-2", "x"]) == [
        "rf",
        "hidden",
        "x",
        "x-2",
        "x-2-2",
        "x-3",
    ]
    assert len(mount_names(["y" * 300])[0]) == 120
    agent_rule = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # agent/datalinks.py
    assert all(agent_rule.match(n) for n in mount_names(names + ["...", "-", "z" * 300] * 3))


def test_allowed_buckets_matching() -> None:
    allowed = ["s3://rw-bucket", "plain-bucket", "s3://part-bucket/team", "not a bucket"]
    assert bucket_allowed("s3://rw-bucket/any/dir", allowed)
    assert bucket_allowed("s3://plain-bucket", allowed)
    assert bucket_allowed("s3://part-bucket/team/x", allowed)
    assert bucket_allowed("s3://part-bucket/team", allowed)
    assert not bucket_allowed("s3://part-bucket/teammate", allowed)
    assert not bucket_allowed("s3://part-bucket", allowed)
    assert not bucket_allowed("s3://other-bucket", allowed)


def test_secret_box_binds_the_row() -> None:
    box = SecretBox(bytes(32))
    sealed = box.seal({"secretKey": SECRET_KEY}, "cred-a")
    assert SECRET_KEY not in sealed and sealed.startswith("v1:")
    assert box.open(sealed, "cred-a") == {"secretKey": SECRET_KEY}
    with pytest.raises(SecretError):
        box.open(sealed, "cred-b")  # copied into another row
    with pytest.raises(SecretError):
        SecretBox(bytes([1]) * 32).open(sealed, "cred-a")  # another key


# ------------------------------------------------------------ credentials


async def test_credentials_crud_and_secrets_never_leave(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    bodies: list[Any] = []

    async def call(method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, answer = await h.request(method, path, body, **kw)
        bodies.append(answer)
        return status, answer

    cred = await add_credentials(
        h, "seaweed", baseUrl="http://127.0.0.1:8333/", region="us-east-1", description="lab"
    )
    _, body = await call("GET", "/credentials", expect=200)
    assert [c["id"] for c in body["credentials"]] == [cred]
    entry = body["credentials"][0]
    assert entry["baseUrl"] == "http://127.0.0.1:8333" and entry["region"] == "us-east-1"
    assert entry["provider"] == "aws" and "keys" not in entry
    _, body = await call("GET", f"/credentials/{cred}", expect=200)
    assert body["credentials"]["name"] == "seaweed"
    _, body = await call("GET", "/credentials?platformId=google", expect=200)
    assert body["credentials"] == []
    link = await add_link(h, "lab data", "s3://lab-bucket", cred)
    bodies.append(link)
    _, body = await call("GET", "/data-links", expect=200)
    _, body = await call("GET", f"/data-links/{link['id']}", expect=200)
    # Nothing any of these answered carries a key.
    dumped = json.dumps(bodies)
    assert ACCESS_KEY not in dumped and SECRET_KEY not in dumped

    # Bad input.
    for credentials, fragment in [
        ({"name": "x", "provider": "aws", "keys": {}}, "credentials.keys.accessKey"),
        (
            {"name": "x", "provider": "google", "keys": {"accessKey": "a", "secretKey": "b"}},
            "only 'aws'",
        ),
        ({"name": "x", "provider": "aws"}, "credentials.keys: Field required"),
        (
            {
                "name": "x",
                "provider": "aws",
                "baseUrl": "ftp://host",
                "keys": {"accessKey": "a", "secretKey": "b"},
            },
            "credentials.baseUrl",
        ),
        (
            {
                "name": "x",
                "provider": "aws",
                "baseUrl": "http://user:pw@host",
                "keys": {"accessKey": "a", "secretKey": "b"},
            },
            "user name or password",
        ),
        (
            {
                "name": "x",
                "provider": "aws",
                "region": "Mars 1",
                "keys": {"accessKey": "a", "secretKey": "b"},
            },
            "credentials.region",
        ),
    ]:
        status, body = await h.request("POST", "/credentials", {"credentials": credentials})
        assert status == 400 and fragment in body["message"], (credentials, body)
    status, body = await h.request(
        "POST",
        "/credentials",
        {
            "credentials": {
                "name": "seaweed",
                "provider": "aws",
                "keys": {"accessKey": "a", "secretKey": "b"},
            }
        },
    )
    assert status == 409 and "seaweed" in body["message"]

    # In use: refused, naming the data-link; free: deleted.
    status, body = await h.request("DELETE", f"/credentials/{cred}")
    assert status == 409 and "lab data" in body["message"]
    await h.request("DELETE", f"/data-links/{link['id']}", expect=204)
    await h.request("DELETE", f"/credentials/{cred}", expect=204)
    assert (await h.request("GET", f"/credentials/{cred}"))[0] == 404
    assert (await h.request("DELETE", f"/credentials/{cred}"))[0] == 404


async def test_keys_are_encrypted_in_the_database_file(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    cred = await add_credentials(h, "enc")
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        row = await session.get(Credentials, cred)
        assert row is not None
        assert row.secret.startswith("v1:")
        assert ACCESS_KEY not in row.secret and SECRET_KEY not in row.secret
    # The key file: mode 0600, in the data directory.
    key_file = h.data_dir / "credentials-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    await h.controller.stop()
    h.controller = None
    # Nothing of the keys in the SQLite file (nor its WAL), in any encoding.
    raw = b"".join(p.read_bytes() for p in Path(h.data_dir).glob("studios.db*"))
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret.encode() not in raw
        assert secret.encode("utf-16-le") not in raw
    # A restarted controller still reads them (same key file).
    await h.start()
    _, body = await h.request("GET", f"/credentials/{cred}", expect=200)
    assert body["credentials"]["id"] == cred


# ------------------------------------------------------------ data-links


async def test_data_link_crud_search_and_pages(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    eu = await add_credentials(h, "eu", region="eu-west-1")
    us = await add_credentials(h, "us", region="us-east-1", baseUrl="https://s3.example.org")
    a = await add_link(h, "Alpha reads", "s3://alpha-bucket/sub/dir/", eu, description="first")
    assert a["resourceRef"] == "s3://alpha-bucket/sub/dir"  # trailing slash dropped
    assert a["id"].startswith("v1-user-") and a["type"] == "bucket" and a["status"] == "VALID"
    assert a["credentials"] == [{"id": eu, "name": "eu", "provider": "aws"}]
    assert a["region"] == "eu-west-1" and a["description"] == "first"
    b = await add_link(h, "beta", "s3://beta-bucket", us)
    c = await add_link(h, "gamma_alpha", "s3://gamma.bucket", region="ap-south-1")
    assert c["credentials"] == [] and c["region"] == "ap-south-1"

    async def names(query: str) -> list[str]:
        _, body = await h.request("GET", f"/data-links{query}", expect=200)
        return [d["name"] for d in body["dataLinks"]]

    assert await names("") == ["Alpha reads", "beta", "gamma_alpha"]
    assert await names("?search=ALPHA") == ["Alpha reads", "gamma_alpha"]
    assert await names("?search=_") == ["gamma_alpha"]  # not a LIKE wildcard
    assert await names("?search=region:eu-west-1") == ["Alpha reads"]
    assert await names("?search=region:ap-south-1%20alpha") == ["gamma_alpha"]
    assert await names("?search=provider:aws") == ["Alpha reads", "beta", "gamma_alpha"]
    assert await names("?search=provider:google") == []
    assert await names(f"?credentialsId={us}") == ["beta"]
    assert await names("?max=1&offset=1") == ["beta"]
    _, body = await h.request("GET", "/data-links?max=1", expect=200)
    assert body["totalSize"] == 3
    assert (await h.request("GET", "/data-links?credentialsId=nope"))[0] == 404
    assert (await h.request("GET", "/data-links?max=5000"))[0] == 400

    _, body = await h.request("GET", f"/data-links/{b['id']}", expect=200)
    assert body["dataLink"] == b
    _, body = await h.request(
        "PUT",
        f"/data-links/{b['id']}",
        {"name": "beta two", "description": "d", "credentialsId": eu},
        expect=200,
    )
    assert body["name"] == "beta two" and body["credentials"][0]["id"] == eu
    _, body = await h.request("PUT", f"/data-links/{b['id']}", {"credentialsId": ""}, expect=200)
    assert body["credentials"] == []
    status, body = await h.request("PUT", f"/data-links/{b['id']}", {"name": "gamma_alpha"})
    assert status == 409 and "gamma_alpha" in body["message"]
    status, _ = await h.request("PUT", f"/data-links/{b['id']}", {"credentialsId": "missing"})
    assert status == 404
    status, body = await h.request(
        "POST", "/data-links", {"name": "beta two", "resourceRef": "s3://x-bucket"}
    )
    assert status == 409
    await h.request("DELETE", f"/data-links/{b['id']}", expect=204)
    assert (await h.request("GET", f"/data-links/{b['id']}"))[0] == 404
    assert (await h.request("PUT", f"/data-links/{b['id']}", {"name": "z"}))[0] == 404
    assert (await h.request("DELETE", f"/data-links/{b['id']}"))[0] == 404


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("https://bucket/x", "scheme must be 's3'"),
        ("bucket/x", "expected s3://bucket"),
        ("s3://", "bucket name missing"),
        ("s3://Bucket", "invalid bucket name"),
        ("s3://ab", "invalid bucket name"),
        ("s3://-bucket", "invalid bucket name"),
        ("s3://my..bucket", "two adjacent dots"),
        ("s3://192.168.1.1", "IP address"),
        ("s3://bucket/../other", "'..' is not allowed"),
        ("s3://bucket/a/./b", "'.' is not allowed"),
        ("s3://bucket//x", "empty path segment"),
        ("s3://bucket/a//b", "empty path segment"),
        ("s3://bucket/a\\b", "must not contain '\\\\'"),
        # Control characters are refused by the request model (issue 13), naming the field.
        ("s3://bucket/a\nb", "control character LF"),
        ("s3://bucket/a\x00b", "control character NUL"),
        ("s3://bucket/a\tb", "control character TAB"),
    ],
)
async def test_resource_ref_validation(
    controller_harness: ControllerHarness, ref: str, fragment: str
) -> None:
    status, body = await controller_harness.request(
        "POST", "/data-links", {"name": "bad", "resourceRef": ref}
    )
    assert status == 400, body
    assert body["message"].startswith("resourceRef: ") and fragment in body["message"], body


async def test_data_link_bad_input(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    for body, fragment in [
        ({"resourceRef": "s3://bucket"}, "name: Field required"),
        ({"name": "x"}, "resourceRef: Field required"),
        ({"name": " ", "resourceRef": "s3://bucket"}, "name: must not be blank"),
        ({"name": "x", "resourceRef": "s3://bucket", "provider": "google"}, "provider: only"),
        ({"name": "x", "resourceRef": "s3://bucket", "type": "folder"}, "type: only 'bucket'"),
        ({"name": "x", "resourceRef": "s3://bucket", "credentialsId": 5}, "credentialsId"),
        ({"name": "x" * 101, "resourceRef": "s3://bucket"}, "name"),
    ]:
        status, answer = await h.request("POST", "/data-links", body)
        assert status == 400 and fragment in answer["message"], (body, answer)
    status, answer = await h.request(
        "POST", "/data-links", {"name": "x", "resourceRef": "s3://bucket", "credentialsId": "no"}
    )
    assert status == 404 and "credentials no" in answer["message"]
    assert (await h.request("POST", "/data-links", raw=b"[1]"))[0] == 400


async def test_roles_and_other_workspaces(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        session.add(Workspace(id=2, org_id=1, name="other"))
    _, viewer = await add_user(h, "viewer", "view")
    _, launcher = await add_user(h, "launcher", "launch")
    _, maintainer = await add_user(h, "maintainer", "maintain")
    _, outsider = await add_user(h, "outsider", "owner", workspace_id=2)
    cred = await add_credentials(h, "mine", token=maintainer)
    link = await add_link(h, "ours", "s3://our-bucket", cred, token=maintainer)
    lid = link["id"]
    new_link = {"name": "n", "resourceRef": "s3://new-bucket"}
    new_cred = {
        "credentials": {
            "name": "n",
            "provider": "aws",
            "keys": {"accessKey": "a", "secretKey": "b"},
        }
    }
    for token in (viewer, launcher):
        await h.request("GET", "/data-links", token=token, expect=200)
        await h.request("GET", f"/data-links/{lid}", token=token, expect=200)
        await h.request("GET", "/credentials", token=token, expect=200)
        await h.request("GET", f"/credentials/{cred}", token=token, expect=200)
        for method, path, body in [
            ("POST", "/data-links", new_link),
            ("PUT", f"/data-links/{lid}", {"name": "renamed"}),
            ("DELETE", f"/data-links/{lid}", None),
            ("POST", "/credentials", new_cred),
            ("PUT", f"/credentials/{cred}", {"credentials": {"name": "x"}}),
            ("DELETE", f"/credentials/{cred}", None),
        ]:
            status, answer = await h.request(method, path, body, token=token)
            assert status == 403, (method, path, status)
            assert "data-links" in answer["message"]
    # Another workspace's owner: everything of workspace 1 is 404, never 403.
    for method, path, body in [
        ("GET", "/data-links", None),
        ("GET", "/data-links?workspaceId=1", None),
        ("POST", "/data-links", new_link),
        ("GET", f"/data-links/{lid}", None),
        ("GET", f"/data-links/{lid}?workspaceId=2", None),
        ("PUT", f"/data-links/{lid}", {"name": "stolen"}),
        ("DELETE", f"/data-links/{lid}", None),
        ("GET", "/credentials", None),
        ("POST", "/credentials", new_cred),
        ("GET", f"/credentials/{cred}", None),
        ("PUT", f"/credentials/{cred}", {"credentials": {"name": "x"}}),
        ("DELETE", f"/credentials/{cred}", None),
    ]:
        status, _ = await h.request(method, path, body, token=outsider)
        assert status == 404, (method, path, status)
    # In their own workspace they work, and cannot use workspace 1's credentials.
    status, answer = await h.request(
        "POST",
        "/data-links?workspaceId=2",
        {**new_link, "credentialsId": cred},
        token=outsider,
    )
    assert status == 404 and cred in answer["message"]
    theirs = await add_link(h, "theirs", "s3://their-bucket", token=outsider, workspace=2)
    _, body = await h.request("GET", "/data-links?workspaceId=2", token=outsider, expect=200)
    assert [d["id"] for d in body["dataLinks"]] == [theirs["id"]]
    # A studio of workspace 1 cannot mount it: 400 naming it.
    status, answer = await h.request(
        "POST",
        "/studios?autoStart=false",
        {
            "name": "s",
            "computeEnvId": h.compute_env_id,
            "configuration": {"mountDataV2": [{"dataLinkId": theirs["id"]}]},
        },
    )
    assert status == 400 and theirs["id"] in answer["message"]
    # The maintainer manages what they made.
    await h.request("PUT", f"/data-links/{lid}", {"name": "renamed"}, token=maintainer, expect=200)
    await h.request("DELETE", f"/data-links/{lid}", token=maintainer, expect=204)
    await h.request("DELETE", f"/credentials/{cred}", token=maintainer, expect=204)


@pytest.mark.parametrize("role", ["owner", "admin", "maintain", "launch", "connect", "view"])
async def test_every_role(controller_harness: ControllerHarness, role: str) -> None:
    """studio-roles.md: maintain and above add, edit, remove; every participant lists."""
    h = controller_harness
    _, token = await add_user(h, f"user-{role}", role)
    manages = role in ("owner", "admin", "maintain")
    link = await add_link(h, "existing", "s3://existing-bucket")
    cred = await add_credentials(h, "existing")
    await h.request("GET", "/data-links", token=token, expect=200)
    await h.request("GET", f"/data-links/{link['id']}", token=token, expect=200)
    await h.request("GET", "/credentials", token=token, expect=200)
    await h.request("GET", "/studios/data-links", token=token, expect=200)
    expected = {True: (200, 200, 204, 200, 204, 204), False: (403,) * 6}[manages]
    answers = [
        (
            await h.request(
                "POST", "/data-links", {"name": "n", "resourceRef": "s3://n-bucket"}, token=token
            )
        )[0],
        (await h.request("PUT", f"/data-links/{link['id']}", {"description": "d"}, token=token))[0],
        (await h.request("DELETE", f"/data-links/{link['id']}", token=token))[0],
        (
            await h.request(
                "POST",
                "/credentials",
                {
                    "credentials": {
                        "name": "n",
                        "provider": "aws",
                        "keys": {"accessKey": "a", "secretKey": "b"},
                    }
                },
                token=token,
            )
        )[0],
        (
            await h.request(
                "PUT", f"/credentials/{cred}", {"credentials": {"description": "d"}}, token=token
            )
        )[0],
        (await h.request("DELETE", f"/credentials/{cred}", token=token))[0],
    ]
    assert tuple(answers) == expected


async def test_credentials_update_rotates_keys_for_the_next_start(
    controller_harness: ControllerHarness, agents: list[FakeAgent]
) -> None:
    h = controller_harness
    env = await compute_env(h, "rotate")
    cred = await add_credentials(h, "rotating", baseUrl="http://old:8333", region="us-east-1")
    other = await add_credentials(h, "other")
    link = await add_link(h, "rotated", "s3://rot-bucket", cred)
    agent = await _agent(h, agents, env)
    _, body = await h.request(
        "POST",
        "/studios",
        {
            "name": "rot",
            "computeEnvId": env,
            "configuration": {"mountDataV2": [{"dataLinkId": link["id"]}]},
        },
        expect=200,
    )
    sid = body["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    assert desired.spec.data_links[0].secret_access_key == SECRET_KEY
    await agent.report(sid, desired.generation, pb.SESSION_STATUS_RUNNING)
    await _wait_status(h, sid, "running")
    await h.request(
        "PUT",
        f"/credentials/{cred}",
        {
            "credentials": {
                "name": "rotated keys",
                "baseUrl": "https://new.example.org",
                "region": "",
                "keys": {"accessKey": "NEWACCESS", "secretKey": "NEWSECRET"},
            }
        },
        expect=204,
    )
    _, body = await h.request("GET", f"/credentials/{cred}", expect=200)
    got = body["credentials"]
    assert got["name"] == "rotated keys" and got["baseUrl"] == "https://new.example.org"
    assert "region" not in got and "NEWSECRET" not in json.dumps(body)
    status, body = await h.request(
        "PUT", f"/credentials/{cred}", {"credentials": {"name": "other"}}
    )
    assert status == 409 and "other" in body["message"]
    status, body = await h.request(
        "PUT", f"/credentials/{cred}", {"credentials": {"baseUrl": "s3://x"}}
    )
    assert status == 400 and "credentials.baseUrl" in body["message"]
    assert (await h.request("PUT", f"/credentials/{other}x", {"credentials": {}}))[0] == 404
    # The next run gets the new keys and endpoint.
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    await agent.report(sid, desired.generation, pb.SESSION_STATUS_STOPPED)
    await _wait_status(h, sid, "stopped")
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    mount = desired.spec.data_links[0]
    assert (mount.access_key_id, mount.secret_access_key) == ("NEWACCESS", "NEWSECRET")
    assert mount.endpoint == "https://new.example.org" and mount.region == ""


# ------------------------------------------------------------ studios and mounts


async def test_mount_data_validation_on_create_update_start(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    link = await add_link(h, "ok", "s3://ok-bucket")
    good = {"mountDataV2": [{"dataLinkId": link["id"]}]}
    sid = await create(h, "mounting", configuration=good)
    for config, fragment in [
        ({"mountDataV2": [{"dataLinkId": "v1-user-nope"}]}, "mountDataV2.0.dataLinkId"),
        (
            {"mountDataV2": [{"dataLinkId": link["id"]}, {"dataLinkId": "gone"}]},
            "configuration.mountDataV2.1.dataLinkId: data-link 'gone' not found",
        ),
        ({"mountData": ["gone"]}, "configuration.mountData.0: data-link 'gone'"),
        ({"mountDataV2": [{"dataLinkId": link["id"], "path": "../x"}]}, "'..' is not allowed"),
        ({"mountDataV2": [{"dataLinkId": link["id"], "path": "/abs"}]}, "must be relative"),
    ]:
        status, body = await h.request(
            "POST",
            "/studios?autoStart=false",
            {"name": "bad", "computeEnvId": h.compute_env_id, "configuration": config},
        )
        assert status == 400 and fragment in body["message"], (config, body)
        status, body = await h.request("PUT", f"/studios/{sid}", {"configuration": config})
        assert status == 400 and fragment in body["message"], (config, body)
        status, body = await h.request("PUT", f"/studios/{sid}/start", {"configuration": config})
        assert status == 400 and fragment in body["message"], (config, body)
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    assert body["configuration"] == good
    assert [m["id"] for m in body["mountedDataLinks"]] == [link["id"]]
    entry = body["mountedDataLinks"][0]
    assert entry["mountName"] == "ok" and entry["mountPath"] == "/workspace/data/ok"
    # No report yet: no state (absent, never null).
    assert entry["readOnly"] is True and "mountState" not in entry


async def test_file_system_mounts_validation(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    for mounts, fragment in [
        ([{"hostPath": "mnt/efs", "mountPath": "/efs"}], "hostPath: must be an absolute path"),
        ([{"hostPath": "/mnt/efs", "mountPath": "efs"}], "mountPath: must be an absolute path"),
        ([{"hostPath": "/mnt/../etc", "mountPath": "/efs"}], "hostPath: must not contain '..'"),
        ([{"hostPath": "/mnt/efs", "mountPath": "/efs/../x"}], "mountPath: must not contain"),
        ([{"hostPath": "/mnt/efs", "mountPath": "/workspace"}], "work directory /workspace"),
        ([{"hostPath": "/mnt/efs", "mountPath": "/workspace/"}], "work directory /workspace"),
        ([{"hostPath": "/mnt/efs", "mountPath": "/"}], "checkpoints could not be saved"),
        ([{"hostPath": "/mnt/efs", "mountPath": "/workspace/data"}], "inside /workspace/data"),
        ([{"hostPath": "/mnt/efs", "mountPath": "/workspace/data/x"}], "inside /workspace/data"),
        ([{"hostPath": "/mnt/efs", "mountPath": "/proc/x"}], "system directory"),
        ([{"hostPath": "/mnt/efs", "mountPath": "/efs\nx"}], "control character LF"),
        (
            [
                {"hostPath": "/mnt/a", "mountPath": "/efs"},
                {"hostPath": "/mnt/b", "mountPath": "/efs/"},
            ],
            "fileSystemMounts.1.mountPath: /efs is mounted twice",
        ),
        ([{"hostPath": "/mnt/efs"}], "mountPath: Field required"),
        (["/mnt/efs:/efs"], "fileSystemMounts.0"),
    ]:
        status, body = await h.request(
            "POST",
            "/compute-envs",
            {"computeEnv": {"name": "x", "config": {"workDir": "/w", "fileSystemMounts": mounts}}},
        )
        assert status == 400 and fragment in body["message"], (mounts, body)
    status, body = await h.request(
        "POST",
        "/compute-envs",
        {"computeEnv": {"name": "x", "config": {"workDir": "/w", "allowedBuckets": ["s3://A"]}}},
    )
    assert status == 400 and "config.allowedBuckets.0" in body["message"]
    await compute_env(
        h,
        "efs",
        fileSystemMounts=[
            {"hostPath": "/mnt/efs/", "mountPath": "/efs", "readOnly": True},
            {"hostPath": "/mnt/scratch", "mountPath": "/workspace/scratch"},
        ],
    )
    _, body = await h.request("GET", "/compute-envs", expect=200)
    env = next(e for e in body["computeEnvs"] if e["name"] == "efs")
    assert env["config"]["fileSystemMounts"] == [
        {"hostPath": "/mnt/efs", "mountPath": "/efs", "readOnly": True},
        {"hostPath": "/mnt/scratch", "mountPath": "/workspace/scratch", "readOnly": False},
    ]


async def test_desired_state_carries_mounts(
    controller_harness: ControllerHarness, agents: list[FakeAgent]
) -> None:
    h = controller_harness
    env = await compute_env(
        h,
        "buckets",
        allowedBuckets=["s3://rw-bucket", "part-bucket/team"],
        fileSystemMounts=[{"hostPath": "/mnt/efs", "mountPath": "/efs", "readOnly": True}],
    )
    cred = await add_credentials(h, "seaweed", baseUrl="http://127.0.0.1:8333", region="us-east-1")
    rw = await add_link(h, "Shared Data", "s3://rw-bucket/team", cred)
    ro = await add_link(h, "shared data!", "s3://ro-bucket", cred, region="eu-west-1")
    part = await add_link(h, "Team", "s3://part-bucket", cred)
    public = await add_link(h, "Public", "s3://public-bucket", publicAccessible=True)
    agent = await _agent(h, agents, env)
    _, body = await h.request(
        "POST",
        "/studios",
        {
            "name": "mounts",
            "computeEnvId": env,
            "configuration": {
                "mountDataV2": [
                    {"dataLinkId": rw["id"]},
                    {"dataLinkId": ro["id"]},
                    {"dataLinkId": part["id"], "path": "team/sub"},
                    {"dataLinkId": public["id"]},
                    {"dataLinkId": rw["id"]},  # twice: mounted once
                ]
            },
        },
        expect=200,
    )
    sid = body["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    mounts = list(desired.spec.data_links)
    assert [(m.data_link_id, m.mount_name, m.read_only) for m in mounts] == [
        (rw["id"], "shared-data", False),
        (ro["id"], "shared-data-", True),
        (part["id"], "team", False),
        (public["id"], "public", True),
    ]
    assert [m.resource_ref for m in mounts] == [
        "s3://rw-bucket/team",
        "s3://ro-bucket",
        "s3://part-bucket/team/sub",
        "s3://public-bucket",
    ]
    first = mounts[0]
    assert first.endpoint == "http://127.0.0.1:8333" and first.region == "us-east-1"
    assert first.access_key_id == ACCESS_KEY and first.secret_access_key == SECRET_KEY
    assert mounts[1].region == "eu-west-1"
    assert not mounts[3].access_key_id and not mounts[3].endpoint
    assert not any(m.required for m in mounts)
    assert [(f.host_path, f.mount_path, f.read_only) for f in desired.spec.file_system_mounts] == [
        ("/mnt/efs", "/efs", True)
    ]
    # The studio view: where each mounts, before the agent says anything.
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    assert [(m["mountName"], m["readOnly"]) for m in body["mountedDataLinks"]] == [
        ("shared-data", False),
        ("shared-data-", True),
        ("team", False),
        ("public", True),
    ]
    assert SECRET_KEY not in json.dumps(body) and ACCESS_KEY not in json.dumps(body)


async def test_collisions_get_numbered_suffixes(
    controller_harness: ControllerHarness, agents: list[FakeAgent]
) -> None:
    h = controller_harness
    env = await compute_env(h, "collide")
    links = [
        await add_link(h, name, f"s3://bucket-{n}")
        for n, name in enumerate(["Data", "DATA!", "data?"])
    ]
    # "DATA!" -> "data-", "data?" -> "data-" again.
    agent = await _agent(h, agents, env)
    _, body = await h.request(
        "POST",
        "/studios",
        {
            "name": "collide",
            "computeEnvId": env,
            "configuration": {"mountDataV2": [{"dataLinkId": link["id"]} for link in links]},
        },
        expect=200,
    )
    desired = await agent.wait_desired(body["studio"]["sessionId"], pb.DESIRED_STATUS_RUNNING)
    assert [m.mount_name for m in desired.spec.data_links] == ["data", "data-", "data--2"]


async def test_mount_report_and_a_data_link_deleted_while_mounted(
    controller_harness: ControllerHarness, agents: list[FakeAgent]
) -> None:
    h = controller_harness
    env = await compute_env(h, "report", allowedBuckets=["keep-bucket"])
    cred = await add_credentials(h, "c")
    keep = await add_link(h, "keep", "s3://keep-bucket", cred)
    doomed = await add_link(h, "doomed", "s3://doomed-bucket", cred)
    broken = await add_link(h, "broken", "s3://broken-bucket", cred)
    agent = await _agent(h, agents, env)
    _, body = await h.request(
        "POST",
        "/studios",
        {
            "name": "reporting",
            "computeEnvId": env,
            "configuration": {
                "mountDataV2": [{"dataLinkId": x["id"]} for x in (keep, doomed, broken)]
            },
        },
        expect=200,
    )
    sid = body["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    gen = desired.generation
    assert [m.mount_name for m in desired.spec.data_links] == ["keep", "doomed", "broken"]
    failure = "s3://broken-bucket: InvalidAccessKeyId (endpoint http://127.0.0.1:9)"
    await agent.send(
        pb.ConnectRequest(
            session=pb.SessionObserved(
                session_id=sid,
                generation=gen,
                status=pb.SESSION_STATUS_RUNNING,
                message="running",
                tool_port=41000,
                data_links=[
                    pb.DataLinkMountStatus(
                        data_link_id=keep["id"],
                        mount_name="keep",
                        mount_state=pb.DATA_LINK_MOUNT_STATE_MOUNTED,
                    ),
                    pb.DataLinkMountStatus(
                        data_link_id=doomed["id"],
                        mount_name="doomed",
                        mount_state=pb.DATA_LINK_MOUNT_STATE_READ_ONLY,
                    ),
                    pb.DataLinkMountStatus(
                        data_link_id=broken["id"],
                        mount_name="broken",
                        mount_state=pb.DATA_LINK_MOUNT_STATE_FAILED,
                        message=failure,
                    ),
                ],
            )
        )
    )
    body = await _wait_status(h, sid, "running")
    views = {m["name"]: m for m in body["mountedDataLinks"]}
    assert views["keep"]["mountState"] == "mounted" and views["keep"]["status"] == "VALID"
    assert views["keep"]["readOnly"] is False
    assert views["doomed"]["mountState"] == "read-only" and views["doomed"]["readOnly"] is True
    assert views["broken"]["status"] == "INVALID" and views["broken"]["message"] == failure
    assert failure in body["statusInfo"]["message"]

    # Deleted while mounted: allowed; the running session keeps it, the view says so.
    await h.request("DELETE", f"/data-links/{doomed['id']}", expect=204)
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    gone = next(m for m in body["mountedDataLinks"] if m["id"] == doomed["id"])
    assert gone["status"] == "INVALID" and gone["mountName"] == "doomed"
    assert gone["message"] == (
        f"data-link {doomed['id']} no longer exists; the running session keeps its mount "
        "until it stops"
    )
    _, body = await h.request("GET", "/studios/data-links", expect=200)
    assert doomed["id"] in body["dataLinkIds"]  # still named by the studio's configuration

    # Stop, then start again: the deleted data-link is skipped and the status says why.
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    await agent.report(sid, gen, pb.SESSION_STATUS_STOPPED)
    body = await _wait_status(h, sid, "stopped")
    gone = next(m for m in body["mountedDataLinks"] if m["id"] == doomed["id"])
    assert "mountState" not in gone and "mountName" not in gone and "mountPath" not in gone
    assert gone["message"] == f"data-link {doomed['id']} no longer exists"
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert desired.generation == gen + 1
    assert [m.mount_name for m in desired.spec.data_links] == ["keep", "broken"]
    await agent.report(sid, gen + 1, pb.SESSION_STATUS_RUNNING, message="running")
    body = await _wait_status(h, sid, "running")
    assert f"data-link {doomed['id']} no longer exists" in body["statusInfo"]["message"]
    # The previous run's mount report is not shown for this run.
    assert all("mountState" not in m for m in body["mountedDataLinks"])


async def test_studios_data_links_status_and_exclude_filters(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    one = await add_link(h, "one", "s3://one-bucket")
    two = await add_link(h, "two", "s3://two-bucket")
    three = await add_link(h, "three", "s3://three-bucket")
    a = await create(
        h,
        "a",
        configuration={"mountDataV2": [{"dataLinkId": one["id"]}, {"dataLinkId": two["id"]}]},
    )
    b = await create(h, "b", configuration={"mountDataV2": [{"dataLinkId": three["id"]}]})
    await mark_running(h, b)

    async def ids(query: str = "") -> list[str]:
        _, body = await h.request("GET", f"/studios/data-links{query}", expect=200)
        return list(body["dataLinkIds"])

    assert await ids() == sorted([one["id"], two["id"], three["id"]])
    assert await ids("?status=running") == [three["id"]]
    assert await ids("?status=RUNNING") == [three["id"]]
    assert await ids("?status=stopped") == sorted([one["id"], two["id"]])
    assert await ids("?status=errored") == []
    assert await ids(f"?exclude={a}") == [three["id"]]
    assert await ids(f"?exclude={b}&status=stopped") == sorted([one["id"], two["id"]])
    assert await ids(f"?exclude={a}&status=stopped") == []
    assert await ids("?orgId=1") == sorted([one["id"], two["id"], three["id"]])
    status, body = await h.request("GET", "/studios/data-links?status=bogus")
    assert status == 400 and "status: unknown studio status 'bogus'" in body["message"]
    # Deleted studios mount nothing.
    await h.request("DELETE", f"/studios/{a}", expect=204)
    assert await ids() == [three["id"]]
    # A viewer may list; another workspace is 404.
    _, viewer = await add_user(h, "viewer", "view")
    await h.request("GET", "/studios/data-links", token=viewer, expect=200)
    assert (await h.request("GET", "/studios/data-links?workspaceId=9"))[0] == 404
