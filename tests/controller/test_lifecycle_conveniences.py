"""Lifecycle conveniences (issue 16): POST /studios/{id}/cancel, Idempotency-Key on create
and start, and the long-poll GET /studios/{id}?wait=STATUS&timeout=S. The controller runs
in-process with a fake agent on the real gRPC stream."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from sqlalchemy import func, select
from studios.agent.v1 import agent_pb2 as pb

from controller.idempotency import Idempotency
from controller.models import IdempotencyKey, Studio, utcnow
from tests.conftest import ControllerHarness
from tests.controller.conftest import AgentFactory
from tests.controller.test_roles import add_user, create


async def _status(h: ControllerHarness, sid: str) -> str:
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    return str(body["statusInfo"]["status"])


async def _started(h: ControllerHarness, make_agent: AgentFactory, name: str) -> tuple[str, int]:
    """A studio whose start the (fake) agent has begun: placed, reported `starting`."""
    agent = make_agent()
    if agent.welcome is None:
        await agent.connect()
    _, body = await h.request(
        "POST", "/studios", {"name": name, "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await agent.report(sid, desired.generation, pb.SESSION_STATUS_STARTING, root_dir="/x")
    assert h.controller is not None and h.controller.db is not None
    for _ in range(200):
        async with h.controller.db.transaction() as session:
            studio = await session.get(Studio, sid)
            if studio is not None and studio.root_dir == "/x":
                return sid, desired.generation
        await asyncio.sleep(0.02)
    raise AssertionError("the agent's report of the start was not applied")


# ------------------------------------------------------------ cancel


async def test_cancel_a_start_the_agent_has_begun(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent()
    await agent.connect()
    sid, generation = await _started(h, lambda: agent, "cancelled")
    # Stop while starting stays 409, as Seqera's guide says.
    status, stop = await h.request("PUT", f"/studios/{sid}/stop")
    assert status == 409, stop
    mark = len(agent.responses)
    _, body = await h.request("POST", f"/studios/{sid}/cancel", expect=200)
    assert body["jobSubmitted"] is True
    assert body["statusInfo"]["status"] == "stopping"
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    assert desired.generation == generation
    # A report of the start the agent sent before it saw the cancel does not undo it.
    await agent.report(sid, generation, pb.SESSION_STATUS_STARTING)
    await agent.report(sid, generation, pb.SESSION_STATUS_STOPPED, message="start cancelled")
    _, body = await h.request("GET", f"/studios/{sid}?wait=stopped&timeout=10", expect=200)
    assert body["statusInfo"]["status"] == "stopped"
    # Nothing to cancel any more; it starts again like any stopped studio.
    status, again = await h.request("POST", f"/studios/{sid}/cancel")
    assert status == 409 and "only a starting or building" in again["message"]
    await h.request("PUT", f"/studios/{sid}/start", expect=200)


async def test_cancel_before_any_agent_began_is_stopped_at_once(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    # No agent connected: the start waits for placement.
    _, body = await h.request(
        "POST", "/studios", {"name": "unplaced", "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    assert body["studio"]["statusInfo"]["status"] == "starting"
    _, cancel = await h.request("POST", f"/studios/{sid}/cancel", expect=200)
    assert cancel["statusInfo"]["status"] == "stopped"
    assert cancel["statusInfo"]["message"] == "start cancelled"


async def test_cancel_roles_and_bad_states(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    sid = await create(h, "idle")
    status, body = await h.request("POST", f"/studios/{sid}/cancel")
    assert status == 409 and f"studio {sid} is stopped" in body["message"]
    _, body = await h.request(
        "POST", "/studios", {"name": "pending", "computeEnvId": h.compute_env_id}, expect=200
    )
    pending = body["studio"]["sessionId"]
    _, view_token = await add_user(h, "viewer", "view")
    status, body = await h.request("POST", f"/studios/{pending}/cancel", token=view_token)
    assert status == 403, body
    _, maintain_token = await add_user(h, "maintainer", "maintain")
    await h.request("POST", f"/studios/{pending}/cancel", token=maintain_token, expect=200)
    status, body = await h.request("POST", "/studios/ffffffff/cancel")
    assert status == 404 and "ffffffff" in body["message"]


# ------------------------------------------------------------ Idempotency-Key


async def _keys(h: ControllerHarness) -> int:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(IdempotencyKey)) or 0)


async def _studios_named(h: ControllerHarness, name: str) -> int:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        count = await session.scalar(
            select(func.count()).select_from(Studio).where(Studio.name == name)
        )
        return int(count or 0)


async def test_retried_create_with_one_key_makes_one_studio(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    body = {"name": "once", "computeEnvId": h.compute_env_id}
    headers = {"Idempotency-Key": "create-once-1"}
    _, first = await h.request(
        "POST", "/studios?autoStart=false", body, headers=headers, expect=200
    )
    _, second = await h.request(
        "POST", "/studios?autoStart=false", body, headers=headers, expect=200
    )
    assert second == first
    assert await _studios_named(h, "once") == 1
    # The same body re-serialised (other key order, spacing) is the same request.
    raw = b'{ "computeEnvId": "%s",  "name": "once" }' % h.compute_env_id.encode()
    _, third = await h.request(
        "POST",
        "/studios?autoStart=false",
        raw=raw,
        headers={**headers, "Content-Type": "application/json"},
        expect=200,
    )
    assert third == first
    # The same key with another body: 422, saying so; nothing created.
    status, refused = await h.request(
        "POST", "/studios?autoStart=false", {**body, "name": "other"}, headers=headers
    )
    assert status == 422
    assert "create-once-1" in refused["message"] and "different request" in refused["message"]
    assert await _studios_named(h, "other") == 0
    # Another key is another request: the name is taken now.
    status, conflict = await h.request(
        "POST", "/studios?autoStart=false", body, headers={"Idempotency-Key": "create-once-2"}
    )
    assert status == 409, conflict
    # ... and that answer is kept for the key too (a client error is an answer).
    status, again = await h.request(
        "POST", "/studios?autoStart=false", body, headers={"Idempotency-Key": "create-once-2"}
    )
    assert status == 409 and again == conflict
    # Another user's same key is theirs alone.
    _, token = await add_user(h, "maintainer", "maintain")
    _, theirs = await h.request(
        "POST",
        "/studios?autoStart=false",
        {**body, "name": "theirs"},
        token=token,
        headers=headers,
        expect=200,
    )
    assert theirs["studio"]["sessionId"] != first["studio"]["sessionId"]


async def test_concurrent_creates_with_one_key_make_one_studio(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    body = {"name": "raced", "computeEnvId": h.compute_env_id}
    headers = {"Idempotency-Key": "raced-key"}
    answers = await asyncio.gather(
        *(h.request("POST", "/studios?autoStart=false", body, headers=headers) for _ in range(6))
    )
    assert {status for status, _ in answers} == {200}, answers
    assert len({a["studio"]["sessionId"] for _, a in answers}) == 1
    assert await _studios_named(h, "raced") == 1
    assert await _keys(h) == 1


async def test_retried_start_with_one_key_starts_once(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent()
    await agent.connect()
    sid = await create(h, "restartable")
    headers = {"Idempotency-Key": "start-1"}
    _, first = await h.request("PUT", f"/studios/{sid}/start", headers=headers, expect=200)
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await agent.report(sid, desired.generation, pb.SESSION_STATUS_RUNNING, tool_port=1)
    await h.request("GET", f"/studios/{sid}?wait=running&timeout=10", expect=200)
    # The retry answers as the first did, and does not start (nor 409) again.
    _, second = await h.request("PUT", f"/studios/{sid}/start", headers=headers, expect=200)
    assert second == first
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        studio = await session.get(Studio, sid)
        assert studio is not None and studio.generation == desired.generation
    # Without the key a start of a running studio is the usual 409.
    status, _ = await h.request("PUT", f"/studios/{sid}/start")
    assert status == 409
    status, bad = await h.request("PUT", f"/studios/{sid}/start", headers={"Idempotency-Key": " "})
    assert status == 400 and "Idempotency-Key" in bad["message"]


# ------------------------------------------------------------ long-poll


async def test_wait_returns_when_the_status_is_reached(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent()
    await agent.connect()
    sid, generation = await _started(h, lambda: agent, "waited")

    async def later() -> None:
        await asyncio.sleep(0.5)
        await agent.report(sid, generation, pb.SESSION_STATUS_RUNNING, tool_port=1)

    reporter = asyncio.create_task(later())
    t0 = time.monotonic()
    _, body = await h.request("GET", f"/studios/{sid}?wait=running,errored&timeout=20", expect=200)
    took = time.monotonic() - t0
    await reporter
    assert body["statusInfo"]["status"] == "running"
    # Woken by the commit, not by the timeout (nor a poll interval).
    assert 0.4 < took < 5, took
    assert h.controller is not None and h.controller.studios is not None
    assert h.controller.studios.events.waiting() == 0


async def test_wait_times_out_with_the_current_state(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    sid = await create(h, "still")
    t0 = time.monotonic()
    _, body = await h.request("GET", f"/studios/{sid}?wait=running&timeout=1", expect=200)
    assert 0.9 < time.monotonic() - t0 < 5
    assert body["statusInfo"]["status"] == "stopped"
    # Already there: at once.
    t0 = time.monotonic()
    await h.request("GET", f"/studios/{sid}?wait=stopped&timeout=60", expect=200)
    assert time.monotonic() - t0 < 1
    for query, word in (
        ("wait=sleeping", "'sleeping' is not a status"),
        ("wait=running&timeout=61", "timeout"),
        ("timeout=5", "only with wait"),
    ):
        status, bad = await h.request("GET", f"/studios/{sid}?{query}")
        assert status == 400 and word in bad["message"], (query, bad)


async def _age_keys(h: ControllerHarness, hours: float) -> None:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        for row in (await session.scalars(select(IdempotencyKey))).all():
            row.created_at = utcnow() - timedelta(hours=hours)


async def test_keys_expire_after_a_day_and_are_purged(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.db is not None
    body = {"name": "first", "computeEnvId": h.compute_env_id}
    headers = {"Idempotency-Key": "daily"}
    await h.request("POST", "/studios?autoStart=false", body, headers=headers, expect=200)
    await _age_keys(h, 23)
    status, _ = await h.request(
        "POST", "/studios?autoStart=false", {**body, "name": "second"}, headers=headers
    )
    assert status == 422
    # Past 24 h the key is free again: another request runs.
    await _age_keys(h, 25)
    await h.request(
        "POST", "/studios?autoStart=false", {**body, "name": "second"}, headers=headers, expect=200
    )
    assert await _studios_named(h, "second") == 1
    assert await Idempotency(h.controller.db).purge() == 0
    await _age_keys(h, 25)
    assert await Idempotency(h.controller.db).purge() == 1
    assert await _keys(h) == 0
