"""What the tests of the project's studio images (images/, issue 15) share: an agent
config for the podman runtime that needs the image built, a session of a catalogue
template started and stopped through the fake controller, and the forged headers a
request straight to the tool's published port carries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import AgentConfig
from agent.runtime.tool_guard import PROXY_SECRET_HEADER
from agent.sessions.handle import SessionHandle
from tests.agent.runtime.test_podman import _cleanup, _config, _containers, _podman, _require_podman
from tests.agent.runtime.test_tool_secret import FORGED, _handle
from tests.fake_controller import FakeController, desired
from tests.integration import require

__all__ = ["forged_headers", "image_agent_config", "start_image_session", "stop_image_session"]


@contextmanager
def image_agent_config(
    tmp_path: Path, controller: FakeController, built: str, definition: str
) -> Iterator[AgentConfig]:
    """A podman agent's config; the test is skipped (fails in CI) without the image."""
    _require_podman()
    require(
        _podman("image", "exists", built).returncode == 0,
        f"{built} is not built (studio-agent images build {definition}; scripts/podman-setup)",
    )
    # The tools take several seconds to start, more on a busy test host.
    config = _config(tmp_path, controller, start_timeout_seconds=120.0)
    try:
        yield config
    finally:
        _cleanup(config.state_dir)


async def start_image_session(
    controller: FakeController, config: AgentConfig, sid: str, template: str, tool: str
) -> SessionHandle:
    """Start the catalogue's `template` (as the controller names it) and wait until its
    tool answers; the agent's handle of it."""
    d = desired(sid, image=template)
    d.spec.tool = tool
    controller.push(d)
    obs = await controller.wait_status(sid, pb.SESSION_STATUS_RUNNING, timeout=150)
    # What users see names no port (only operators see it, in studio-agent).
    assert obs.runtime == "podman" and obs.message == f"{tool} is answering", obs.message
    return _handle(config, sid)


async def stop_image_session(controller: FakeController, sid: str) -> None:
    controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED))
    await controller.wait_status(sid, pb.SESSION_STATUS_STOPPED, timeout=90)
    assert _containers(sid) == []


def forged_headers(h: SessionHandle) -> tuple[dict[str, str], dict[str, str]]:
    """What a process that reaches the published port sends: a forged user without the
    proxy's secret, and with a wrong one of the right length."""
    return FORGED, {**FORGED, PROXY_SECRET_HEADER: "x" * len(h.proxy_secret)}
