"""Labels (issue 14): `/labels` in the reference's shapes, studios' `labelIds`,
`attributes=labels` and `search=label:name=value`. Every answer is also checked against
the reference by the harness."""

from __future__ import annotations

from typing import Any

from tests.conftest import ControllerHarness


async def label(h: ControllerHarness, name: str, value: str | None = None, **extra: Any) -> int:
    body: dict[str, Any] = {"name": name, **extra}
    if value is not None:
        body.update(value=value, resource=True)
    _, answer = await h.request("POST", "/labels", body, expect=200)
    return int(answer["id"])


async def studio(h: ControllerHarness, name: str, **extra: Any) -> dict[str, Any]:
    """A new studio as described with its labels."""
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": name, "computeEnvId": h.compute_env_id, **extra},
        expect=200,
    )
    return await described(h, body["studio"]["sessionId"])


async def described(h: ControllerHarness, session_id: str) -> dict[str, Any]:
    _, body = await h.request("GET", f"/studios/{session_id}?attributes=labels", expect=200)
    return dict(body)


async def test_label_crud_in_the_reference_shape(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    _, created = await h.request(
        "POST", "/labels", {"name": "env", "value": "prod", "resource": True}, expect=200
    )
    assert created == {
        "id": created["id"],
        "name": "env",
        "value": "prod",
        "resource": True,
        "isDefault": False,
    }
    # Create-or-get: the same name and value answers the existing label.
    _, again = await h.request(
        "POST", "/labels", {"name": "env", "value": "prod", "resource": True}, expect=200
    )
    assert again["id"] == created["id"]
    _, simple = await h.request("POST", "/labels", {"name": "scratch"}, expect=200)
    assert "value" not in simple and simple["resource"] is False

    _, listing = await h.request("GET", "/labels", expect=200)
    assert listing["totalSize"] == 2
    assert [x["name"] for x in listing["labels"]] == ["env", "scratch"]
    assert all("dateCreated" in x for x in listing["labels"])
    _, only = await h.request("GET", "/labels?type=resource", expect=200)
    assert [x["name"] for x in only["labels"]] == ["env"]
    _, only = await h.request("GET", "/labels?type=simple", expect=200)
    assert [x["name"] for x in only["labels"]] == ["scratch"]
    _, found = await h.request("GET", "/labels?search=env%3Dpr", expect=200)
    assert found["totalSize"] == 1
    _, page = await h.request("GET", "/labels?max=1&offset=1", expect=200)
    assert page["totalSize"] == 2 and [x["name"] for x in page["labels"]] == ["scratch"]

    _, updated = await h.request(
        "PUT", f"/labels/{created['id']}", {"value": "staging", "isDefault": True}, expect=200
    )
    assert updated == {"id": created["id"], "name": "env", "value": "staging", "isDefault": True}
    _, defaults = await h.request("GET", "/labels?isDefault=true", expect=200)
    assert [x["id"] for x in defaults["labels"]] == [created["id"]]

    await h.request("DELETE", f"/labels/{created['id']}", expect=204)
    await h.request("DELETE", f"/labels/{created['id']}", expect=404)
    await h.request("PUT", f"/labels/{created['id']}", {"name": "x1"}, expect=404)


async def test_label_bad_input(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    for bad in ("a", "-env", "env-", "e--v", "has space", "x" * 40, "é"):
        _, body = await h.request("POST", "/labels", {"name": bad}, expect=400)
        assert body["message"].startswith("name:"), body
    _, body = await h.request("POST", "/labels", {"name": "env", "resource": True}, expect=400)
    assert body["message"].startswith("value:")
    _, body = await h.request(
        "POST", "/labels", {"name": "env", "value": "a b", "resource": True}, expect=400
    )
    assert body["message"].startswith("value:")
    _, body = await h.request("POST", "/labels", {"name": "env", "value": "x"}, expect=400)
    assert "resource" in body["message"]
    await h.request("POST", "/labels", {"name": 5}, expect=400)
    await h.request("GET", "/labels?type=other", expect=400)
    await h.request("PUT", "/labels/abc", {"name": "ok"}, expect=400)

    # Renaming onto another label's name and value: 409 naming the field.
    first = await label(h, "env", "prod")
    second = await label(h, "env", "dev")
    _, body = await h.request("PUT", f"/labels/{second}", {"value": "prod"}, expect=409)
    assert body["message"].startswith("name:")
    simple = await label(h, "tmp")
    _, body = await h.request("PUT", f"/labels/{simple}", {"value": "x"}, expect=400)
    assert body["message"].startswith("value:")
    _, body = await h.request("PUT", f"/labels/{first}", {"name": "b@d"}, expect=400)
    assert body["message"].startswith("name:")


async def test_studio_labels(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    prod = await label(h, "env", "prod")
    dev = await label(h, "env", "dev")
    team = await label(h, "team", "bio")
    default = await label(h, "cost-center", "42", isDefault=True)
    simple = await label(h, "scratch")

    a = await studio(h, "a", labelIds=[prod, team])
    assert sorted(x["name"] + "=" + x["value"] for x in a["labels"]) == ["env=prod", "team=bio"]
    # No labelIds: the workspace's default resource labels.
    b = await studio(h, "b")
    assert [x["id"] for x in b["labels"]] == [default]
    c = await studio(h, "c", labelIds=[])
    assert c["labels"] == []

    # Labels only when asked for (attributes=labels).
    _, plain = await h.request("GET", f"/studios/{a['sessionId']}", expect=200)
    assert plain.get("labels") is None
    _, shown = await h.request("GET", f"/studios/{a['sessionId']}?attributes=labels", expect=200)
    assert {x["id"] for x in shown["labels"]} == {prod, team}
    _, listing = await h.request("GET", "/studios?attributes=labels", expect=200)
    assert {s["name"]: len(s["labels"]) for s in listing["studios"]} == {"a": 2, "b": 1, "c": 0}
    _, listing = await h.request("GET", "/studios", expect=200)
    assert all(s.get("labels") is None for s in listing["studios"])
    await h.request("GET", "/studios?attributes=resources", expect=400)

    # Search by label.
    async def names(search: str) -> list[str]:
        _, found = await h.request("GET", f"/studios?search={search}", expect=200)
        return sorted(s["name"] for s in found["studios"])

    assert await names("label:env=prod") == ["a"]
    assert await names("label:env") == ["a"]
    assert await names("label:cost-center=42") == ["b"]
    assert await names("label:env=dev") == []
    assert await names("label:env=prod%20label:cost-center=42") == ["a", "b"]

    # Edit: the labels become exactly those given.
    await h.request("PUT", f"/studios/{a['sessionId']}", {"labelIds": [dev]}, expect=200)
    edited = await described(h, a["sessionId"])
    assert [x["id"] for x in edited["labels"]] == [dev]
    assert await names("label:env=dev") == ["a"]
    # Without labelIds an edit keeps them.
    await h.request("PUT", f"/studios/{a['sessionId']}", {"description": "d"}, expect=200)
    edited = await described(h, a["sessionId"])
    assert [x["id"] for x in edited["labels"]] == [dev]

    # Bad labelIds: unknown (404), simple (400), two values of one name (400).
    await studio_refused(h, "d", [999], 404)
    await studio_refused(h, "d", [simple], 400)
    await studio_refused(h, "d", [prod, dev], 400)
    await h.request("PUT", f"/studios/{a['sessionId']}", {"labelIds": [999]}, expect=404)

    # Deleting a label takes it off the studios.
    await h.request("DELETE", f"/labels/{dev}", expect=204)
    _, shown = await h.request("GET", f"/studios/{a['sessionId']}?attributes=labels", expect=200)
    assert shown["labels"] == []


async def studio_refused(
    h: ControllerHarness, name: str, label_ids: list[int], status: int
) -> None:
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": name, "computeEnvId": h.compute_env_id, "labelIds": label_ids},
        expect=status,
    )
    assert body["message"].startswith("labelIds:"), body
