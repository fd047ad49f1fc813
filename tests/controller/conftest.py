"""Fixtures of the controller tests: fake agents against the in-process controller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from tests.conftest import ControllerHarness
from tests.fake_agent import FakeAgent

AgentFactory = Callable[..., FakeAgent]


@pytest.fixture
async def make_agent(controller_harness: ControllerHarness) -> AsyncIterator[AgentFactory]:
    """FakeAgents that enroll with the harness's join token; closed at the end."""
    agents: list[FakeAgent] = []

    def factory(agent_id: str = "agent-1", **kwargs: object) -> FakeAgent:
        h = controller_harness
        kwargs.setdefault("compute_env_id", h.compute_env_id)
        agent = FakeAgent(h.grpc_target, h.agent_token, agent_id=agent_id, **kwargs)  # type: ignore[arg-type]
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        await agent.close()
