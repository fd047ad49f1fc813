"""The controller SIGKILLed while it handles a create, a start, a stop and a delete.

Real processes (tests/e2e_harness.py): the controller runs with the test-only fault hook
`STUDIOS_TEST_FAULT=pause=<point>`, which makes the handler wait forever at `<point>` —
right after the operation's transaction committed and before the agent is told or the
client answered, the one window a timing-based kill cannot hit reliably. The test waits
for the controller's "paused at" log line, SIGKILLs it, starts it again without the hook,
and checks that the API state is consistent, that the operation completes or can be
retried, that nothing is duplicated, that no studio is left in `starting` or `stopping`,
that the agent converges, and that a session's files survive a stop byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e_harness import Stack, agent_session, open_studio

pytestmark = pytest.mark.e2e

FAULT = "STUDIOS_TEST_FAULT"


async def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _stack(tmp_path: Path, point: str) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path, controller_env={FAULT: f"pause={point}"})
    try:
        await stack.start()
        yield stack
    finally:
        await stack.close()


async def _kill_during(
    stack: Stack, point: str, method: str, path: str, body: Any = None
) -> tuple[int, Any] | None:
    """Send the request, SIGKILL the controller once it pauses at `point`, start it again
    without the hook; the answer the client got (None: the connection broke)."""
    assert stack.api is not None
    log = stack.controller.log_path
    seen = log.read_text(errors="replace").count(f"test fault: paused at {point}")
    request = asyncio.create_task(stack.api.request(method, path, body))

    def paused() -> bool:
        if request.done():
            return True  # answered: the point was never reached (the assertion below says so)
        return log.read_text(errors="replace").count(f"test fault: paused at {point}") > seen

    await _wait(paused, f"the controller to pause at {point}")
    assert not request.done(), f"{method} {path} answered without pausing: {request.result()}"
    stack.controller.kill()
    answer = None
    with contextlib.suppress(aiohttp.ClientError):
        answer = await asyncio.wait_for(request, 10)
    stack.controller.env.pop(FAULT, None)
    stack.controller.start()
    await stack.controller.wait_ready()
    await stack.wait_agent_connected()
    return answer


async def _studios_named(stack: Stack, name: str) -> list[dict[str, Any]]:
    assert stack.api is not None
    _, listing = await stack.api.request("GET", "/studios?max=100", expect=200)
    return [s for s in listing["studios"] if s["name"] == name]


def _write_files(root: Path) -> dict[str, bytes]:
    files = {
        "notes.txt": b"written before the controller died\n",
        "data/blob.bin": os.urandom(3 << 20),
        "data/empty": b"",
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


def _check_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        assert (root / rel).read_bytes() == content, f"{rel} changed across the stop"


def _root(stack: Stack, sid: str) -> Path:
    return Path(agent_session(stack.agent, sid)["rootDir"])


@pytest.mark.parametrize("point", ["create.committed", "create.placed"])
async def test_controller_killed_during_create(tmp_path: Path, point: str) -> None:
    async with _stack(tmp_path, point) as stack:
        api = stack.api
        assert api is not None
        body = {"name": "crash create", "computeEnvId": stack.compute_env_id}
        answer = await _kill_during(stack, point, "POST", "/studios", body)
        assert answer is None, "the client cannot have had an answer"
        # The create committed: the studio exists once and its start completes.
        [studio] = await _studios_named(stack, "crash create")
        sid = studio["sessionId"]
        stack.session_ids.add(sid)
        studio = await stack.wait_running(sid)
        assert "Directory listing" in await open_studio(api, studio)
        # A client retrying the create is told the name is taken; nothing is duplicated.
        status, again = await api.request("POST", "/studios", body)
        assert status == 409 and "already exists" in again["message"]
        assert len(await _studios_named(stack, "crash create")) == 1
        assert agent_session(stack.agent, sid)["status"] == "running"


@pytest.mark.parametrize("point", ["start.committed", "start.placed"])
async def test_controller_killed_during_start(tmp_path: Path, point: str) -> None:
    async with _stack(tmp_path, point) as stack:
        api = stack.api
        assert api is not None
        sid = await stack.create_studio("crash start")
        await stack.wait_running(sid)
        files = _write_files(_root(stack, sid))
        await stack.stop_studio(sid)
        [first] = await stack.checkpoints(sid)

        answer = await _kill_during(stack, point, "PUT", f"/studios/{sid}/start", {})
        assert answer is None
        # Committed as `starting` (and perhaps placed, the agent told): the restarted
        # controller places it or the agent's inventory confirms it; it runs once.
        studio = await stack.wait_running(sid)
        _check_files(_root(stack, sid), files)
        assert "Directory listing" in await open_studio(api, studio)
        # One new run, not two: the earlier run's checkpoint and this run's first one.
        checkpoints = await stack.checkpoints(sid)
        assert checkpoints[0]["id"] == first["id"] and len(checkpoints) <= 2
        # A retried start of the running studio is refused, not a second session.
        status, _ = await api.request("PUT", f"/studios/{sid}/start", {})
        assert status == 409
        await stack.stop_studio(sid)
        assert len(await stack.checkpoints(sid)) == 2


async def test_controller_killed_during_stop(tmp_path: Path) -> None:
    async with _stack(tmp_path, "stop.committed") as stack:
        api = stack.api
        assert api is not None
        sid = await stack.create_studio("crash stop")
        await stack.wait_running(sid)
        files = _write_files(_root(stack, sid))

        answer = await _kill_during(stack, "stop.committed", "PUT", f"/studios/{sid}/stop")
        assert answer is None
        # Committed as `stopping` while the agent was never told: the full desired state
        # sent on its reconnect stops it; nothing stays `stopping`.
        studio = await api.wait_status(sid, {"stopped", "errored"}, timeout=60)
        assert studio["statusInfo"]["status"] == "stopped", studio["statusInfo"]
        [final] = await stack.checkpoints(sid)
        assert final["status"] == "finalized"
        # The files written in the session come back with the next start.
        await stack.start_studio(sid)
        _check_files(_root(stack, sid), files)
        # A retried stop of the stopped studio after that is harmless.
        await stack.stop_studio(sid)
        status, body = await api.request("PUT", f"/studios/{sid}/stop")
        assert status in (200, 409), body
        assert (await api.wait_status(sid, "stopped"))["statusInfo"]["status"] == "stopped"
        assert len(await stack.checkpoints(sid)) == 2


async def test_controller_killed_during_delete(tmp_path: Path) -> None:
    async with _stack(tmp_path, "delete.committed") as stack:
        api = stack.api
        assert api is not None
        sid = await stack.create_studio("crash delete")
        await stack.wait_running(sid)
        await stack.stop_studio(sid)
        assert agent_session(stack.agent, sid)["status"] == "stopped"

        answer = await _kill_during(stack, "delete.committed", "DELETE", f"/studios/{sid}")
        assert answer is None
        status, body = await api.request("GET", f"/studios/{sid}")
        assert status == 404 and "message" in body
        assert await _studios_named(stack, "crash delete") == []
        # A retried delete says it is gone; the name is free again.
        status, _ = await api.request("DELETE", f"/studios/{sid}")
        assert status == 404

        # The agent converges: it forgets the session.
        def forgotten() -> bool:
            listing = stack.agent.cli("sessions")
            sessions = listing["sessions"] if isinstance(listing, dict) else listing
            return all(s.get("sessionId", s.get("id")) != sid for s in sessions)

        await _wait(forgotten, "the agent to forget the deleted session")
        sid2 = await stack.create_studio("crash delete")
        assert sid2 != sid
        await stack.wait_running(sid2)
