"""An agent is its certificate: the attacks of issue 12 against the agent endpoint.

Against the in-process controller: plaintext gets no HTTP/2 answer on either listener, a
certificate of another CA fails the TLS handshake, a valid certificate cannot claim
another agent or compute environment, a revoked agent is cut off at once and its
sessions become errored (deletable, startable elsewhere), a capacity claim cannot buy
placements, connect keys follow the enrolled identity, and a certificate rotates
without dropping the stream.
"""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc

from controller import enrollment
from controller.agent_ca import AgentCA, DirectoryCaFiles
from controller.models import Agent, Studio
from studios_shared.agent_pki import AgentIdentity, identity_of, new_key_and_csr
from studios_shared.connect_token import derive_agent_key
from tests.conftest import ControllerHarness
from tests.controller.conftest import AgentFactory
from tests.fake_agent import AgentCredentials, FakeAgent

STORE = "file:///tmp/work/.studios/checkpoints"


async def _studio(h: ControllerHarness, sid: str) -> dict[str, Any]:
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    return dict(body)


async def _wait_status(
    h: ControllerHarness, sid: str, status: str, timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = await _studio(h, sid)
        if body["statusInfo"]["status"] == status:
            return body
        assert time.monotonic() < deadline, f"{sid} is {body['statusInfo']}, not {status}"
        await asyncio.sleep(0.05)


async def _agent_row(h: ControllerHarness, agent_id: str) -> Agent:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        agent = await session.get(Agent, agent_id)
        assert agent is not None
        return agent


async def _create(h: ControllerHarness, name: str) -> str:
    _, body = await h.request(
        "POST", "/studios", {"name": name, "computeEnvId": h.compute_env_id}, expect=200
    )
    return str(body["studio"]["sessionId"])


# ---------------------------------------------------------------- the wire


def _h2_preface_answer(port: int) -> bytes:
    """What a plaintext HTTP/2 client gets back for its preface and SETTINGS frame."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(preface)
        sock.settimeout(3)
        received = b""
        try:
            while len(received) < 64:
                chunk = sock.recv(64)
                if not chunk:
                    break
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received


async def test_plaintext_gets_no_http2_answer(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    assert h.controller is not None
    for target, port in (
        (h.grpc_target, h.controller.grpc_port),
        (h.grpc_agents_target, h.controller.grpc_agents_port),
    ):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Endpoints(pb.EndpointsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        answer = await asyncio.to_thread(_h2_preface_answer, port)
        # An HTTP/2 server answers a preface with a SETTINGS frame (type 4); a TLS
        # listener closes, or sends a TLS alert (record type 0x15), nothing of HTTP/2.
        assert not (len(answer) >= 9 and answer[3] == 0x04), answer[:16]
        assert answer == b"" or answer[0] == 0x15, answer[:16]


async def test_a_certificate_of_another_ca_fails_the_handshake(
    controller_harness: ControllerHarness, make_agent: AgentFactory, tmp_path: Path
) -> None:
    h = controller_harness
    # A man in the middle's CA, naming the real agent's id and compute environment.
    rogue_ca = AgentCA.open(DirectoryCaFiles(tmp_path / "rogue-pki"))
    identity = AgentIdentity("agent-1", h.compute_env_id)
    key, csr = new_key_and_csr(identity)
    issued = rogue_ca.sign_agent(csr, identity, timedelta(days=1))
    forged = AgentCredentials(
        agent_id="agent-1",
        key_pem=key,
        certificate_pem=issued.certificate_pem,
        ca_pem=h.ca_pem,
        not_after=int(issued.not_after.timestamp()),
    )
    real = make_agent("agent-1")
    await real.connect(inventory=[])
    attacker = make_agent("agent-1", credentials=forged)
    await attacker.connect(wait_welcome=False)
    error = await attacker.wait_error()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # The real agent's stream was not replaced.
    await asyncio.sleep(0.3)
    assert real.error is None
    assert h.controller is not None and h.controller.hub.is_connected("agent-1")


async def test_a_valid_certificate_cannot_claim_another_agent_or_compute_env(
    controller_harness: ControllerHarness,
    make_agent: AgentFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = controller_harness
    victim = make_agent("victim")
    await victim.connect(inventory=[])
    sid = await _create(h, "private work")
    await victim.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)

    rogue = make_agent("rogue")
    await rogue.connect(inventory=[])
    await rogue.close()
    assert rogue.credentials is not None
    # Its own certificate, the victim's id in the Hello.
    impostor = make_agent("victim", credentials=rogue.credentials)
    await impostor.connect(wait_welcome=False)
    error = await impostor.wait_error()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "the certificate names agent rogue" in (error.details() or "")
    assert "claims agent 'victim'" in (error.details() or "")
    assert not any(r.HasField("welcome") or r.HasField("desired") for r in impostor.responses)
    assert "claimed agent 'victim'" in caplog.text
    # The victim keeps its stream.
    assert victim.error is None

    # Its own id, another compute environment.
    _, body = await h.request(
        "POST",
        "/compute-envs",
        {
            "computeEnv": {
                "name": "other",
                "platform": "studio-agent",
                "config": {"workDir": "file:///tmp/other"},
            }
        },
        expect=200,
    )
    moved = make_agent("rogue", compute_env_id=body["computeEnvId"], credentials=rogue.credentials)
    await moved.connect(wait_welcome=False)
    error = await moved.wait_error()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "of compute environment" in (error.details() or "")


async def test_a_revoked_agent_is_cut_off_and_its_sessions_errored(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.db is not None
    agent = make_agent("doomed")
    await agent.connect(inventory=[])
    sid = await _create(h, "on doomed")
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    gen = desired.generation
    await agent.report(sid, gen, pb.SESSION_STATUS_RUNNING, tool_port=41000)
    await _wait_status(h, sid, "running")
    uri = f"{STORE}/manifests/{sid}/k1"
    await agent.checkpoint(sid, gen, "k1", pb.CHECKPOINT_STATUS_INTERIM, uri=uri)
    ack = await agent.wait_ack(sid, "k1")
    assert ack.result == pb.CHECKPOINT_ACK_RESULT_RECORDED, ack

    started = time.monotonic()
    revoked = await enrollment.revoke_agent(h.controller.db, "doomed")
    assert revoked.errored == [sid]
    error = await agent.wait_error(timeout=10)
    ended_after = time.monotonic() - started
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "agent doomed was revoked at" in (error.details() or "")
    assert ended_after < 5, ended_after
    body = await _studio(h, sid)
    assert body["statusInfo"]["status"] == "errored"
    assert body["statusInfo"]["message"].startswith("agent doomed revoked at ")
    assert not h.controller.hub.is_connected("doomed")

    # Its reconnects are refused, and it renews nothing.
    again = make_agent("doomed")
    await again.connect(wait_welcome=False)
    error = await again.wait_error()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "was revoked at" in (error.details() or "")
    assert agent.credentials is not None
    async with grpc.aio.secure_channel(
        h.grpc_agents_target, agent.credentials.channel_credentials()
    ) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        _key, csr = new_key_and_csr(AgentIdentity("doomed", h.compute_env_id))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RenewCertificate(pb.RenewCertificateRequest(csr_pem=csr), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The session starts elsewhere from its last checkpoint.
    other = make_agent("healthy")
    await other.connect(inventory=[])
    mark = len(other.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    moved = await other.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    assert moved.generation == gen + 1
    assert moved.restore.uri == uri
    await other.report(sid, gen + 1, pb.SESSION_STATUS_RUNNING)
    await _wait_status(h, sid, "running")
    # ... or, once stopped or errored, is deleted.
    second = await _create(h, "second")
    await other.wait_desired(second, pb.DESIRED_STATUS_RUNNING)
    await other.report(second, 1, pb.SESSION_STATUS_ERRORED, message="tool failed")
    await _wait_status(h, second, "errored")
    await h.request("DELETE", f"/studios/{second}", expect=204)


async def test_a_revoked_agent_errors_what_it_ran_even_while_disconnected(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.db is not None
    agent = make_agent("away")
    await agent.connect(inventory=[])
    sid = await _create(h, "left running")
    await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await agent.report(sid, 1, pb.SESSION_STATUS_RUNNING)
    await _wait_status(h, sid, "running")
    await agent.close()
    await enrollment.revoke_agent(h.controller.db, "away")
    body = await _studio(h, sid)
    assert body["statusInfo"]["status"] == "errored"
    assert "agent away revoked at" in body["statusInfo"]["message"]
    await h.request("DELETE", f"/studios/{sid}", expect=204)


# ---------------------------------------------------------------- what an identity gets


async def test_a_capacity_claim_cannot_buy_placements(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    pib = 1 << 50
    small_host = pb.HostCapacity(
        cpus=2, memory_bytes=4 << 30, memory_available_bytes=2 << 30, disk_free_bytes=10 << 30
    )
    liar = make_agent("liar", memory_available=pib, enroll_capacity=small_host)
    honest = make_agent("honest", memory_available=16 << 30)
    await liar.connect(inventory=[])
    await honest.connect(inventory=[])
    row = await _agent_row(h, "liar")
    assert row.capacity_cap["memoryAvailableBytes"] == 4 << 30
    assert row.capacity["memoryAvailableBytes"] == 4 << 30
    assert row.capacity["cpus"] == 2

    # A later report claims more still: stored clamped, field by field.
    await liar.send(
        pb.ConnectRequest(
            capacity=pb.HostCapacity(
                cpus=4096, memory_bytes=pib, memory_available_bytes=pib, disk_free_bytes=pib
            )
        )
    )
    for _ in range(100):
        row = await _agent_row(h, "liar")
        if row.capacity.get("diskFreeBytes"):
            break
        await asyncio.sleep(0.05)
    assert row.capacity == {
        "cpus": 2,
        "memoryBytes": 4 << 30,
        "memoryAvailableBytes": 4 << 30,
        "diskFreeBytes": 10 << 30,
        "diskBudgetFreeBytes": 0,
    }
    _, body = await h.request("GET", "/agents", expect=200)
    shown = {a["id"]: a["capacity"]["memoryAvailableBytes"] for a in body["agents"]}
    assert shown == {"liar": 4 << 30, "honest": 16 << 30}

    sids = [await _create(h, f"placed {i}") for i in range(3)]
    for sid in sids:
        await honest.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        for sid in sids:
            studio = await session.get(Studio, sid)
            assert studio is not None and studio.agent_id == "honest"
    assert not any(s.session_id in sids for r in liar.responses for s in r.desired.sessions)


async def test_connect_keys_follow_the_enrolled_identity(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    master = bytes.fromhex((h.data_dir / "connect-key").read_text().strip())
    one, two = make_agent("one"), make_agent("two")
    await one.connect(inventory=[])
    await two.connect(inventory=[])
    assert one.welcome is not None and two.welcome is not None
    assert one.welcome.connect_token_key == derive_agent_key(master, "one")
    assert two.welcome.connect_token_key == derive_agent_key(master, "two")
    assert one.welcome.connect_token_key != two.welcome.connect_token_key
    # And they are the certificates' identities.
    for agent, name in ((one, "one"), (two, "two")):
        assert agent.credentials is not None
        cert = x509.load_pem_x509_certificate(agent.credentials.certificate_pem)
        assert identity_of(cert) == AgentIdentity(name, h.compute_env_id)


async def test_a_certificate_rotates_without_dropping_the_stream(tmp_path: Path) -> None:
    """Certificates of 20 s: renewed before the end, the old stream keeps working past
    the old certificate's end; the old certificate no longer connects, the new one does."""
    lifetime = 20.0
    h = ControllerHarness(tmp_path / "data", agent_cert_lifetime_seconds=lifetime)
    await h.start()
    agents: list[FakeAgent] = []
    try:
        agent = FakeAgent(
            h.grpc_target, h.agent_token, agent_id="rot", compute_env_id=h.compute_env_id
        )
        agents.append(agent)
        await agent.connect(inventory=[])
        old = agent.credentials
        assert old is not None
        assert old.not_after - time.time() == pytest.approx(lifetime, abs=3)
        sid = await _create(h, "long run")
        await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
        await agent.report(sid, 1, pb.SESSION_STATUS_RUNNING)
        await _wait_status(h, sid, "running")

        # Renew at two thirds of the lifetime, as an agent does.
        await asyncio.sleep(max(0.0, old.not_after - lifetime / 3 - time.time()))
        key, csr = new_key_and_csr(AgentIdentity("rot", h.compute_env_id))
        async with grpc.aio.secure_channel(
            h.grpc_agents_target, old.channel_credentials()
        ) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
            renewed = await stub.RenewCertificate(
                pb.RenewCertificateRequest(csr_pem=csr), timeout=10
            )
        new_cert = x509.load_pem_x509_certificate(renewed.certificate_pem)
        old_cert = x509.load_pem_x509_certificate(old.certificate_pem)
        assert identity_of(new_cert) == AgentIdentity("rot", h.compute_env_id)
        assert new_cert.serial_number != old_cert.serial_number
        assert renewed.not_after > old.not_after
        row = await _agent_row(h, "rot")
        assert row.cert_serial == format(new_cert.serial_number, "x")
        new = AgentCredentials(
            agent_id="rot",
            key_pem=key,
            certificate_pem=renewed.certificate_pem,
            ca_pem=old.ca_pem,
            not_after=renewed.not_after,
        )

        # Past the old certificate's end: the stream opened with it goes on.
        await asyncio.sleep(max(0.0, old.not_after - time.time() + 1.0))
        mark = len(agent.responses)
        await h.request("PUT", f"/studios/{sid}/stop", expect=200)
        await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
        await agent.report(sid, 1, pb.SESSION_STATUS_STOPPED)
        await _wait_status(h, sid, "stopped")
        assert agent.error is None

        stale = FakeAgent(
            h.grpc_target, h.agent_token, agent_id="rot", compute_env_id=h.compute_env_id,
            credentials=old,
        )  # fmt: skip
        agents.append(stale)
        await stale.connect(wait_welcome=False)
        assert (await stale.wait_error()).code() == grpc.StatusCode.UNAVAILABLE

        fresh = FakeAgent(
            h.grpc_target, h.agent_token, agent_id="rot", compute_env_id=h.compute_env_id,
            credentials=new,
        )  # fmt: skip
        agents.append(fresh)
        await fresh.connect(inventory=[])
        assert fresh.welcome is not None and fresh.welcome.agent_id == "rot"
        # It replaced the old stream, as a reconnect does.
        assert (await agent.wait_error()).code() == grpc.StatusCode.ABORTED
    finally:
        for a in agents:
            await a.close()
        await h.close()
