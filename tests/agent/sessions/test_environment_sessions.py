"""Custom environments in a real agent's sessions (issue 15): a studio of the JupyterLab
image with a conda environment file (a `pip:` list) is `building`, then `starting`, then
runs the derived image, and its kernel imports the package; a second studio with the same
environment (a clone) reuses the image without building; a file that is not YAML, or a
package PyPI does not have, ends the start as `buildFailed` naming it, with the log
reported and nothing of the session made (no volume, no container); the local runtime
refuses a custom environment with the reason.

Real podman, the project's JupyterLab image, a real agent; the controller is the fake one
(the controller's side: tests/controller/test_environment_builds.py). The agent killed
mid-build: tests/agent/sessions/test_crash_at_every_step.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import AgentConfig
from agent.images.environment import environment_hash, environment_reference, parse_environment
from tests.agent.runtime.image_sessions import image_agent_config, stop_image_session
from tests.agent.runtime.test_podman import _agent, _containers
from tests.agent.runtime.test_tool_secret import FORGED, _client, _cookie, _execute, _through_proxy
from tests.agent_fixtures import controller_fixture, make_agent_config  # noqa: F401
from tests.fake_controller import FakeController, desired

TEMPLATE = "studios/jupyterlab:4.6-0.1"
BUILT = "localhost/studios/jupyterlab:4.6-0.1"
# A small pure-Python wheel: the build takes seconds, not minutes.
ENVIRONMENT = """\
name: notes
# Comments and order do not change the build (the cache key is the content).
dependencies:
  - python>=3.10
  - pip
  - pip:
      - tomli-w==1.0.0
"""
CLONE_ENVIRONMENT = """\
dependencies:
  - pip:
      - tomli-w==1.0.0
  - pip
  - python>=3.10
"""
BUILD_TIMEOUT = 600.0


def _image_id(reference: str) -> str:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", reference],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _env_reference(text: str) -> str:
    return environment_reference(BUILT, environment_hash(parse_environment(text), _image_id(BUILT)))


@pytest.fixture(name="jconfig")
def jconfig_fixture(tmp_path: Path, controller: FakeController) -> Iterator[AgentConfig]:
    with image_agent_config(tmp_path, controller, BUILT, "jupyterlab") as config:
        yield config


def _env_desired(sid: str, text: str, generation: int = 1) -> pb.SessionDesired:
    d = desired(sid, image=TEMPLATE, generation=generation)
    d.spec.tool = "jupyter"
    d.spec.conda_environment = text
    return d


async def test_environment_builds_once_and_the_kernel_imports_it(
    controller: FakeController, jconfig: AgentConfig
) -> None:
    reference = _env_reference(ENVIRONMENT)
    # This run builds: an image an earlier run left is removed first.
    subprocess.run(["podman", "rmi", "-f", reference], capture_output=True, check=False)
    sid, clone = "e1a00001", "e1a00002"
    try:
        async with _agent(jconfig) as agent, _client() as http:
            controller.push(_env_desired(sid, ENVIRONMENT))
            await controller.wait_status(sid, pb.SESSION_STATUS_BUILDING, timeout=60)
            obs = await controller.wait_status(
                sid, pb.SESSION_STATUS_RUNNING, timeout=BUILD_TIMEOUT
            )
            assert obs.build.image == reference and not obs.build.cached, obs.build
            assert obs.build.seconds > 0 and not obs.build.failed and not obs.build.log
            assert obs.progress[0].name == "building the environment"
            assert obs.progress[0].status == pb.STEP_STATUS_SUCCEEDED

            # The kernel imports the package the environment added.
            xsrf = {"Cookie": FORGED["Cookie"], "X-XSRFToken": FORGED["X-XSRFToken"]}
            status, kernel = await _through_proxy(
                http, agent, controller.key, sid, "POST", "/api/kernels", xsrf
            )
            assert status == 201, kernel
            ws = await http.ws_connect(
                f"http://127.0.0.1:{agent.proxy_port}/api/kernels/"
                f"{json.loads(kernel)['id']}/channels",
                headers={
                    "Host": f"{sid}.localhost:{agent.proxy_port}",
                    "Cookie": f"studios-connect={_cookie(controller.key, sid)}",
                },
            )
            try:
                out = await _execute(ws, "import tomli_w; print(tomli_w.dumps({'a': 1}))")
                assert out.strip() == "a = 1", out
            finally:
                await ws.close()
            await stop_image_session(controller, sid)

            # The same environment, written differently, on another studio: built before.
            controller.push(_env_desired(clone, CLONE_ENVIRONMENT))
            obs = await controller.wait_status(clone, pb.SESSION_STATUS_RUNNING, timeout=180)
            assert obs.build.cached and obs.build.image == reference, obs.build
            await stop_image_session(controller, clone)
    finally:
        subprocess.run(["podman", "rmi", "-f", reference], capture_output=True, check=False)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("dependencies: [pip: {oops\n", "YAML"),
        (
            "dependencies:\n  - pip:\n      - studios-no-such-package-4f1c==1.0\n",
            "studios-no-such-package-4f1c",
        ),
    ],
    ids=["not-yaml", "no-such-package"],
)
async def test_a_bad_environment_fails_the_build_and_changes_nothing(
    controller: FakeController, jconfig: AgentConfig, text: str, named: str
) -> None:
    sid = "e1a00003"
    async with _agent(jconfig):
        controller.push(_env_desired(sid, text))
        obs = await controller.wait_status(
            sid, pb.SESSION_STATUS_BUILD_FAILED, timeout=BUILD_TIMEOUT
        )
        assert named in obs.message and obs.message.startswith("environment build failed"), (
            obs.message
        )
        assert obs.build.failed and not obs.build.image
        step = obs.progress[0]
        assert step.name == "building the environment" and step.status == pb.STEP_STATUS_ERRORED
        # Nothing else of the session was made: no volume, no container, no later step.
        assert not obs.HasField("volume")
        assert [s.status for s in obs.progress[1:]] == [pb.STEP_STATUS_PENDING] * (
            len(obs.progress) - 1
        )
        assert _containers(sid) == []
        assert not (jconfig.state_dir / "sessions" / sid / "root").exists()
        # An ended generation: the agent does not build it again by itself.
        controller.push(_env_desired(sid, text))
        assert controller.latest(sid).status == pb.SESSION_STATUS_BUILD_FAILED  # type: ignore[union-attr]


async def test_the_local_runtime_refuses_a_custom_environment(
    tmp_path: Path, controller: FakeController
) -> None:
    config = make_agent_config(tmp_path, controller)
    sid = "e1a00004"
    async with _agent(config):
        d = desired(sid)
        d.spec.conda_environment = ENVIRONMENT
        controller.push(d)
        obs = await controller.wait_status(sid, pb.SESSION_STATUS_BUILD_FAILED, timeout=30)
        assert "need the podman runtime" in obs.message, obs.message
