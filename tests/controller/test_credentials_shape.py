"""Credentials in the reference's shapes (issue 14), their keys still sealed.

`/credentials` CRUD with the reference's bodies (`Credentials`, `AwsSecurityKeys`),
`GET /credentials/validate?name=`, `GET /credentials/{id}/keys` (nothing secret), duplicate
names 409 naming the field, invalid names 400, the reference's 409 body of a delete while
data-links and studios use the credentials, no `null` and no key in any answer, the keys
sealed in the database row, the six workspace roles and another workspace's 404. The
harness checks every answer against the reference and controller/openapi.yaml.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from controller.models import Credentials, Workspace
from controller.secret_box import SecretBox, load_or_create_credentials_key
from tests.conftest import ControllerHarness
from tests.controller.test_roles import add_user

ACCESS_KEY = "AKIASHAPEACCESS0001"
SECRET_KEY = "shape/SECRET+key/0123456789abcdefXYZ"
ROLES = ["owner", "admin", "maintain", "launch", "connect", "view"]


def _body(name: str, **extra: Any) -> dict[str, Any]:
    """A create request as a client generated from the reference sends it."""
    return {
        "credentials": {
            "name": name,
            "provider": "aws",
            "keys": {
                "discriminator": "aws",
                "mode": "keys",
                "accessKey": ACCESS_KEY,
                "secretKey": SECRET_KEY,
            },
            **extra,
        }
    }


async def _create(
    h: ControllerHarness, name: str, *, token: str = "admin", workspace: int | None = None
) -> str:
    query = f"?workspaceId={workspace}" if workspace else ""
    _, body = await h.request("POST", f"/credentials{query}", _body(name), token=token, expect=200)
    assert set(body) == {"credentialsId"}
    return str(body["credentialsId"])


def _no_nulls(value: Any, where: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert item is not None, f"{where}.{key} is null"
            _no_nulls(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _no_nulls(item, f"{where}[{i}]")


def _no_keys(answer: Any) -> None:
    dumped = json.dumps(answer)
    assert ACCESS_KEY not in dumped and SECRET_KEY not in dumped


async def _stored_keys(h: ControllerHarness, cred_id: str) -> tuple[str, dict[str, Any]]:
    """The row's stored secret and what it opens to with the controller's key file."""
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        row = await session.get(Credentials, cred_id)
        assert row is not None
        stored = row.secret
    box = SecretBox(load_or_create_credentials_key(h.data_dir))
    return stored, box.open(stored, cred_id)


async def _other_workspace(h: ControllerHarness) -> None:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        session.add(Workspace(id=2, org_id=1, name="other"))


async def test_crud_in_the_reference_shape(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    answers: list[Any] = []
    cred = await _create(h, "lab store")
    _, body = await h.request("GET", f"/credentials/{cred}", expect=200)
    answers.append(body)
    got = body["credentials"]
    assert set(body) == {"credentials"}
    assert got["id"] == cred and got["name"] == "lab store" and got["provider"] == "aws"
    assert got["category"] == "cloud" and got["status"] == "AVAILABLE"
    assert got["deleted"] is False and got["dateCreated"].endswith("Z")
    # Absent values are absent fields, and the keys are write-only.
    for absent in ("keys", "description", "baseUrl", "region", "lastUsed", "message"):
        assert absent not in got, absent

    other = await _create(h, "another")
    _, body = await h.request("GET", "/credentials?workspaceId=1", expect=200)
    answers.append(body)
    assert [c["id"] for c in body["credentials"]] == [other, cred]  # by name
    _, body = await h.request("GET", "/credentials?platformId=aws", expect=200)
    assert len(body["credentials"]) == 2
    _, body = await h.request("GET", "/credentials?platformId=google", expect=200)
    assert body == {"credentials": []}

    # The reference's update: the described object sent back, changed. Keys with neither
    # key keep the stored ones; the read-only fields are ignored.
    before, _ = await _stored_keys(h, cred)
    sent = {
        **got,
        "name": "renamed",
        "description": "bucket keys",
        "baseUrl": "https://s3.example.org",
        "keys": {"discriminator": "aws"},
    }
    await h.request("PUT", f"/credentials/{cred}", {"credentials": sent}, expect=204)
    after, opened = await _stored_keys(h, cred)
    assert after == before and opened == {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}
    _, body = await h.request("GET", f"/credentials/{cred}", expect=200)
    answers.append(body)
    got = body["credentials"]
    assert got["name"] == "renamed" and got["description"] == "bucket keys"
    assert got["baseUrl"] == "https://s3.example.org"

    # Rotation: both keys, sealed anew.
    await h.request(
        "PUT",
        f"/credentials/{cred}",
        {"credentials": {"keys": {"accessKey": "NEWACCESS", "secretKey": "NEWSECRET"}}},
        expect=204,
    )
    rotated, opened = await _stored_keys(h, cred)
    assert rotated != before and opened == {"accessKey": "NEWACCESS", "secretKey": "NEWSECRET"}
    assert "NEWSECRET" not in rotated

    refused: list[tuple[dict[str, Any], str]] = [
        ({"provider": "google"}, "credentials.provider: cannot change"),
        ({"keys": {"accessKey": "only-one"}}, "credentials.keys.secretKey"),
        ({"keys": {"secretKey": "only-one"}}, "credentials.keys.accessKey"),
        ({"keys": {"discriminator": "google"}}, "credentials.keys.discriminator"),
        ({"keys": {"mode": "role", "assumeRoleArn": "arn:aws:iam::1:role/x"}}, "keys.mode"),
        ({"baseUrl": "https://" + "a" * 200}, "credentials.baseUrl"),
    ]
    for sent, fragment in refused:
        status, body = await h.request("PUT", f"/credentials/{cred}", {"credentials": sent})
        assert status == 400 and fragment in body["message"], (sent, body)

    await h.request("DELETE", f"/credentials/{cred}", expect=204)
    assert (await h.request("GET", f"/credentials/{cred}"))[0] == 404
    assert (await h.request("PUT", f"/credentials/{cred}", {"credentials": {}}))[0] == 404
    assert (await h.request("DELETE", f"/credentials/{cred}"))[0] == 404
    _, body = await h.request("GET", "/credentials", expect=200)
    assert [c["id"] for c in body["credentials"]] == [other]
    for answer in answers:
        _no_nulls(answer)
        _no_keys(answer)


async def test_create_refusals(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    keys = {"accessKey": "a", "secretKey": "b"}
    for credentials, fragment in [
        ({"provider": "aws", "keys": keys}, "credentials.name: Field required"),
        ({"name": "x", "provider": "azure", "keys": keys}, "credentials.provider: only 'aws'"),
        ({"name": "x", "provider": "aws"}, "credentials.keys: Field required"),
        ({"name": "x", "provider": "aws", "keys": {"secretKey": "b"}}, "keys.accessKey"),
        ({"name": "x", "provider": "aws", "keys": {"accessKey": "a"}}, "keys.secretKey"),
        (
            {"name": "x", "provider": "aws", "keys": {**keys, "discriminator": "s3"}},
            "credentials.keys.discriminator",
        ),
        (
            {"name": "x", "provider": "aws", "keys": {"mode": "role", "assumeRoleArn": "arn"}},
            "credentials.keys.mode",
        ),
    ]:
        status, body = await h.request("POST", "/credentials", {"credentials": credentials})
        assert status == 400 and fragment in body["message"], (credentials, body)
    _, body = await h.request("GET", "/credentials", expect=200)
    assert body == {"credentials": []}


@pytest.mark.parametrize("name", ["", "   ", "a" * 101, "tab\there", "line\nbreak", "nul\x00"])
async def test_invalid_names_are_400(controller_harness: ControllerHarness, name: str) -> None:
    h = controller_harness
    status, body = await h.request("POST", "/credentials", _body(name))
    assert status == 400 and body["message"].startswith("credentials.name:"), body
    cred = await _create(h, "valid")
    status, body = await h.request("PUT", f"/credentials/{cred}", {"credentials": {"name": name}})
    assert status == 400 and body["message"].startswith("credentials.name:"), body
    if "\x00" not in name:  # a NUL in a query is refused before any handler, also 400
        status, body = await h.request("GET", "/credentials/validate", params={"name": name})
        assert status == 400, body


async def test_names_up_to_100_characters_with_spaces_are_valid(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    for name in ("a" * 100, "lab store (eu) #2", "x"):
        await h.request("GET", "/credentials/validate", params={"name": name}, expect=204)
        await _create(h, name)


async def test_duplicate_names_are_409_naming_the_field(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    await _create(h, "taken")
    other = await _create(h, "other")
    status, body = await h.request("POST", "/credentials", _body("taken"))
    assert status == 409 and body["message"].startswith("credentials.name:")
    assert "'taken'" in body["message"]
    status, body = await h.request(
        "PUT", f"/credentials/{other}", {"credentials": {"name": "taken"}}
    )
    assert status == 409 and body["message"].startswith("credentials.name:")
    # Keeping one's own name is no conflict.
    await h.request("PUT", f"/credentials/{other}", {"credentials": {"name": "other"}}, expect=204)


async def test_validate_name(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    await _other_workspace(h)
    _, outsider = await add_user(h, "outsider", "owner", workspace_id=2)
    await _create(h, "taken")
    await h.request("GET", "/credentials/validate?name=free", expect=204)
    await h.request("GET", "/credentials/validate?workspaceId=1&name=free", expect=204)
    status, body = await h.request("GET", "/credentials/validate?name=taken")
    assert status == 409 and body["message"].startswith("name:") and "taken" in body["message"]
    status, body = await h.request("GET", "/credentials/validate")
    assert status == 400 and body["message"].startswith("name:")
    # Names are per workspace; workspace 1 is none of the outsider's business.
    await h.request(
        "GET", "/credentials/validate?workspaceId=2&name=taken", token=outsider, expect=204
    )
    status, _ = await h.request(
        "GET", "/credentials/validate?workspaceId=1&name=taken", token=outsider
    )
    assert status == 404


async def test_keys_endpoint_answers_nothing_secret(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    cred = await _create(h, "keyed")
    _, body = await h.request("GET", f"/credentials/{cred}/keys", expect=200)
    assert set(body) == {"keys"}
    assert json.loads(body["keys"]) == {"discriminator": "aws", "mode": "keys"}
    _no_keys(body)
    _, body = await h.request(
        "GET", f"/credentials/{cred}/keys?workspaceId=1&pairingId=anything", expect=200
    )
    _no_keys(body)
    assert (await h.request("GET", f"/credentials/{cred}x/keys"))[0] == 404


async def test_keys_are_sealed_in_the_row(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    cred = await _create(h, "sealed")
    stored, opened = await _stored_keys(h, cred)
    assert stored.startswith("v1:")
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in stored
    assert opened == {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}
    # Bound to its id: the same ciphertext does not open as other credentials.
    box = SecretBox(load_or_create_credentials_key(h.data_dir))
    with pytest.raises(Exception, match="cannot decrypt"):
        box.open(stored, cred + "x")


async def test_delete_refused_while_used_naming_data_links_and_studios(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    cred = await _create(h, "in use")
    _, link = await h.request(
        "POST",
        "/data-links",
        {"name": "lab data", "resourceRef": "s3://lab-bucket", "credentialsId": cred},
        expect=200,
    )
    # The studio's own answer is the studios tests' business: posted past the checks.
    assert h.http is not None
    async with h.http.post(
        f"{h.url}/studios?autoStart=false",
        json={
            "name": "analysis",
            "computeEnvId": h.compute_env_id,
            "configuration": {"mountDataV2": [{"dataLinkId": link["id"]}]},
        },
        headers={"Authorization": f"Bearer {h.admin_token}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        session_id = (await resp.json())["studio"]["sessionId"]

    status, body = await h.request("DELETE", f"/credentials/{cred}")
    assert status == 409
    assert body["credentialsId"] == cred
    assert body["conflicts"] == [
        {"id": link["id"], "name": "lab data", "type": "dataLink"},
        {"id": session_id, "name": "analysis", "type": "studio"},
    ]
    assert "lab data" in body["message"] and "analysis" in body["message"]
    # Still there; free once the data-link is gone (a studio alone does not hold them).
    await h.request("GET", f"/credentials/{cred}", expect=200)
    await h.request("DELETE", f"/data-links/{link['id']}", expect=204)
    await h.request("DELETE", f"/credentials/{cred}", expect=204)


@pytest.mark.parametrize("role", ROLES)
async def test_roles(controller_harness: ControllerHarness, role: str) -> None:
    """Any participant lists, describes and validates names; maintain and above add, edit,
    delete and read /keys (the data-links row of studio-roles.md)."""
    h = controller_harness
    _, token = await add_user(h, f"user-{role}", role)
    manages = role in ("owner", "admin", "maintain")
    cred = await _create(h, "existing")
    await h.request("GET", "/credentials", token=token, expect=200)
    await h.request("GET", f"/credentials/{cred}", token=token, expect=200)
    await h.request("GET", "/credentials/validate?name=new", token=token, expect=204)
    writes = [
        ("POST", "/credentials", _body("new"), 200),
        ("GET", f"/credentials/{cred}/keys", None, 200),
        ("PUT", f"/credentials/{cred}", {"credentials": {"description": "d"}}, 204),
        ("DELETE", f"/credentials/{cred}", None, 204),
    ]
    for method, path, body, ok in writes:
        status, answer = await h.request(method, path, body, token=token)
        if manages:
            assert status == ok, (role, method, path, answer)
        else:
            assert status == 403, (role, method, path, status)
            assert "data-links" in answer["message"]


async def test_another_workspace_is_404(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    await _other_workspace(h)
    _, outsider = await add_user(h, "outsider", "owner", workspace_id=2)
    cred = await _create(h, "ours")
    theirs = await _create(h, "theirs", token=outsider, workspace=2)
    for method, path, body in [
        ("GET", "/credentials?workspaceId=1", None),
        ("POST", "/credentials?workspaceId=1", _body("stolen")),
        ("GET", f"/credentials/{cred}", None),
        ("GET", f"/credentials/{cred}?workspaceId=2", None),
        ("GET", f"/credentials/{cred}/keys", None),
        ("PUT", f"/credentials/{cred}", {"credentials": {"name": "stolen"}}),
        ("DELETE", f"/credentials/{cred}", None),
        ("GET", "/credentials/validate?workspaceId=1&name=x", None),
    ]:
        status, _ = await h.request(method, path, body, token=outsider)
        assert status == 404, (method, path, status)
    # The admin (a participant of workspace 1 only) cannot reach workspace 2's either, nor
    # reach its own through workspace 2.
    assert (await h.request("GET", f"/credentials/{theirs}"))[0] == 404
    assert (await h.request("GET", f"/credentials/{theirs}?workspaceId=1"))[0] == 404
    _, body = await h.request("GET", "/credentials?workspaceId=2", token=outsider, expect=200)
    assert [c["id"] for c in body["credentials"]] == [theirs]
    await h.request("GET", f"/credentials/{cred}", expect=200)
