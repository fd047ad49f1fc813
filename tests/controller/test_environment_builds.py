"""Custom environments on the controller's side (issue 15): a studio's `condaEnvironment`
reaches its agent in the start's spec; the agent's `building` and `buildFailed` become the
studio's status, its progress and message; the build's outcome and a failed build's log are
read through `GET /studios/{sessionId}/build` (and `waveBuildUrl` points there); a build that
failed can be started again; stop and delete wait for a build like for a start.

The agent here is tests/fake_agent.py (a real gRPC client of the real controller): the
build itself is agent/images' (tests/agent/images/test_env_build.py, real podman) and the
whole path through a real agent is tests/agent/sessions/test_environment_sessions.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from studios.agent.v1 import agent_pb2 as pb

from tests.conftest import ControllerHarness
from tests.fake_agent import FakeAgent, observed

ENVIRONMENT = "dependencies:\n  - pip:\n      - six==1.16.0\n"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[ControllerHarness, FakeAgent]]:
    h = ControllerHarness(tmp_path / "data")
    await h.start()
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="agent-1", compute_env_id=h.compute_env_id
    )
    await agent.connect()
    try:
        yield h, agent
    finally:
        await agent.close()
        await h.close()


async def _studio(h: ControllerHarness, sid: str, status: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(200):
        _, body = await h.request("GET", f"/studios/{sid}", expect=200)
        if body["statusInfo"]["status"] == status:
            return body
    raise AssertionError(f"studio {sid} never became {status}: {body['statusInfo']}")


def _build_step(status: int, message: str) -> pb.ProgressStep:
    return pb.ProgressStep(name="building the environment", status=status, message=message)  # type: ignore[arg-type]


async def test_a_failed_build_is_build_failed_with_its_log(
    stack: tuple[ControllerHarness, FakeAgent],
) -> None:
    h, agent = stack
    _, created = await h.request(
        "POST",
        "/studios?autoStart=true",
        {
            "name": "env",
            "computeEnvId": h.compute_env_id,
            "dataStudioToolUrl": "studios/jupyterlab:4.6-0.1",
            "configuration": {"condaEnvironment": ENVIRONMENT},
        },
        expect=200,
    )
    sid = created["studio"]["sessionId"]
    assert created["studio"]["waveBuildUrl"].endswith(f"/studios/{sid}/build?workspaceId=1")
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    # The agent gets the file as the user gave it.
    assert desired.spec.conda_environment == ENVIRONMENT
    _, before = await h.request("GET", f"/studios/{sid}/build", expect=200)
    assert before == {"sessionId": sid, "status": "pending"}

    await agent.report(
        sid,
        desired.generation,
        pb.SESSION_STATUS_BUILDING,
        message="building the environment",
        progress=[_build_step(pb.STEP_STATUS_IN_PROGRESS, "Collecting six==1.16.0")],
    )
    building = await _studio(h, sid, "building")
    assert "Collecting six==1.16.0" in building["progress"][0]["message"]
    _, build = await h.request("GET", f"/studios/{sid}/build", expect=200)
    assert build["status"] == "building"
    assert "Collecting six==1.16.0" in build["progress"], build
    # A build is waited for like a start: no stop, no delete, no edit meanwhile.
    status, err = await h.request("PUT", f"/studios/{sid}/stop")
    assert status == 409 and "building" in err["message"], err
    status, err = await h.request("DELETE", f"/studios/{sid}")
    assert status == 409 and "building" in err["message"], err

    log = "# Containerfile\nFROM x\n" + "pip output\n" * 100 + "ERROR: No matching distribution"
    failure = observed(
        sid,
        desired.generation,
        pb.SESSION_STATUS_BUILD_FAILED,
        message="environment build failed: package 'nope' not found on PyPI",
        progress=[_build_step(pb.STEP_STATUS_ERRORED, "package 'nope' not found on PyPI")],
    )
    failure.build.CopyFrom(pb.EnvironmentBuild(env_hash="ab" * 32, failed=True, log=log))
    await agent.send(pb.ConnectRequest(session=failure))
    failed = await _studio(h, sid, "buildFailed")
    assert "package 'nope' not found on PyPI" in failed["statusInfo"]["message"]
    _, build = await h.request("GET", f"/studios/{sid}/build", expect=200)
    assert build["status"] == "failed" and build["log"] == log, build
    assert build["generation"] == desired.generation and build["environmentHash"] == "ab" * 32
    assert build["logTruncated"] is False and "image" not in build

    # Started again: a new generation, the same environment; this time the image was
    # built before (cached) and the studio goes on to run.
    seen = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    again = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=seen)
    assert again.generation == desired.generation + 1
    await agent.report(sid, again.generation, pb.SESSION_STATUS_STARTING, message="starting")
    ok = observed(sid, again.generation, pb.SESSION_STATUS_RUNNING, message="up", tool_port=1)
    ok.build.CopyFrom(
        pb.EnvironmentBuild(
            env_hash="ab" * 32, image="localhost/studios-env/jupyterlab:abab", cached=True
        )
    )
    await agent.send(pb.ConnectRequest(session=ok))
    await _studio(h, sid, "running")
    _, build = await h.request("GET", f"/studios/{sid}/build", expect=200)
    assert build["status"] == "succeeded" and build["cached"] is True, build
    assert build["image"] == "localhost/studios-env/jupyterlab:abab"
    assert "log" not in build


async def test_building_then_starting_then_running(
    stack: tuple[ControllerHarness, FakeAgent],
) -> None:
    h, agent = stack
    _, created = await h.request(
        "POST",
        "/studios?autoStart=true",
        {
            "name": "env2",
            "computeEnvId": h.compute_env_id,
            "configuration": {"condaEnvironment": ENVIRONMENT},
        },
        expect=200,
    )
    sid = created["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    g = desired.generation
    await agent.report(sid, g, pb.SESSION_STATUS_BUILDING, message="building the environment")
    await _studio(h, sid, "building")
    await agent.report(sid, g, pb.SESSION_STATUS_STARTING, message="starting")
    await _studio(h, sid, "starting")
    await agent.report(sid, g, pb.SESSION_STATUS_RUNNING, message="up", tool_port=1)
    await _studio(h, sid, "running")


async def test_no_environment_no_build(stack: tuple[ControllerHarness, FakeAgent]) -> None:
    h, _agent = stack
    _, created = await h.request(
        "POST", "/studios", {"name": "plain", "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = created["studio"]["sessionId"]
    assert "waveBuildUrl" not in created["studio"]
    status, err = await h.request("GET", f"/studios/{sid}/build")
    assert status == 404 and "no custom environment" in err["message"], err
    status, err = await h.request("GET", "/studios/zzzzzzzz/build")
    assert status == 404, err
