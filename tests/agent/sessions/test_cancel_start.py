"""A start cancelled while its custom environment builds (issue 16): the controller's
desired STOPPED reaches a real agent mid-build; the build's process group is killed, no
image is tagged, no container or volume is made, and the session is reported `stopped`
("start cancelled"). Real podman and the project's JupyterLab image, as in
tests/agent/sessions/test_environment_sessions.py; the controller is the fake one. A
cancel mid-restore, with real processes: tests/e2e/test_cancel_mid_restore.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import AgentConfig
from tests.agent.runtime.test_podman import _agent, _containers
from tests.agent.sessions.test_environment_sessions import (  # noqa: F401
    _env_desired,
    _env_reference,
    jconfig_fixture,
)
from tests.agent_fixtures import controller_fixture  # noqa: F401
from tests.fake_controller import FakeController

# An environment of its own (its image is removed first): the build runs for seconds.
ENVIRONMENT = "dependencies:\n  - pip:\n      - six==1.16.0\n"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_cancel_during_the_build_kills_it(
    controller: FakeController, jconfig: AgentConfig
) -> None:
    reference = _env_reference(ENVIRONMENT)
    subprocess.run(["podman", "rmi", "-f", reference], capture_output=True, check=False)
    sid = "ca0ce101"
    try:
        async with _agent(jconfig) as agent:
            assert agent.manager is not None
            controller.push(_env_desired(sid, ENVIRONMENT))
            await controller.wait_status(sid, pb.SESSION_STATUS_BUILDING, timeout=60)
            build_pid = 0
            for _ in range(600):
                h = agent.manager.get(sid)
                build_pid = h.build_pid if h is not None else 0
                if build_pid:
                    break
                await asyncio.sleep(0.05)
            assert build_pid and _group_alive(build_pid), "the build did not start"

            stop = _env_desired(sid, ENVIRONMENT)
            stop.status = pb.DESIRED_STATUS_STOPPED
            controller.push(stop)
            obs = await controller.wait_status(sid, pb.SESSION_STATUS_STOPPED, timeout=60)
            assert obs.message == "start cancelled", obs
            build = next(s for s in obs.progress if s.name == "building the environment")
            assert build.status == pb.STEP_STATUS_ERRORED and build.message == "start cancelled"
            assert not _group_alive(build_pid)
            exists = subprocess.run(["podman", "image", "exists", reference], check=False)
            assert exists.returncode != 0, f"{reference} was tagged"
            assert _containers(sid) == []
            h = agent.manager.get(sid)
            assert h is not None and h.status == "stopped" and h.volume is None
            assert not h.build_pid
            assert not (jconfig.state_dir / "sessions" / sid / "root").exists()
    finally:
        subprocess.run(["podman", "rmi", "-f", reference], capture_output=True, check=False)
