"""The connection audit end to end (issue 13): a browser-like client connects through the
real agent's proxy and leaves; the real controller lists the visit (user, client address
127.0.0.1, opened and closed) to the owner, and refuses it to a maintain user. A visit
open when the agent is killed is closed once the restarted agent reconnects.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e_harness import AgentProcess, LocalhostResolver, RestClient, Stack

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/python-http:3.11-0.1"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        await s.close()


def _browser() -> aiohttp.ClientSession:
    """A client of its own: closing it closes its connections to the proxy."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=LocalhostResolver()),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )


async def _visit(browser: aiohttp.ClientSession, api: RestClient, studio: dict[str, Any]) -> None:
    """Open `studioUrl` as a browser does, then fetch a page through the proxy."""
    async with browser.get(
        studio["studioUrl"],
        headers={"Authorization": f"Bearer {api.token}"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    async with browser.get(location) as resp:  # token -> cookie -> the tool
        assert resp.status == 200, await resp.text()
        assert "Directory listing" in await resp.text()


async def _audit(
    api: RestClient,
    sid: str,
    check: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        _, body = await api.request("GET", f"/studios/{sid}/connections", expect=200)
        if check(body["connections"]):
            return list(body["connections"])
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.25)


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_a_visit_through_the_proxy_is_audited(stack: Stack) -> None:
    await stack.start()
    api = stack.api
    assert api is not None
    sid = await stack.create_studio("audited", dataStudioToolUrl=TEMPLATE)
    studio = await stack.wait_running(sid)
    _, me = await api.request("GET", "/user-info", expect=200)
    user = me.get("user", me)

    started = time.time()
    async with _browser() as browser:
        await _visit(browser, api, studio)
        (opened,) = await _audit(api, sid, lambda c: len(c) == 1)
        assert "closedAt" not in opened and "durationSeconds" not in opened
    left = time.time()
    # The close comes once the proxy's grace for a reconnect has passed.
    (visit,) = await _audit(api, sid, lambda c: len(c) == 1 and "closedAt" in c[0])
    assert visit["user"] == {"id": user["id"], "userName": user["userName"]}
    assert visit["clientAddress"] == "127.0.0.1"
    opened_at, closed_at = _time(visit["openedAt"]), _time(visit["closedAt"])
    assert started - 1 <= opened_at <= closed_at <= left + 1
    assert visit["durationSeconds"] == round(closed_at - opened_at)
    assert "closedBy" not in visit

    # Refused to a maintain user (admins and owners only).
    maintainer = RestClient(api.base_url, stack.controller.add_user("maintainer", "maintain"))
    try:
        status, body = await maintainer.request("GET", f"/studios/{sid}/connections")
        assert status == 403, body
        # They may use the studio otherwise: it is the audit that is theirs not to see.
        await maintainer.request("GET", f"/studios/{sid}", expect=200)
    finally:
        await maintainer.close()

    # Kept after the studio is deleted.
    await stack.stop_studio(sid)
    await api.request("DELETE", f"/studios/{sid}", expect=204)
    stack.session_ids.discard(sid)
    assert len(await _audit(api, sid, lambda c: len(c) == 1)) == 1


async def test_a_visit_open_when_the_agent_is_killed_is_closed_at_its_return(
    stack: Stack,
) -> None:
    await stack.start()
    api = stack.api
    assert api is not None
    sid = await stack.create_studio("killed under a visit", dataStudioToolUrl=TEMPLATE)
    studio = await stack.wait_running(sid)
    async with _browser() as browser:
        await _visit(browser, api, studio)
        await _audit(api, sid, lambda c: len(c) == 1)

        stack.agent.stop(signal.SIGKILL)
        killed = time.time()
        stack.agents.append(
            AgentProcess(
                stack.controller,
                stack.compute_env_id,
                stack.agent.state_dir,
                proxy_port=stack.agent.proxy_port,
            )
        )
        stack.agent.start()
        await stack.wait_agent_connected()
        (visit,) = await _audit(api, sid, lambda c: len(c) == 1 and "closedAt" in c[0])
    assert visit["closedBy"] == "agentRestart"
    assert _time(visit["closedAt"]) >= killed - 1
    await stack.wait_running(sid)
