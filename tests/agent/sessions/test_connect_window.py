"""The agent's own check of the connect-version window (issue 15): a catalogue image whose
tag speaks a connect version this agent does not (newer, another major, or older than the
two minor versions before the current one) is refused at start with the reason, before
anything of the session is made. The controller refuses the same at start
(tests/controller/test_template_catalogue.py); this is what an agent does when a controller
(an older one, or an operator's catalogue edit) sends one all the same."""

from __future__ import annotations

from pathlib import Path

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from tests.agent_fixtures import controller_fixture, make_agent_config  # noqa: F401
from tests.fake_controller import FakeController, desired


@pytest.mark.parametrize(
    ("image", "why"),
    [
        ("studios/python-http:3.11-0.2", "newer than the current one"),
        ("localhost/studios/python-http:3.11-1.1", "another major version"),
    ],
)
async def test_an_image_of_an_unsupported_connect_version_is_refused(
    tmp_path: Path, controller: FakeController, image: str, why: str
) -> None:
    config = make_agent_config(tmp_path, controller)
    agent = Agent(config)
    await agent.start()
    try:
        controller.push(desired("c0a00001", image=image))
        obs = await controller.wait_status("c0a00001", pb.SESSION_STATUS_ERRORED)
        assert f"image {image} is unsupported by this agent" in obs.message, obs.message
        assert why in obs.message
        # Nothing was made: no volume, no tool.
        assert not obs.HasField("volume") and obs.tool_port == 0
        assert not (config.state_dir / "sessions" / "c0a00001" / "root").exists()
    finally:
        await agent.close()
