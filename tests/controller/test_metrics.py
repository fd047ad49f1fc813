"""The controller's Prometheus metrics: the figures are the real ones, and only the
operator's listener serves them (never the public API)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from studios.agent.v1 import agent_pb2 as pb

from controller.app import Controller
from controller.config import ControllerConfig
from controller.metrics import ControllerMetrics
from tests.conftest import ControllerHarness
from tests.controller.conftest import AgentFactory
from tests.e2e_harness import ControllerProcess, free_port
from tests.integration import require

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def _scrape(h: ControllerHarness) -> Samples:
    assert h.controller is not None and h.controller.metrics is not None
    return _parse((await h.controller.metrics.scrape()).decode())


def _value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported: {sorted(k for k in samples)}"
    return samples[key]


async def _create(h: ControllerHarness, name: str) -> str:
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": name, "computeEnvId": h.compute_env_id},
        expect=200,
    )
    return str(body["studio"]["sessionId"])


async def _wait_status(h: ControllerHarness, sid: str, status: str) -> None:
    for _ in range(200):
        _, body = await h.request("GET", f"/studios/{sid}", expect=200)
        if body["statusInfo"]["status"] == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"studio {sid} not {status}: {body['statusInfo']}")


async def test_studios_by_status_counted_from_the_database(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    before = await _scrape(h)
    assert _value(before, "studios_controller_studios", status="stopped") == 0
    assert _value(before, "studios_controller_database_up") == 1
    first = await _create(h, "one")
    await _create(h, "two")
    samples = await _scrape(h)
    assert _value(samples, "studios_controller_studios", status="stopped") == 2
    assert _value(samples, "studios_controller_studios", status="running") == 0
    # A deleted studio is no longer counted.
    await h.request("DELETE", f"/studios/{first}", expect=204)
    samples = await _scrape(h)
    assert _value(samples, "studios_controller_studios", status="stopped") == 1


async def test_request_latency_by_route_pattern_not_by_path(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    ids = [await _create(h, "a"), await _create(h, "b")]
    for sid in ids:
        await h.request("GET", f"/studios/{sid}", expect=200)
    await h.request("GET", "/studios/zzzzzzzz", expect=404)
    assert h.http is not None
    async with h.http.get(f"{h.url}/no/such/route") as resp:
        assert resp.status in (401, 404)
    samples = await _scrape(h)
    route = "/studios/{sessionId}"
    count = _value(
        samples, "studios_controller_http_request_duration_seconds_count", method="GET", route=route
    )
    assert count == 3
    assert (
        _value(
            samples,
            "studios_controller_http_responses_total",
            method="GET",
            route=route,
            code="404",
        )
        == 1
    )
    assert (
        _value(
            samples,
            "studios_controller_http_responses_total",
            method="GET",
            route=route,
            code="200",
        )
        == 2
    )
    assert (
        _value(
            samples,
            "studios_controller_http_request_duration_seconds_count",
            method="GET",
            route="unmatched",
        )
        == 1
    )
    # No series names a studio id: they would grow with every studio.
    assert not [k for k in samples if any(sid in v for _, v in k[1] for sid in ids)]


async def test_start_and_stop_latency_agent_streams_and_checkpoints(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    assert _value(await _scrape(h), "studios_controller_agent_streams") == 0
    agent = make_agent()
    await agent.connect()
    assert _value(await _scrape(h), "studios_controller_agent_streams") == 1
    _, body = await h.request(
        "POST", "/studios", {"name": "timed", "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = body["studio"]["sessionId"]
    await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await asyncio.sleep(0.3)
    await agent.report(sid, 1, pb.SESSION_STATUS_RUNNING, tool_port=41000, root_dir="/r")
    await _wait_status(h, sid, "running")
    samples = await _scrape(h)
    assert _value(samples, "studios_controller_start_duration_seconds_count") == 1
    start_seconds = _value(samples, "studios_controller_start_duration_seconds_sum")
    assert 0.3 <= start_seconds < 30
    assert _value(samples, "studios_controller_studios", status="running") == 1
    assert (
        _value(
            samples,
            "studios_controller_status_transitions_total",
            from_status="starting",
            to_status="running",
        )
        == 1
    )

    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED)
    await agent.report(sid, 1, pb.SESSION_STATUS_STOPPING)
    await asyncio.sleep(0.2)
    await agent.checkpoint(sid, 1, "final-1", size=5000)
    await agent.wait_ack(sid, "final-1")
    await agent.report(sid, 1, pb.SESSION_STATUS_STOPPED)
    await _wait_status(h, sid, "stopped")
    samples = await _scrape(h)
    assert _value(samples, "studios_controller_stop_duration_seconds_count") == 1
    assert _value(samples, "studios_controller_stop_duration_seconds_sum") >= 0.2
    assert _value(samples, "studios_controller_start_duration_seconds_count") == 1
    assert _value(samples, "studios_controller_checkpoints", status="finalized") == 1
    assert _value(samples, "studios_controller_checkpoint_size_bytes", status="finalized") == 5000
    await agent.close()
    for _ in range(100):
        if _value(await _scrape(h), "studios_controller_agent_streams") == 0:
            break
        await asyncio.sleep(0.05)
    assert _value(await _scrape(h), "studios_controller_agent_streams") == 0


async def test_database_pool_figures(controller_harness: ControllerHarness) -> None:
    samples = await _scrape(controller_harness)
    assert _value(samples, "studios_controller_db_pool_size") >= 1
    out = _value(samples, "studios_controller_db_pool_connections", state="checked_out")
    idle = _value(samples, "studios_controller_db_pool_connections", state="checked_in")
    # At least the scrape's own connection is open, in use by a background job or idle.
    assert out >= 0 and idle >= 0 and out + idle >= 1


async def test_two_controllers_in_one_process_count_their_own(
    controller_harness: ControllerHarness, tmp_path: Path
) -> None:
    other = ControllerHarness(tmp_path / "other")
    await other.start()
    try:
        sid = await _create(controller_harness, "mine")
        # stopped -> starting, committed by this controller (no agent: it stays starting).
        await controller_harness.request("PUT", f"/studios/{sid}/start", {}, expect=200)
        mine, theirs = await _scrape(controller_harness), await _scrape(other)
        assert _value(mine, "studios_controller_studios", status="starting") == 1
        assert _value(theirs, "studios_controller_studios", status="starting") == 0
        moved = {"from_status": "stopped", "to_status": "starting"}
        assert _value(mine, "studios_controller_status_transitions_total", **moved) == 1
        assert ("studios_controller_status_transitions_total", frozenset(moved.items())) not in (
            theirs
        )
        assert other.controller is not None and controller_harness.controller is not None
        assert isinstance(other.controller.metrics, ControllerMetrics)
        assert isinstance(controller_harness.controller.metrics, ControllerMetrics)
        assert (
            other.controller.metrics.registry is not controller_harness.controller.metrics.registry
        )
    finally:
        await other.close()


async def test_metrics_listener_is_separate_and_loopback(tmp_path: Path) -> None:
    controller = Controller(
        ControllerConfig(
            data_dir=tmp_path / "data", http_port=0, grpc_port=0, grpc_agents_port=0, metrics_port=0
        )
    )
    await controller.start()
    try:
        assert controller.metrics_server is not None
        port = controller.metrics_server.port
        token = (tmp_path / "data" / "admin-token").read_text().strip()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                assert resp.content_type == "text/plain"
                text = await resp.text()
            assert "studios_controller_studios" in text
            async with http.get(f"http://127.0.0.1:{port}/studios") as resp:
                assert resp.status == 404
            api = f"http://127.0.0.1:{controller.http_port}/metrics"
            # Not on the API port: anonymous 401, even the owner's token finds nothing.
            async with http.get(api) as resp:
                assert resp.status == 401
            async with http.get(api, headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 404
                assert "studios_controller" not in await resp.text()
        address = _non_loopback_address()
        require(
            address is not None,
            "this host has no non-loopback IPv4 address to try the metrics listener on",
        )
        assert address is not None
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, port)) != 0, "metrics reachable off loopback"
    finally:
        await controller.stop()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            # No packet is sent: connecting a datagram socket only picks the route's source.
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(sock.getsockname()[0])
    return None if address.startswith("127.") else address


async def test_no_metrics_listener_by_default(controller_harness: ControllerHarness) -> None:
    assert controller_harness.controller is not None
    assert controller_harness.controller.metrics_server is None
    assert ControllerConfig(data_dir=Path("x")).metrics_port is None


@pytest.mark.e2e
async def test_serve_metrics_flag(tmp_path: Path) -> None:
    metrics_port = free_port()
    process = ControllerProcess(tmp_path / "a", extra_args=["--metrics", str(metrics_port)])
    process.start()
    try:
        await process.wait_ready()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                assert resp.status == 200
                samples = _parse(await resp.text())
        assert _value(samples, "studios_controller_studios", status="stopped") == 0
        assert _value(samples, "studios_controller_database_up") == 1
        # wait_ready's own request was timed, under its route's pattern.
        assert (
            _value(
                samples,
                "studios_controller_http_responses_total",
                method="GET",
                route="/studios/templates",
                code="200",
            )
            >= 1
        )
    finally:
        process.stop()


@pytest.mark.e2e
async def test_bad_metrics_address_names_the_flag(tmp_path: Path) -> None:
    bad = ControllerProcess(tmp_path / "c", extra_args=["--metrics", "localhost:http"])
    bad.start()
    assert bad.proc is not None
    assert bad.proc.wait(timeout=60) == 2
    assert "--metrics: port must be an integer" in bad.log_path.read_text()
