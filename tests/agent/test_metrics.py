"""The agent's Prometheus metrics: the figures follow what the agent really does
(sessions, proxied bytes, checkpoints, volume growth, the controller stream), and only
the `--metrics` listener serves them, never the connect proxy."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent, AgentConfig
from agent.volumes import GIB
from studios_shared.connect_token import sign_connect_token
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    agent_fixture,
    controller_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController, desired

ECHO = "abcdef02"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def _scrape(agent: Agent) -> Samples:
    return _parse((await agent.metrics.scrape()).decode())


def _value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported: {sorted(k for k in samples)}"
    return samples[key]


def _checkpoints(controller: FakeController, session_id: str) -> list[pb.CheckpointEvent]:
    return [c for c in controller.messages("checkpoint") if c.session_id == session_id]


@pytest.fixture
async def echo(controller: FakeController, agent: Agent) -> Agent:
    controller.push(desired(ECHO, image="test/echo:1"))
    await controller.wait_status(ECHO, pb.SESSION_STATUS_RUNNING)
    return agent


async def _proxied_echo(agent: Agent, key: bytes, body: bytes) -> bytes:
    """POST `body` to the echo tool through the proxy, signed in as a browser is."""
    host = f"{ECHO}.localhost:{agent.proxy_port}"
    base = f"http://127.0.0.1:{agent.proxy_port}"
    token = sign_connect_token(key, session_id=ECHO, user_id=7, user_name="alice")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(
            f"{base}/?studio-token={token}", headers={"Host": host}, allow_redirects=False
        ) as resp:
            assert resp.status == 302, await resp.text()
            cookie = resp.cookies["studios-connect"].value
        async with http.post(
            f"{base}/echo",
            data=body,
            headers={"Host": host, "Cookie": f"studios-connect={cookie}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()


async def test_sessions_proxy_and_controller_stream(
    echo: Agent, controller: FakeController
) -> None:
    before = await _scrape(echo)
    assert _value(before, "studios_agent_sessions", status="running") == 1
    assert _value(before, "studios_agent_sessions", status="stopped") == 0
    assert _value(before, "studios_agent_controller_connected") == 1
    assert _value(before, "studios_agent_controller_connects_total") >= 1
    body = os.urandom(300_000)
    assert await _proxied_echo(echo, controller.key, body) == body
    after = await _scrape(echo)
    received = _value(after, "studios_agent_proxy_bytes_total", direction="from_clients") - _value(
        before, "studios_agent_proxy_bytes_total", direction="from_clients"
    )
    sent = _value(after, "studios_agent_proxy_bytes_total", direction="to_clients") - _value(
        before, "studios_agent_proxy_bytes_total", direction="to_clients"
    )
    # The body each way, plus heads (the sign-in's redirect is the proxy's own answer).
    assert len(body) <= received < len(body) + 8192
    assert len(body) <= sent < len(body) + 8192
    connections = _value(after, "studios_agent_proxy_connections_total") - _value(
        before, "studios_agent_proxy_connections_total"
    )
    assert connections >= 1
    # The session closed its connection: none left open.
    for _ in range(50):
        if _value(await _scrape(echo), "studios_agent_proxy_connections_open") == 0:
            break
        await asyncio.sleep(0.1)
    assert _value(await _scrape(echo), "studios_agent_proxy_connections_open") == 0


async def test_checkpoint_durations_and_bytes(echo: Agent, controller: FakeController) -> None:
    # The first interim checkpoint is written as soon as the tool answers.
    await controller.wait_for(lambda: _checkpoints(controller, ECHO))
    samples = await _scrape(echo)
    saves = _value(
        samples, "studios_agent_checkpoint_duration_seconds_count", operation="save", outcome="ok"
    )
    assert saves >= 1
    saved_bytes = _value(samples, "studios_agent_checkpoint_saved_bytes_total")
    assert saved_bytes == sum(c.size_bytes for c in _checkpoints(controller, ECHO))

    controller.push(desired(ECHO, pb.DESIRED_STATUS_STOPPED, image="test/echo:1"))
    await controller.wait_status(ECHO, pb.SESSION_STATUS_STOPPED)
    final = _checkpoints(controller, ECHO)[-1]
    assert final.status == pb.CHECKPOINT_STATUS_FINALIZED
    # Generation 2 restores the final checkpoint: a restore, timed.
    controller.push(desired(ECHO, generation=2, image="test/echo:1", restore_uri=final.uri))
    await controller.wait_status(ECHO, pb.SESSION_STATUS_RUNNING)
    samples = await _scrape(echo)
    assert (
        _value(
            samples,
            "studios_agent_checkpoint_duration_seconds_count",
            operation="save",
            outcome="ok",
        )
        >= saves + 1
    )
    assert (
        _value(
            samples,
            "studios_agent_checkpoint_duration_seconds_count",
            operation="restore",
            outcome="ok",
        )
        == 1
    )
    assert _value(samples, "studios_agent_checkpoint_saved_bytes_total") >= saved_bytes


async def test_volume_growth_and_budget(echo: Agent) -> None:
    assert echo.manager is not None
    before = await _scrape(echo)
    size = _value(before, "studios_agent_volume_size_bytes")
    assert size == 2 * GIB
    assert _value(before, "studios_agent_disk_budget_bytes") == 30 * GIB
    assert _value(before, "studios_agent_disk_budget_free_bytes") == 28 * GIB
    assert _value(before, "studios_agent_volume_growths_total") == 0
    # Grow when less than 3 GiB are free: the 2 GiB volume grows once, by 2 GiB, at the
    # next accounting tick (every 0.5 s here).
    echo.manager.settings.grow_below_free_bytes = 3 * GIB
    for _ in range(100):
        samples = await _scrape(echo)
        if _value(samples, "studios_agent_volume_growths_total") >= 1:
            break
        await asyncio.sleep(0.1)
    assert _value(samples, "studios_agent_volume_growths_total") == 1
    assert _value(samples, "studios_agent_volume_grow_duration_seconds_count") == 1
    assert _value(samples, "studios_agent_volume_size_bytes") == 4 * GIB
    assert _value(samples, "studios_agent_disk_budget_free_bytes") == 26 * GIB


@pytest.fixture
async def agent_with_metrics(tmp_path: Path, controller: FakeController) -> AsyncIterator[Agent]:
    config: AgentConfig = make_agent_config(tmp_path, controller, metrics_port=0)
    agent = Agent(config)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.close()
        kill_leftover_tools(config.state_dir)


async def test_metrics_listener_is_separate_from_the_proxy(agent_with_metrics: Agent) -> None:
    server = agent_with_metrics.metrics_server
    assert server is not None and server.port != agent_with_metrics.proxy_port
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
            assert resp.status == 200
            samples = _parse(await resp.text())
        assert "studios_agent_sessions" in {name for name, _ in samples}
        # The proxy's port serves browsers only: no metrics, whatever the host.
        for host in (f"127.0.0.1:{agent_with_metrics.proxy_port}", "localhost"):
            async with http.get(
                f"http://127.0.0.1:{agent_with_metrics.proxy_port}/metrics",
                headers={"Host": host},
            ) as resp:
                assert resp.status != 200
                assert "studios_agent" not in await resp.text()


async def test_no_metrics_listener_by_default(agent: Agent) -> None:
    assert agent.config.metrics_port is None
    assert agent.metrics_server is None
    # Still counted: a later listener, or a test, reads the same registry.
    assert _value(await _scrape(agent), "studios_agent_controller_connected") == 1
