"""Certificate rotation: a short-lived certificate is renewed on the agent endpoint and
the stream reconnects with the new one, while the sessions the agent runs go on."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.state import StateDir
from tests.agent_fixtures import kill_leftover_tools, make_agent_config
from tests.fake_controller import FakeController, desired

RUNNING = pb.SESSION_STATUS_RUNNING


@pytest.fixture(name="short_lived")
async def short_lived_fixture() -> AsyncIterator[FakeController]:
    """A controller whose agent certificates live six seconds (renewed after four)."""
    fc = FakeController(certificate_lifetime=6)
    await fc.start()
    yield fc
    await fc.stop()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _key_matches_certificate(state: StateDir) -> bool:
    key = serialization.load_pem_private_key(state.agent_key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(state.agent_cert_path.read_bytes())
    return key.public_key() == cert.public_key()


async def test_a_short_lived_certificate_rotates_while_the_session_runs(
    tmp_path: Path, short_lived: FakeController
) -> None:
    controller = short_lived
    config = make_agent_config(tmp_path, controller)
    state = StateDir(config.state_dir)
    agent = Agent(config)
    await agent.start()
    try:
        assert agent.manager is not None and agent.link is not None
        manager, link = agent.manager, agent.link
        controller.push(desired("r0ta0001"))
        obs = await controller.wait_status("r0ta0001", RUNNING)
        handle = manager.get("r0ta0001")
        assert handle is not None
        pid, port = handle.pid, obs.tool_port
        first_key = state.agent_key_path.read_bytes()

        # Two rotations (about 4 s and 8 s in), watched every 0.1 s: the session stays
        # running on the same tool all along, whatever the stream does.
        deadline = time.monotonic() + 30
        while len(controller.renewals) < 2 or controller.streams < 3 or not link.connected:
            assert time.monotonic() < deadline, "no two rotations within 30 s"
            current = manager.get("r0ta0001")
            assert current is not None and current.status == "running" and current.pid == pid
            await asyncio.sleep(0.1)
        assert psutil.pid_exists(pid) and _answers(port)
        assert agent.manager is manager  # the session manager was never restarted

        # Each stream ran on a certificate of its own, the agent's identity throughout.
        certificates = controller.stream_certificates
        assert len({serial for _, serial in certificates}) == len(certificates) >= 3
        assert {identity.agent_id for identity, _ in certificates} == {agent.agent_id}
        assert len(controller.enrollments) == 1
        # The controller heard RUNNING only, from the first RUNNING on (reconnects included).
        statuses = [o.status for o in controller.observed("r0ta0001")]
        assert set(statuses[statuses.index(RUNNING) :]) == {RUNNING}

        # On disk: a new key, 0600, that matches the new certificate; no half-done files.
        assert state.agent_key_path.read_bytes() != first_key
        assert stat.S_IMODE(state.agent_key_path.stat().st_mode) == 0o600
        assert _key_matches_certificate(state)
        assert not list(state.pki_dir.glob("*.new"))
        status = link.status()
        assert status["certificate"]["renewals"] >= 2
        assert status["certificate"]["serial"] == format(certificates[-1][1], "x")
    finally:
        await agent.close()
        kill_leftover_tools(config.state_dir)


async def test_a_certificate_due_while_the_agent_was_down_is_renewed_before_the_stream(
    tmp_path: Path,
) -> None:
    controller = FakeController(certificate_lifetime=120)
    await controller.start()
    try:
        config = make_agent_config(tmp_path, controller)
        agent = Agent(config)
        await agent.start()
        await controller.wait_for(lambda: agent.link is not None and agent.link.connected)
        await agent.close()
        # As if it had been received long ago (the lifetime counts from the file's mtime,
        # clamped to the certificate's notBefore, five minutes back): less than a third of
        # that lifetime is left, though the certificate is still valid.
        cert_path = StateDir(config.state_dir).agent_cert_path
        then = time.time() - 600
        os.utime(cert_path, (then, then))
        agent = Agent(config)
        await agent.start()
        try:
            await controller.wait_for(lambda: len(controller.stream_certificates) >= 2)
            assert len(controller.renewals) == 1 and len(controller.enrollments) == 1
            (_, old), (_, new) = controller.stream_certificates[:2]
            assert old != new
            assert agent.link is not None and agent.link.credentials is not None
            assert not agent.link.credentials.renewal_due()
        finally:
            await agent.close()
    finally:
        await controller.stop()
