"""Who is connected, end to end: proxy -> agent report -> controller -> API."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.e2e.test_stack import TEMPLATE, Stack, _open_studio
from tests.e2e.test_stack import stack as stack
from tests.e2e_harness import RestClient


async def _wait(api: RestClient, sid: str, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        studio: dict[str, Any] = (await api.request("GET", f"/studios/{sid}", expect=200))[1]
        if check(studio):
            return studio
        assert time.monotonic() < deadline, studio
        await asyncio.sleep(0.2)


async def test_active_connections_are_listed_and_cleared_at_stop(stack: Stack) -> None:
    await stack.start()
    api = stack.api
    assert api is not None
    _, body = await api.request(
        "POST",
        "/studios",
        {"name": "connected", "computeEnvId": stack.compute_env_id, "dataStudioToolUrl": TEMPLATE},
        expect=200,
    )
    sid = body["studio"]["sessionId"]
    studio = await api.wait_status(sid, "running")
    assert studio["activeConnections"] == []
    assert "Directory listing" in await _open_studio(api, studio)

    detail = await _wait(api, sid, lambda b: b["activeConnections"])
    (conn,) = detail["activeConnections"]
    _, me = await api.request("GET", "/user-info", expect=200)
    user = me.get("user", me)
    assert conn["id"] == user["id"]
    assert conn["userName"] == user["userName"]
    assert conn["email"] == user["email"]
    # No avatar: absent, never null (issue 14).
    assert "avatar" not in conn and conn["lastActive"].endswith("Z")
    _, listing = await api.request("GET", "/studios", expect=200)
    (listed,) = [s for s in listing["studios"] if s["sessionId"] == sid]
    assert [c["id"] for c in listed["activeConnections"]] == [user["id"]]

    await api.request("PUT", f"/studios/{sid}/stop", expect=200)
    await api.wait_status(sid, "stopped")
    await _wait(api, sid, lambda b: b["activeConnections"] == [], timeout=10)
