"""Enrollment at the controller, as an attacker on the network would try it.

Rogue clients built from the generated stubs talk to the in-process controller's
enrollment endpoint (server TLS): every token that should not admit is refused with
the reason (and never the secret), ids cannot be taken over, and the operator's
commands (`studio-controller agent token create|list|revoke`) do what they say.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import subprocess
import sys
from datetime import timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509
from sqlalchemy import select
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc

from controller import enrollment
from controller.bootstrap import open_ca
from controller.models import Agent, ComputeEnv, EnrollmentToken, Workspace
from studios_shared.agent_pki import (
    AgentIdentity,
    identity_of,
    new_key_and_csr,
    parse_join_token,
)
from tests.conftest import ControllerHarness
from tests.fake_agent import FakeAgent, enroll, fetch_ca


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _enroll_raw(
    h: ControllerHarness,
    *,
    token: str | None,
    agent_id: str = "",
    compute_env_id: str | None = None,
    csr_pem: bytes | None = None,
    target: str | None = None,
) -> pb.EnrollResponse:
    """One Enroll call as a rogue client makes it (no token: no authorization metadata)."""
    if csr_pem is None:
        _key, csr_pem = new_key_and_csr(AgentIdentity("rogue", "x"))
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    async with grpc.aio.secure_channel(
        target or h.grpc_target, grpc.ssl_channel_credentials(root_certificates=h.ca_pem)
    ) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        answer: pb.EnrollResponse = await stub.Enroll(
            pb.EnrollRequest(
                agent_id=agent_id,
                compute_env_id=h.compute_env_id if compute_env_id is None else compute_env_id,
                csr_pem=csr_pem,
                hostname="rogue-host",
            ),
            metadata=metadata,
            timeout=10,
        )
        return answer


async def _refused(h: ControllerHarness, **kwargs: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _enroll_raw(h, **kwargs)
    return info.value


def _secret_of(token: str) -> str:
    return parse_join_token(token).secret


async def _token(h: ControllerHarness, **kwargs: Any) -> str:
    assert h.controller is not None and h.controller.db is not None
    return await enrollment.create_token(
        h.controller.db, open_ca(h.data_dir), name=kwargs.pop("name", "test"), **kwargs
    )


async def _second_env(h: ControllerHarness, name: str = "second") -> str:
    _, body = await h.request(
        "POST",
        "/compute-envs",
        {
            "computeEnv": {
                "name": name,
                "platform": "studio-agent",
                "config": {"workDir": "file:///tmp/work2"},
            }
        },
        expect=200,
    )
    return str(body["computeEnvId"])


async def test_the_bootstrap_token_is_a_join_token_that_pins_the_ca(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    join = parse_join_token(h.agent_token)
    assert join.ca_hash == open_ca(h.data_dir).hash
    # What the agent sees at the enrollment endpoint is that CA, in the server's chain.
    assert await fetch_ca(h.grpc_target, join.ca_hash) == h.ca_pem
    pki = h.data_dir / "pki"
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((pki / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((h.data_dir / "agent-token").stat().st_mode) == 0o600

    answer = await _enroll_raw(h, token=h.agent_token, agent_id="good-1")
    cert = x509.load_pem_x509_certificate(answer.certificate_pem)
    assert identity_of(cert) == AgentIdentity("good-1", h.compute_env_id)
    assert answer.ca_certificate_pem == h.ca_pem
    assert answer.agent_id == "good-1"
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        agent = await session.get(Agent, "good-1")
        assert agent is not None and agent.enrolled_at is not None
        assert agent.cert_serial == format(cert.serial_number, "x")
        token = await session.scalar(
            select(EnrollmentToken).where(EnrollmentToken.name == "bootstrap")
        )
        assert token is not None and token.uses == 1 and token.workspace_id == 1


async def test_no_wrong_or_foreign_token_is_refused_with_the_reason(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    ca_hash = parse_join_token(h.agent_token).ca_hash

    error = await _refused(h, token=None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no join token" in (error.details() or "")

    guessed = f"sjt1.{ca_hash}.{secrets.token_urlsafe(32)}"
    error = await _refused(h, token=guessed)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not one this controller issued" in (error.details() or "")
    assert _secret_of(guessed) not in (error.details() or "")

    # The right secret, pinning another CA: another controller's token.
    foreign = f"sjt1.{'0' * 64}.{_secret_of(h.agent_token)}"
    error = await _refused(h, token=foreign)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "pins another CA" in (error.details() or "")
    assert _secret_of(h.agent_token) not in (error.details() or "")

    # A plain token (an older controller's format) is not a join token.
    error = await _refused(h, token=_secret_of(h.agent_token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not a join token" in (error.details() or "")
    assert _secret_of(h.agent_token) not in (error.details() or "")

    # The fake agent's own path: refused before any stream.
    bad = FakeAgent(h.grpc_target, guessed, agent_id="x", compute_env_id=h.compute_env_id)
    await bad.connect(wait_welcome=False)
    assert (await bad.wait_error()).code() == grpc.StatusCode.UNAUTHENTICATED
    await bad.close()


async def test_expired_used_up_and_revoked_tokens_are_refused(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    short = await _token(h, name="short", ttl=timedelta(seconds=1))
    await asyncio.sleep(1.2)
    error = await _refused(h, token=short, agent_id="late")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'short' expired at" in (error.details() or "")

    once = await _token(h, name="once", uses=1)
    await _enroll_raw(h, token=once, agent_id="first")
    error = await _refused(h, token=once, agent_id="second")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'once' is used up (1 of 1 enrollments)" in (error.details() or "")

    revoked = await _token(h, name="gone")
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        row = await session.scalar(select(EnrollmentToken).where(EnrollmentToken.name == "gone"))
        assert row is not None
        row.revoked_at = row.date_created
    error = await _refused(h, token=revoked, agent_id="third")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'gone' was revoked at" in (error.details() or "")
    # None of these enrolled anyone.
    async with h.controller.db.transaction() as session:
        ids = set((await session.scalars(select(Agent.agent_id))).all())
    assert ids == {"first"}


async def test_a_token_admits_only_its_compute_environment(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    other_env = await _second_env(h)
    bound = await _token(h, name="bound", compute_env_id=h.compute_env_id)
    error = await _refused(h, token=bound, agent_id="a", compute_env_id=other_env)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"bound to compute environment {h.compute_env_id}, not {other_env}" in (
        error.details() or ""
    )
    await _enroll_raw(h, token=bound, agent_id="a", compute_env_id=h.compute_env_id)

    # No such compute environment.
    error = await _refused(h, token=h.agent_token, agent_id="b", compute_env_id="f" * 16)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in (error.details() or "")

    # The bootstrap token admits compute environments of workspace 1 only.
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        session.add(Workspace(id=2, org_id=1, name="elsewhere"))
        await session.flush()
        session.add(
            ComputeEnv(
                id="e" * 16,
                workspace_id=2,
                name="theirs",
                platform="studio-agent",
                work_dir="file:///tmp/theirs",
            )
        )
    error = await _refused(h, token=h.agent_token, agent_id="c", compute_env_id="e" * 16)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "admits compute environments of workspace 1 only" in (error.details() or "")


async def test_ids_are_never_taken_over(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    await _enroll_raw(h, token=h.agent_token, agent_id="victim")
    # An attacker with a valid token cannot enroll under an enrolled id.
    error = await _refused(h, token=h.agent_token, agent_id="victim")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "agent victim is enrolled already" in (error.details() or "")
    # Nor under a revoked one.
    assert h.controller is not None and h.controller.db is not None
    await enrollment.revoke_agent(h.controller.db, "victim")
    error = await _refused(h, token=h.agent_token, agent_id="victim")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "was revoked at" in (error.details() or "")
    assert "never comes back" in (error.details() or "")
    # An empty id: the controller picks one.
    answer = await _enroll_raw(h, token=h.agent_token, agent_id="")
    assert len(answer.agent_id) == 32 and answer.agent_id != "victim"
    # Ids that could not name a certificate unambiguously.
    error = await _refused(h, token=h.agent_token, agent_id="a:compute-env:b")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_malformed_requests_and_wrong_listeners(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    error = await _refused(h, token=h.agent_token, agent_id="m", csr_pem=b"not a CSR")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a PEM CSR" in (error.details() or "")

    # The agent endpoint does not enroll (and asks for a client certificate first).
    creds = await enroll(
        h.grpc_target, h.agent_token, agent_id="lst", compute_env_id=h.compute_env_id
    )
    async with grpc.aio.secure_channel(h.grpc_agents_target, creds.channel_credentials()) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Enroll(
                pb.EnrollRequest(agent_id="z", compute_env_id=h.compute_env_id),
                metadata=(("authorization", f"Bearer {h.agent_token}"),),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        endpoints = await stub.Endpoints(pb.EndpointsRequest(), timeout=10)
    assert h.controller is not None
    assert endpoints.agent_endpoint == f":{h.controller.grpc_agents_port}"
    assert "127.0.0.1" in endpoints.server_names and "localhost" in endpoints.server_names

    # The enrollment endpoint does not serve the stream nor renewals, even with a
    # certificate in hand (it never asks for one).
    async with grpc.aio.secure_channel(h.grpc_target, creds.channel_credentials()) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _key, csr = new_key_and_csr(AgentIdentity("lst", h.compute_env_id))
            await stub.RenewCertificate(pb.RenewCertificateRequest(csr_pem=csr), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "connect on the agent endpoint" in (info.value.details() or "")
        call = stub.Connect(timeout=10)
        await call.write(pb.ConnectRequest(hello=pb.Hello(agent_id="lst")))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "connect on the agent endpoint" in (info.value.details() or "")


async def test_agent_token_create_list_and_revoke_commands(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    data = str(h.data_dir)
    made = await asyncio.to_thread(
        _cli, "agent", "token", "create", "--data-dir", data, "--compute-env",
        h.compute_env_id, "--ttl", "1h", "--uses", "2", "--name", "rack-7",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert parse_join_token(token).ca_hash == parse_join_token(h.agent_token).ca_hash
    missing = await asyncio.to_thread(
        _cli, "agent", "token", "create", "--data-dir", data, "--compute-env", "f" * 16
    )
    assert missing.returncode == 1 and "not found" in missing.stderr

    agent = FakeAgent(h.grpc_target, token, agent_id="rack-7-a", compute_env_id=h.compute_env_id)
    await agent.connect(inventory=[])
    try:
        listed = await asyncio.to_thread(_cli, "agent", "list", "--data-dir", data, "--json")
        assert listed.returncode == 0, listed.stderr
        [row] = [r for r in json.loads(listed.stdout) if r["id"] == "rack-7-a"]
        assert row["computeEnvId"] == h.compute_env_id and row["hostname"] == "fake-host"
        assert row["connected"] is True and row["revokedAt"] is None
        assert row["enrolledAt"] and row["certificateNotAfter"]
        table = await asyncio.to_thread(_cli, "agent", "list", "--data-dir", data)
        assert "rack-7-a" in table.stdout and "CERT EXPIRES" in table.stdout

        revoked = await asyncio.to_thread(_cli, "agent", "revoke", "rack-7-a", "--data-dir", data)
        assert revoked.returncode == 0, revoked.stderr
        assert "agent rack-7-a revoked at" in revoked.stdout
        # The running controller ends its stream at once.
        error = await agent.wait_error(timeout=10)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "agent rack-7-a was revoked at" in (error.details() or "")
        unknown = await asyncio.to_thread(_cli, "agent", "revoke", "nobody", "--data-dir", data)
        assert unknown.returncode == 1 and "not found" in unknown.stderr
    finally:
        await agent.close()


async def test_an_older_plain_agent_token_is_rewritten_as_a_join_token(
    controller_harness: ControllerHarness,
) -> None:
    """The upgrade of a data directory: DIR/agent-token held the bare secret."""
    h = controller_harness
    secret = _secret_of(h.agent_token)
    await h.close()
    (h.data_dir / "agent-token").write_text(secret)
    h.controller, h.http = None, None
    await h.start(with_compute_env=False)
    join = parse_join_token(h.agent_token)
    assert join.secret == secret and join.ca_hash == open_ca(h.data_dir).hash
    assert stat.S_IMODE((h.data_dir / "agent-token").stat().st_mode) == 0o600
    # Nothing else was rewritten, and the token still enrolls.
    await _enroll_raw(h, token=h.agent_token, agent_id="upgraded")
