"""The controller with fake agents: real gRPC streams speaking agent.proto."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from studios.agent.v1 import agent_pb2 as pb

from studios_shared.connect_token import derive_agent_key, verify_connect_token
from tests.conftest import ControllerHarness
from tests.controller.conftest import AgentFactory
from tests.fake_agent import FakeAgent, observed


async def _status(h: ControllerHarness, sid: str) -> dict[str, Any]:
    studio: dict[str, Any] = (await h.request("GET", f"/studios/{sid}", expect=200))[1]
    return studio


async def _wait_status(
    h: ControllerHarness, sid: str, status: str, timeout: float = 10
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        studio = await _status(h, sid)
        if studio["statusInfo"]["status"] == status:
            return studio
        if loop.time() > deadline:
            raise AssertionError(f"studio {sid} is {studio['statusInfo']}, not {status}")
        await asyncio.sleep(0.05)


async def _start_running(
    h: ControllerHarness, agent: FakeAgent, name: str = "my studio"
) -> tuple[str, int]:
    """Create with autoStart, let the agent run it; (session id, generation)."""
    _, body = await h.request(
        "POST", "/studios", {"name": name, "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await agent.report(
        sid,
        desired.generation,
        pb.SESSION_STATUS_RUNNING,
        tool_port=41000,
        root_dir=f"/state/{sid}/root",
    )
    await _wait_status(h, sid, "running")
    return sid, desired.generation


async def test_stream_authentication_and_handshake(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    bad = FakeAgent(h.grpc_target, "wrong", agent_id="x", compute_env_id=h.compute_env_id)
    await bad.connect(wait_welcome=False)
    assert (await bad.wait_error()).code() == grpc.StatusCode.UNAUTHENTICATED
    await bad.close()

    not_hello = make_agent("y")
    await not_hello.connect(first=pb.ConnectRequest(heartbeat=pb.Heartbeat()), wait_welcome=False)
    assert (await not_hello.wait_error()).code() == grpc.StatusCode.INVALID_ARGUMENT

    old = make_agent("z", protocol_version=pb.PROTOCOL_VERSION_UNSPECIFIED)
    await old.connect(wait_welcome=False)
    assert (await old.wait_error()).code() == grpc.StatusCode.FAILED_PRECONDITION

    unknown_env = make_agent("w", compute_env_id="f" * 16)
    await unknown_env.connect(wait_welcome=False)
    assert (await unknown_env.wait_error()).code() == grpc.StatusCode.NOT_FOUND

    agent = make_agent("agent-1")
    await agent.connect()
    assert agent.welcome is not None
    assert agent.welcome.agent_id == "agent-1"
    assert agent.welcome.heartbeat_interval_seconds == 10
    master = (h.data_dir / "connect-key").read_text().strip()
    assert agent.welcome.connect_token_key == derive_agent_key(bytes.fromhex(master), "agent-1")
    full = await agent.wait_for(lambda r: r.HasField("desired"))
    assert full.desired.full and not full.desired.sessions
    # Welcome first, then the full desired set.
    assert agent.responses[0].HasField("welcome")

    _, body = await h.request("GET", "/agents", expect=200)
    [row] = body["agents"]
    assert row["id"] == "agent-1" and row["connected"] is True
    assert row["computeEnvId"] == h.compute_env_id and row["runtime"] == "local"
    assert row["capacity"]["memoryAvailableBytes"] == 8 << 30
    await agent.send(pb.ConnectRequest(heartbeat=pb.Heartbeat(sent_at=1)))
    await agent.send(
        pb.ConnectRequest(capacity=pb.HostCapacity(cpus=8, memory_available_bytes=123))
    )
    for _ in range(100):
        _, body = await h.request("GET", "/agents", expect=200)
        if body["agents"][0]["capacity"]["cpus"] == 8:
            break
        await asyncio.sleep(0.05)
    assert body["agents"][0]["capacity"]["memoryAvailableBytes"] == 123
    await agent.close()
    for _ in range(100):
        _, body = await h.request("GET", "/agents", expect=200)
        if not body["agents"][0]["connected"]:
            break
        await asyncio.sleep(0.05)
    assert body["agents"][0]["connected"] is False


async def test_lifecycle_with_agent(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent()
    await agent.connect()
    _, body = await h.request(
        "POST", "/studios", {"name": "my studio", "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    assert body["studio"]["statusInfo"]["status"] == "starting"
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    assert desired.generation == 1
    assert desired.spec.image == "studios/python-http:3.11-0.1"
    assert desired.spec.tool == "python-http"
    assert desired.spec.studio_name == "my studio"
    assert desired.spec.checkpoint_base_uri == "file:///tmp/work/.studios/checkpoints"
    assert desired.spec.boot_disk_size_gb == 30
    assert not desired.HasField("restore")

    # Progress while starting; stop is refused while starting.
    await agent.report(
        sid,
        1,
        pb.SESSION_STATUS_STARTING,
        progress=[pb.ProgressStep(name="preparing the volume", status=pb.STEP_STATUS_IN_PROGRESS)],
    )
    for _ in range(100):
        studio = await _status(h, sid)
        if studio["progress"] and studio["progress"][0]["message"] == "preparing the volume":
            break
        await asyncio.sleep(0.02)
    assert studio["progress"][0]["status"] == "in-progress"
    status, body = await h.request("PUT", f"/studios/{sid}/stop")
    assert status == 409 and "starting" in body["message"]

    await agent.report(sid, 1, pb.SESSION_STATUS_RUNNING, tool_port=41000, root_dir="/r")
    await _wait_status(h, sid, "running")
    status, body = await h.request("PUT", f"/studios/{sid}/start", {})
    assert status == 409
    status, body = await h.request("DELETE", f"/studios/{sid}")
    assert status == 409 and "stop it" in body["message"]

    # An observation of an older generation changes nothing.
    await agent.report(sid, 0, pb.SESSION_STATUS_ERRORED, message="old news")

    # Connect: 302 to the agent's proxy with a token for this session.
    assert h.http is not None
    async with h.http.get(
        f"{h.url}/studios/{sid}/connect",
        headers={"Authorization": f"Bearer {h.admin_token}"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    parts = urlsplit(location)
    assert parts.scheme == "http" and parts.hostname == f"{sid}.localhost" and parts.port == 7070
    token = parse_qs(parts.query)["studio-token"][0]
    assert agent.welcome is not None
    claims = verify_connect_token(agent.welcome.connect_token_key, token, session_id=sid)
    assert claims.user_name == "admin" and claims.user_id == 1

    # Stop: desired STOPPED, "stopping"; the agent writes the final checkpoint, then stops.
    mark = len(agent.responses)
    _, body = await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    assert body["jobSubmitted"] is True and body["statusInfo"]["status"] == "stopping"
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    await agent.checkpoint(sid, 1, "ckpt-a", pb.CHECKPOINT_STATUS_FINALIZED)
    await agent.report(sid, 1, pb.SESSION_STATUS_STOPPED)
    await _wait_status(h, sid, "stopped")
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert body["totalSize"] == 1
    [ckpt] = body["checkpoints"]
    assert ckpt["status"] == "finalized" and ckpt["name"] == "my_studio_1"
    assert ckpt["path"] == f"file:///tmp/work/.studios/checkpoints/manifests/{sid}/ckpt-a"
    assert ckpt["author"]["userName"] == "admin"
    status, _ = await h.request("GET", f"/studios/{sid}/connect")
    assert status == 409

    # Start again: generation 2 restores the newest checkpoint.
    mark = len(agent.responses)
    _, body = await h.request("PUT", f"/studios/{sid}/start", expect=200)
    assert body["statusInfo"]["status"] == "starting"
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert desired.generation == 2
    assert desired.restore.uri == f"file:///tmp/work/.studios/checkpoints/manifests/{sid}/ckpt-a"
    assert desired.restore.checkpoint_id == ckpt["id"]
    await agent.checkpoint(sid, 2, "ckpt-b", pb.CHECKPOINT_STATUS_INTERIM)
    await agent.report(sid, 2, pb.SESSION_STATUS_ERRORED, message="tool exited with status 3")
    studio = await _wait_status(h, sid, "errored")
    assert studio["statusInfo"]["message"] == "tool exited with status 3"
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert [c["name"] for c in body["checkpoints"]] == ["my_studio_2", "my_studio_1"]
    assert body["checkpoints"][0]["status"] == "interim"
    # A refresh of the same run updates that run's checkpoint (one per run, newest
    # object); a late re-send of the older refresh does not take it back.
    # Each event is acked once its transaction has committed, saying what became of it.
    mark = len(agent.responses)
    now = int(time.time())
    await agent.checkpoint(sid, 2, "ckpt-c", pb.CHECKPOINT_STATUS_INTERIM, size=99, saved_at=now)
    await agent.checkpoint(sid, 2, "ckpt-b", pb.CHECKPOINT_STATUS_INTERIM, saved_at=now - 60)
    await agent.checkpoint(
        sid, 2, "ckpt-d", pb.CHECKPOINT_STATUS_FINALIZED, size=77, saved_at=now + 1
    )
    ack_c = await agent.wait_ack(sid, "ckpt-c", start=mark)
    ack_b = await agent.wait_ack(sid, "ckpt-b", start=mark)
    ack_d = await agent.wait_ack(sid, "ckpt-d", start=mark)
    assert ack_c.result == pb.CHECKPOINT_ACK_RESULT_RECORDED and ack_c.generation == 2
    assert ack_b.result == pb.CHECKPOINT_ACK_RESULT_SUPERSEDED
    assert ack_d.result == pb.CHECKPOINT_ACK_RESULT_RECORDED
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert body["totalSize"] == 2
    assert [c["name"] for c in body["checkpoints"]] == ["my_studio_2", "my_studio_1"]
    newest = body["checkpoints"][0]
    assert newest["path"] == f"file:///tmp/work/.studios/checkpoints/manifests/{sid}/ckpt-d"
    assert newest["status"] == "finalized"
    mark = len(agent.responses)
    await agent.checkpoint(sid, 2, "ckpt-c", pb.CHECKPOINT_STATUS_INTERIM)
    ack = await agent.wait_ack(sid, "ckpt-c", start=mark)
    assert ack.result == pb.CHECKPOINT_ACK_RESULT_SUPERSEDED
    _, body = await h.request("GET", f"/studios/{sid}/checkpoints", expect=200)
    assert body["checkpoints"][0]["path"].endswith("/ckpt-d")

    # Delete an errored studio: the agent is told to forget it.
    mark = len(agent.responses)
    await h.request("DELETE", f"/studios/{sid}", expect=204)
    await agent.wait_desired(sid, pb.DESIRED_STATUS_DELETED, start=mark)


async def test_placement_waits_for_an_agent(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    _, body = await h.request(
        "POST", "/studios", {"name": "early", "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    assert "waiting for an agent" in body["studio"]["statusInfo"]["message"]
    small = make_agent("small", memory_available=1 << 30)
    big = make_agent("big", memory_available=64 << 30)
    await big.connect()
    await small.connect()
    desired = await big.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    assert desired.generation == 1
    await big.report(sid, 1, pb.SESSION_STATUS_RUNNING)
    await _wait_status(h, sid, "running")
    sent_to_small = [s.session_id for r in small.responses for s in r.desired.sessions]
    assert sid not in sent_to_small


async def test_reconnect_resends_full_desired_state(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent()
    await agent.connect()
    sid, gen = await _start_running(h, agent)
    await agent.close()
    for _ in range(200):
        studio = await _status(h, sid)
        if "disconnected" in studio["statusInfo"].get("message", ""):
            break
        await asyncio.sleep(0.02)
    assert "disconnected" in studio["statusInfo"].get("message", "")
    # A disconnect does not error the session.
    assert studio["statusInfo"]["status"] == "running"

    again = make_agent()
    await again.connect(inventory=[observed(sid, gen, pb.SESSION_STATUS_RUNNING)])
    desired = await again.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, full=True)
    assert desired.generation == gen
    await again.report(sid, gen, pb.SESSION_STATUS_RUNNING)
    for _ in range(100):
        studio = await _status(h, sid)
        if "message" not in studio["statusInfo"]:
            break
        await asyncio.sleep(0.02)
    assert studio["statusInfo"]["status"] == "running"
    # No message now: absent (never null).
    assert "message" not in studio["statusInfo"]


async def test_new_stream_replaces_old_one(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    first = make_agent()
    await first.connect()
    second = make_agent()
    await second.connect()
    assert (await first.wait_error()).code() == grpc.StatusCode.ABORTED
    _, body = await controller_harness.request("GET", "/agents", expect=200)
    assert body["agents"][0]["connected"] is True


async def test_inventory_without_a_running_session_errors_it(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent()
    await agent.connect()
    sid, _gen = await _start_running(h, agent)
    await agent.close()

    again = make_agent()
    await again.connect(inventory=[observed("deadbeef", 3, pb.SESSION_STATUS_RUNNING)])
    studio = await _wait_status(h, sid, "errored")
    assert studio["statusInfo"]["message"] == "session lost: agent agent-1 no longer has it"
    # The unknown session reported by the agent is to be deleted there.
    desired = await again.wait_desired("deadbeef", pb.DESIRED_STATUS_DELETED)
    assert desired.generation == 0
    # The lost session is not to be started again from scratch.
    await again.wait_desired(sid, pb.DESIRED_STATUS_STOPPED)
    # It can be started again.
    mark = len(again.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    desired = await again.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert desired.generation == 2


async def test_start_the_agent_never_saw_is_sent_again_not_lost(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    """A start placed on an agent that then reconnects without it (the desired state never
    reached it, or it was killed before saving the session) stays `starting` and is sent
    again; it is not "lost", since nothing of it ran."""
    h = controller_harness
    agent = make_agent()
    await agent.connect(inventory=[])
    _, body = await h.request(
        "POST", "/studios", {"name": "unseen", "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await agent.close()

    again = make_agent()
    await again.connect(inventory=[])
    resent = await again.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    assert resent.generation == desired.generation
    studio = await _status(h, sid)
    assert studio["statusInfo"]["status"] == "starting", studio["statusInfo"]
    await again.report(sid, desired.generation, pb.SESSION_STATUS_RUNNING)
    await _wait_status(h, sid, "running")


async def test_controller_restart_keeps_studios(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent()
    await agent.connect()
    sid, gen = await _start_running(h, agent)
    _, stopped = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": "idle", "computeEnvId": h.compute_env_id},
        expect=200,
    )
    await agent.close()
    admin_token = h.admin_token
    await h.restart()
    assert h.admin_token == admin_token  # not rewritten
    studio = await _status(h, sid)
    assert studio["statusInfo"]["status"] == "running"
    idle = await _status(h, stopped["studio"]["sessionId"])
    assert idle["statusInfo"]["status"] == "stopped"
    _, body = await h.request("GET", "/agents", expect=200)
    assert body["agents"][0]["connected"] is False

    again = make_agent()
    await again.connect(inventory=[observed(sid, gen, pb.SESSION_STATUS_RUNNING)])
    desired = await again.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, full=True)
    assert desired.generation == gen
    await _wait_status(h, sid, "running")
