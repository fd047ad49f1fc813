"""The agent's side of enrollment, against the FakeController's two real TLS listeners:
enrolling once, the CA pin, refusals, revocation and the files in the state directory."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.daemon import Agent, AgentConfig
from agent.enrollment import PkiFiles
from agent.state import StateDir, atomic_write_bytes
from studios_shared.agent_pki import AgentIdentity, identity_of, new_key_and_csr
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    controller_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController

CLI = [sys.executable, "-m", "agent.cli"]


@pytest.fixture(name="rogue")
async def rogue_fixture() -> AsyncIterator[FakeController]:
    """A TLS gRPC server with a CA of its own: a man in the middle on --controller."""
    fc = FakeController()
    await fc.start()
    yield fc
    await fc.stop()


async def _started(config: AgentConfig) -> Agent:
    agent = Agent(config)
    await agent.start()
    return agent


async def _status(state_dir: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "status",
        "--state-dir",
        str(state_dir),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _error_of(agent: Agent) -> str:
    assert agent.link is not None
    return agent.link.last_error


async def test_enrolls_once_then_restarts_with_its_certificate(
    controller: FakeController, agent_config: AgentConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    state = StateDir(agent_config.state_dir)
    first = await _started(agent_config)
    try:
        await controller.wait_for(lambda: controller.messages("inventory"))
        assert len(controller.enrollments) == 1
        [enroll] = controller.enroll_calls()
        assert enroll["authorization"] == f"Bearer {controller.token}"
        # The token goes to Enroll only: never on the stream, nor to Endpoints.
        assert all(
            "authorization" not in metadata
            for method, metadata in controller.calls
            if method != "Enroll"
        )
        assert _mode(state.pki_dir) == 0o700
        assert _mode(state.agent_key_path) == 0o600
        assert _mode(state.agent_cert_path) == 0o644
        assert state.ca_cert_path.read_bytes() == controller.ca.certificate_pem
        assert not list(state.pki_dir.glob("*.new")) and not list(state.pki_dir.glob(".*"))
        cert = x509.load_pem_x509_certificate(state.agent_cert_path.read_bytes())
        identity = identity_of(cert)
        assert identity is not None
        assert identity.agent_id == first.agent_id == state.agent_id()
        assert identity.compute_env_id == agent_config.compute_env
        # The stream ran on that certificate (the controller read it from the TLS peer).
        assert controller.stream_certificates[0] == (identity, cert.serial_number)
        status = (await first._status())["controller"]
        assert status["enrolled"] and status["certificate"]["agentId"] == identity.agent_id
        assert status["agentEndpoint"] == f"127.0.0.1:{controller.agent_port}"
        assert status["address"] == controller.address
        cert_before = state.agent_cert_path.read_bytes()
        key_before = state.agent_key_path.read_bytes()
    finally:
        await first.close()

    # The token is not needed any more: the restarted agent uses its certificate.
    agent_config.token_file.write_text("")
    second = await _started(agent_config)
    try:
        await controller.wait_for(lambda: controller.streams >= 2)
        await controller.wait_for(lambda: second.link is not None and second.link.connected)
        assert len(controller.enrollments) == 1
        assert len(controller.enroll_calls()) == 1
        assert state.agent_cert_path.read_bytes() == cert_before
        assert state.agent_key_path.read_bytes() == key_before
        assert controller.stream_certificates[1] == controller.stream_certificates[0]
    finally:
        await second.close()
    # Neither the token's secret nor the key reached a log line.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "enrolled as agent" in logged
    assert controller.secret not in logged and "PRIVATE KEY" not in logged


async def test_enrolls_once_the_controller_is_up(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    controller = FakeController()
    config = make_agent_config(tmp_path, controller)
    config.controller = f"127.0.0.1:{port}"
    agent = await _started(config)
    try:
        await controller.wait_for(lambda: "cannot reach" in _error_of(agent), timeout=10)
        await controller.start(port)
        await controller.wait_for(lambda: agent.link is not None and agent.link.connected)
        assert len(controller.enrollments) == 1
    finally:
        await agent.close()
        await controller.stop()


async def test_a_man_in_the_middle_never_sees_the_token(
    tmp_path: Path, controller: FakeController, rogue: FakeController
) -> None:
    # The operator's token pins the real controller's CA; --controller reaches the rogue.
    config = make_agent_config(tmp_path, controller)
    config.controller = rogue.address
    agent = await _started(config)
    try:
        await controller.wait_for(lambda: "CA pin mismatch" in _error_of(agent), timeout=10)
        error = _error_of(agent)
        assert (
            f"CA pin mismatch: the controller at {rogue.address} presents CA sha256 "
            f"{rogue.ca.hash}, the join token pins {controller.ca.hash}"
        ) in error
        status = await _status(config.state_dir)
        assert "CA pin mismatch" in status["controller"]["lastError"]
        assert status["controller"]["enrolled"] is False
        await asyncio.sleep(0.5)  # a few more attempts
        # Only a TLS handshake reached the rogue: no RPC at all, so no token.
        assert rogue.calls == [] and rogue.enrollments == []
        assert not StateDir(config.state_dir).agent_key_path.exists()
        assert not controller.calls
    finally:
        await agent.close()


async def test_a_rogue_showing_the_real_ca_in_its_chain_never_sees_the_token(
    tmp_path: Path, controller: FakeController
) -> None:
    # The CA certificate is public: a rogue can present it, but cannot have it sign its own.
    rogue = FakeController(chain_extra=controller.ca.certificate_pem)
    await rogue.start()
    try:
        config = make_agent_config(tmp_path, controller)
        config.controller = rogue.address
        agent = await _started(config)
        try:
            await controller.wait_for(lambda: "not enrolling" in _error_of(agent), timeout=10)
            assert "presents the pinned CA but a certificate that CA did not sign" in (
                _error_of(agent)
            )
            await asyncio.sleep(0.5)
            assert rogue.calls == [] and rogue.enrollments == []
        finally:
            await agent.close()
    finally:
        await rogue.stop()


async def test_an_old_plain_token_is_refused_with_what_to_do(
    controller: FakeController, agent_config: AgentConfig
) -> None:
    agent_config.token_file.write_text("0123456789abcdef0123456789abcdef\n")
    agent = await _started(agent_config)
    try:
        await controller.wait_for(lambda: "not a join token" in _error_of(agent), timeout=10)
        error = _error_of(agent)
        assert str(agent_config.token_file) in error
        assert "take DIR/agent-token again" in error
        assert "studio-controller agent token create" in error
        # Nothing was sent anywhere, and the agent keeps running (and retrying).
        assert controller.calls == []
        assert agent.link is not None and not agent.link.connected
        # The operator fixes the token: the agent enrolls without a restart.
        agent_config.token_file.write_text(controller.token + "\n")
        await controller.wait_for(lambda: agent.link is not None and agent.link.connected)
        assert len(controller.enrollments) == 1
    finally:
        await agent.close()


async def test_a_certificate_that_does_not_name_the_host_dialled_is_named(
    tmp_path: Path,
) -> None:
    controller = FakeController(server_names=["controller.example"])
    await controller.start()
    try:
        config = make_agent_config(tmp_path, controller)
        agent = await _started(config)
        try:
            await controller.wait_for(lambda: "does not name" in _error_of(agent), timeout=10)
            assert (
                "the controller's certificate does not name 127.0.0.1; set --grpc-advertise "
                "on the controller"
            ) in _error_of(agent)
            # The pin matched, but the name did not: the token stayed here.
            assert controller.enroll_calls() == []
        finally:
            await agent.close()
    finally:
        await controller.stop()


async def test_an_enrolled_agent_names_a_server_certificate_without_its_host(
    controller: FakeController, agent_config: AgentConfig
) -> None:
    agent = await _started(agent_config)
    try:
        await controller.wait_for(lambda: agent.link is not None and agent.link.connected)
        port = controller.port
        await controller.stop()
        controller.server_names = ["controller.example"]
        await controller.start(port)
        await controller.wait_for(lambda: "does not name 127.0.0.1" in _error_of(agent))
        assert "--grpc-advertise" in _error_of(agent)
        assert len(controller.enrollments) == 1
    finally:
        await agent.close()


async def test_a_refused_token_is_retried_and_shown(
    controller: FakeController, agent_config: AgentConfig, caplog: pytest.LogCaptureFixture
) -> None:
    controller.token = controller.token.replace("0123456789", "9876543210")
    agent = await _started(agent_config)
    try:
        await controller.wait_for(lambda: controller.refused >= 2, timeout=10)
        status = await _status(agent_config.state_dir)
        error = status["controller"]["lastError"]
        assert "refused this agent's token (UNAUTHENTICATED: invalid join token)" in error
        assert f"check --token-file {agent_config.token_file}" in error
        assert not status["controller"]["connected"]
        assert any("invalid join token" in r.getMessage() for r in caplog.records)
    finally:
        await agent.close()


async def test_the_controller_may_assign_another_agent_id(
    tmp_path: Path,
) -> None:
    controller = FakeController(assign_agent_id="assigned0000000000000000000000001")
    await controller.start()
    try:
        config = make_agent_config(tmp_path, controller)
        agent = await _started(config)
        try:
            await controller.wait_for(lambda: agent.link is not None and agent.link.connected)
            [hello] = controller.messages("hello")
            assert hello.agent_id == "assigned0000000000000000000000001"
            assert agent.agent_id == "assigned0000000000000000000000001"
            assert StateDir(config.state_dir).agent_id() == "assigned0000000000000000000000001"
            assert agent.manager is not None
            assert agent.manager.runtime.owner == "assigned0000000000000000000000001"
        finally:
            await agent.close()
    finally:
        await controller.stop()


async def test_a_revoked_agent_keeps_trying_slowly_and_says_so(
    controller: FakeController, agent_config: AgentConfig
) -> None:
    agent = await _started(agent_config)
    try:
        await controller.wait_for(lambda: agent.link is not None and agent.link.connected)
        refused = controller.refused
        controller.revoke(agent.agent_id)
        await controller.wait_for(lambda: "revoked" in _error_of(agent), timeout=10)
        await controller.wait_for(lambda: controller.refused >= refused + 2, timeout=10)
        status = await _status(agent_config.state_dir)
        ctl = status["controller"]
        assert not ctl["connected"]
        assert f"agent {agent.agent_id} revoked at" in ctl["revoked"]
        assert "it is revoked" in ctl["lastError"]
        assert f"remove {agent_config.state_dir / 'pki'}" in ctl["lastError"]
        # Revocation is not undone by enrolling again with the token.
        assert len(controller.enrollments) == 1
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            "status",
            "--state-dir",
            str(agent_config.state_dir),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert "revoked (agent" in out.decode()
    finally:
        await agent.close()


async def test_an_expired_certificate_enrolls_again_with_the_token(
    tmp_path: Path,
) -> None:
    controller = FakeController(certificate_lifetime=4)
    await controller.start()
    try:
        config = make_agent_config(tmp_path, controller)
        agent = await _started(config)
        await controller.wait_for(lambda: agent.link is not None and agent.link.connected)
        await agent.close()
        cert = x509.load_pem_x509_certificate(
            StateDir(config.state_dir).agent_cert_path.read_bytes()
        )
        await asyncio.sleep(max(0.0, cert.not_valid_after_utc.timestamp() - time.time()) + 0.5)

        # Down too long, and the token file no longer holds a join token: a clear error.
        config.token_file.write_text("an-old-plain-token\n")
        agent = await _started(config)
        try:
            await controller.wait_for(lambda: "not a join token" in _error_of(agent))
            assert "this agent's certificate expired at" in _error_of(agent)
            # With the token back it enrolls again, under a new id (the controller never
            # enrolls an id twice) that it keeps from then on.
            config.token_file.write_text(controller.token + "\n")
            await controller.wait_for(lambda: agent.link is not None and agent.link.connected)
            old, new = (e.agent_id for e in controller.enrollments)
            assert new != old and new == agent.agent_id == StateDir(config.state_dir).agent_id()
            [_, hello] = controller.messages("hello")
            assert hello.agent_id == new
        finally:
            await agent.close()
    finally:
        await controller.stop()


# ---------------------------------------------------------------- the files


def _issued_pair(controller: FakeController, state: StateDir) -> tuple[bytes, bytes]:
    key_pem, csr_pem = new_key_and_csr(AgentIdentity(state.agent_id(), "env"))
    issued = controller.ca.sign_agent(
        csr_pem, AgentIdentity(state.agent_id(), "env"), timedelta(hours=1)
    )
    return key_pem, issued.certificate_pem


def _matches(state: StateDir) -> bool:
    key = serialization.load_pem_private_key(state.agent_key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(state.agent_cert_path.read_bytes())
    return key.public_key() == cert.public_key()


@pytest.mark.parametrize("crash", ["before the renames", "between the renames", "mid-write"])
def test_a_crash_while_replacing_key_and_certificate_never_mismatches(
    tmp_path: Path, crash: str
) -> None:
    controller = FakeController()
    state = StateDir(tmp_path / "state")
    state.ensure()
    pki = PkiFiles(state)
    pki.save_ca(controller.ca.certificate_pem)
    old_key, old_cert = _issued_pair(controller, state)
    pki.store(controller.ca.certificate_pem, old_key, old_cert)
    new_key, new_cert = _issued_pair(controller, state)
    key_new = state.pki_dir / "agent.key.new"
    cert_new = state.pki_dir / "agent.crt.new"
    # The states save_pair goes through, as a kill would leave them.
    atomic_write_bytes(key_new, new_key, mode=0o600)
    if crash != "mid-write":
        atomic_write_bytes(cert_new, new_cert)
        if crash == "between the renames":
            os.replace(key_new, state.agent_key_path)
    if crash == "between the renames":
        assert not _matches(state)  # the new key beside the old certificate
    creds = pki.load()
    assert creds is not None and _matches(state)
    expected = old_cert if crash == "mid-write" else new_cert
    assert creds.cert_pem == expected == state.agent_cert_path.read_bytes()
    assert not key_new.exists() and not cert_new.exists()
    assert _mode(state.agent_key_path) == 0o600


def test_the_renewal_rule_ignores_the_backdated_not_before(tmp_path: Path) -> None:
    controller = FakeController()
    state = StateDir(tmp_path / "state")
    state.ensure()
    pki = PkiFiles(state)
    pki.save_ca(controller.ca.certificate_pem)
    key_pem, csr_pem = new_key_and_csr(AgentIdentity("a1", "env"))
    issued = controller.ca.sign_agent(csr_pem, AgentIdentity("a1", "env"), timedelta(seconds=60))
    creds = pki.store(controller.ca.certificate_pem, key_pem, issued.certificate_pem)
    # notBefore is five minutes back; the lifetime counted is the minute from now.
    left = (creds.renew_at - datetime.now(UTC)).total_seconds()
    assert 38 < left <= 40
    assert not creds.renewal_due()
    again = pki.load()
    assert again is not None and abs((again.renew_at - creds.renew_at).total_seconds()) < 1
