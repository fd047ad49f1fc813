"""Compute environments in the reference's shapes (issue 14): list with status, describe,
update, delete, disable/enable, primary, validate; POST /compute-envs as before."""

from __future__ import annotations

from typing import Any

from tests.conftest import ControllerHarness


async def new_env(h: ControllerHarness, name: str) -> str:
    _, body = await h.request(
        "POST",
        "/compute-envs",
        {"computeEnv": {"name": name, "platform": "studio-agent", "config": {"workDir": "/w"}}},
        expect=200,
    )
    return str(body["computeEnvId"])


async def envs(h: ControllerHarness, query: str = "") -> dict[str, dict[str, Any]]:
    _, body = await h.request("GET", f"/compute-envs{query}", expect=200)
    return {e["name"]: e for e in body["computeEnvs"]}


async def test_describe_update_primary_disable(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    other = await new_env(h, "other")
    listed = await envs(h)
    assert listed["local"]["status"] == "AVAILABLE" and listed["local"]["primary"] is False
    assert "lastUsed" not in listed["local"]

    _, body = await h.request("GET", f"/compute-envs/{other}", expect=200)
    env = body["computeEnv"]
    assert env["id"] == other and env["platform"] == "studio-agent" and env["workspaceId"] == 1
    assert env["studioAgentConfig"]["workDir"] == "/w" and "config" not in env
    await h.request("GET", "/compute-envs/ffffffffffffffff", expect=404)
    await h.request("GET", f"/compute-envs/{other}?workspaceId=99", expect=404)

    await h.request(
        "PUT", f"/compute-envs/{other}", {"name": "renamed", "description": "d"}, expect=204
    )
    listed = await envs(h)
    assert listed["renamed"]["description"] == "d"
    _, body = await h.request("PUT", f"/compute-envs/{other}", {"name": "local"}, expect=409)
    assert body["message"].startswith("name:")
    for bad in ("", " x", "x" * 101):
        _, body = await h.request("PUT", f"/compute-envs/{other}", {"name": bad}, expect=400)
        assert body["message"].startswith("name"), body

    await h.request("GET", "/compute-envs/validate?name=free", expect=204)
    _, body = await h.request("GET", "/compute-envs/validate?name=local", expect=409)
    assert body["message"].startswith("name:")
    await h.request("GET", "/compute-envs/validate?name=", expect=400)

    await h.request("POST", f"/compute-envs/{other}/primary", expect=204)
    await h.request("POST", f"/compute-envs/{h.compute_env_id}/primary", expect=204)
    listed = await envs(h)
    assert listed["local"]["primary"] is True and listed["renamed"]["primary"] is False

    _, body = await h.request("POST", f"/compute-envs/{h.compute_env_id}/validate", expect=200)
    assert body == {"status": "AVAILABLE", "transientError": False}
    await h.request("POST", f"/compute-envs/{h.compute_env_id}/disable", expect=204)
    listed = await envs(h)
    # Disabled: no longer primary.
    assert listed["local"]["status"] == "DISABLED" and listed["local"]["primary"] is False
    assert set(await envs(h, "?status=DISABLED")) == {"local"}
    assert set(await envs(h, "?status=available")) == {"renamed"}
    await h.request("GET", "/compute-envs?status=GONE", expect=400)
    await h.request("POST", f"/compute-envs/{h.compute_env_id}/validate", expect=400)
    await h.request("POST", f"/compute-envs/{h.compute_env_id}/primary", expect=409)

    # No new starts on a disabled environment: 409 naming it.
    _, body = await h.request(
        "POST", "/studios", {"name": "s", "computeEnvId": h.compute_env_id}, expect=409
    )
    assert h.compute_env_id in body["message"] and "disabled" in body["message"]
    _, body = await h.request(
        "POST", "/studios?autoStart=false", {"name": "s", "computeEnvId": h.compute_env_id}
    )
    sid = body["studio"]["sessionId"]
    _, body = await h.request("PUT", f"/studios/{sid}/start", expect=409)
    assert "disabled" in body["message"] and "'local'" in body["message"]
    await h.request("POST", f"/compute-envs/{h.compute_env_id}/enable", expect=204)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)


async def test_delete(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    other = await new_env(h, "other")
    _, body = await h.request(
        "POST", "/studios?autoStart=false", {"name": "uses-it", "computeEnvId": other}, expect=200
    )
    sid = body["studio"]["sessionId"]
    _, body = await h.request("DELETE", f"/compute-envs/{other}", expect=409)
    assert "'uses-it'" in body["message"] and sid in body["message"]
    await h.request("DELETE", f"/studios/{sid}", expect=204)
    await h.request("DELETE", f"/compute-envs/{other}", expect=204)
    await h.request("GET", f"/compute-envs/{other}", expect=404)
    await h.request("DELETE", f"/compute-envs/{other}", expect=404)
    assert set(await envs(h)) == {"local"}
    # The name is free again; POST /compute-envs works as before.
    await new_env(h, "other")
    await h.request(
        "POST", "/studios?autoStart=false", {"name": "x", "computeEnvId": other}, expect=404
    )
