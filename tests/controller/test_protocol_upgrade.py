"""Protocol V1 and V2 side by side, as in a rolling upgrade (issue 11).

V2 turned three strings of agent.proto into enums with new field numbers
(Hello.runtime_kind, Volume.volume_kind, DataLinkMountStatus.mount_state; the old
numbers reserved). A V1 agent is played with messages generated at run time
from tests/proto/agent_v1.proto, a copy of the V1 file: it reaches the real
controller's gRPC service with exactly the bytes a V1 agent sends and decodes
its answers as a V1 agent would. Controllers speak V1 and V2; a V1-only
controller refuses a V2 agent, hence "controllers first"
(docs/contract-notes.md "Protocol versions").
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.controller_link import PROTOCOL_VERSION, runtime_kind
from agent.datalinks.mounter import (
    STATE_FAILED,
    STATE_MOUNTED,
    STATE_READ_ONLY,
    STATE_UNMOUNTED,
    MountStatus,
    state_of,
)
from agent.runtime import runtime_names
from agent.volumes import VolumeInfo, volume_kinds
from controller import agent_service
from controller.models import Studio
from tests import REPO_ROOT
from tests.conftest import ControllerHarness
from tests.controller.test_datalinks import add_credentials, add_link
from tests.fake_agent import FakeAgent
from tests.fake_controller import FakeController
from tests.integration import require

ROOT = REPO_ROOT
V1_PROTO = ROOT / "tests" / "proto" / "agent_v1.proto"


@pytest.fixture(scope="session")
def v1() -> Iterator[ModuleType]:
    """The V1 messages (agent_v1_pb2), compiled from the copy of the V1 file."""
    require(
        importlib.util.find_spec("grpc_tools") is not None,
        "grpcio-tools is not installed (it is in the [test] extra)",
    )
    name = "agent_v1_pb2"
    if name in sys.modules:  # a second session in the same process
        yield sys.modules[name]
        return
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{V1_PROTO.parent}",
                f"--python_out={out}",
                str(V1_PROTO),
            ],
            check=True,
        )
        spec = importlib.util.spec_from_file_location(name, Path(out) / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    yield module


class V1Agent(FakeAgent):
    """A fake agent that speaks protocol V1: the old Hello, the old strings."""

    def __init__(self, v1: ModuleType, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, protocol_version=pb.PROTOCOL_VERSION_V1, **kwargs)
        self.v1 = v1
        self.response_type = v1.ConnectResponse

    def hello_request(self) -> Any:
        v1 = self.v1
        return v1.ConnectRequest(
            hello=v1.Hello(
                protocol_version=v1.PROTOCOL_VERSION_V1,
                agent_id=self.agent_id,
                hostname="v1-host",
                compute_env_id=self.compute_env_id,
                runtime="local",
                proxy_url=self.proxy_url,
                agent_version="0.old",
                capacity=v1.HostCapacity(cpus=2, memory_bytes=8 << 30),
            )
        )

    def observed_v1(
        self,
        session_id: str,
        generation: int,
        status: int,
        *,
        volume_kind: str = "directory",
        mounts: tuple[tuple[str, str, str], ...] = (),
    ) -> Any:
        """A SessionObserved with the V1 strings: a volume and (id, name, state) mounts."""
        v1 = self.v1
        return v1.SessionObserved(
            session_id=session_id,
            generation=generation,
            status=status,
            runtime="local",
            tool_port=41000,
            root_dir=f"/state/{session_id}/root",
            volume=v1.Volume(
                kind=volume_kind,
                path=f"/state/{session_id}/root",
                size_bytes=2 << 30,
                used_bytes=1 << 20,
            ),
            data_links=[
                v1.DataLinkMountStatus(data_link_id=i, mount_name=n, state=s) for i, n, s in mounts
            ],
        )

    async def report_v1(self, session_id: str, generation: int, status: int, **kw: Any) -> None:
        observed = self.observed_v1(session_id, generation, status, **kw)
        await self.send(self.v1.ConnectRequest(session=observed))


@pytest.fixture
async def started(controller_harness: ControllerHarness) -> AsyncIterator[list[FakeAgent]]:
    agents: list[FakeAgent] = []
    yield agents
    for agent in agents:
        await agent.close()


async def _studio_api(h: ControllerHarness, sid: str) -> dict[str, Any]:
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    return dict(body)


async def _wait_status(h: ControllerHarness, sid: str, status: str) -> dict[str, Any]:
    for _ in range(200):
        body = await _studio_api(h, sid)
        if body["statusInfo"]["status"] == status:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"studio {sid} is {body['statusInfo']}, not {status}")


async def _agent_row(h: ControllerHarness, agent_id: str) -> dict[str, Any]:
    _, body = await h.request("GET", "/agents", expect=200)
    return next(dict(a) for a in body["agents"] if a["id"] == agent_id)


async def _studio_row(h: ControllerHarness, sid: str) -> Studio:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        studio = await session.get(Studio, sid)
        assert studio is not None
        return studio


async def test_a_v1_agent_connects_and_its_sessions_run_and_stop(
    controller_harness: ControllerHarness, started: list[FakeAgent], v1: ModuleType
) -> None:
    h = controller_harness
    agent = V1Agent(
        v1, h.grpc_target, h.agent_token, agent_id="old", compute_env_id=h.compute_env_id
    )
    started.append(agent)
    await agent.connect(inventory=[])
    # Answered in V1, decoded by V1 code.
    assert agent.welcome is not None
    assert isinstance(agent.welcome, v1.Welcome)
    assert agent.welcome.protocol_version == v1.PROTOCOL_VERSION_V1
    assert agent.welcome.checkpoint_acks and agent.welcome.connect_token_key
    row = await _agent_row(h, "old")
    assert row["connected"] is True and row["hostname"] == "v1-host"
    # Its runtime travels only as the retired string: not known to this controller.
    assert row.get("runtime", "") == ""

    cred = await add_credentials(h, "c")
    link = await add_link(h, "scratch", "s3://scratch-bucket", cred)
    _, body = await h.request(
        "POST",
        "/studios",
        {
            "name": "old agent",
            "computeEnvId": h.compute_env_id,
            "configuration": {"mountDataV2": [{"dataLinkId": link["id"]}]},
        },
        expect=200,
    )
    sid = body["studio"]["sessionId"]
    desired = await agent.wait_desired(sid, v1.DESIRED_STATUS_RUNNING)
    assert [m.mount_name for m in desired.spec.data_links] == ["scratch"]
    gen = desired.generation
    await agent.report_v1(
        sid, gen, v1.SESSION_STATUS_RUNNING, mounts=((link["id"], "scratch", "mounted"),)
    )
    body = await _wait_status(h, sid, "running")
    [view] = body["mountedDataLinks"]
    # The state is unknown (a V1 agent's string): absent, as before any report.
    assert view["mountName"] == "scratch" and "mountState" not in view
    assert view["status"] == "VALID"
    studio = await _studio_row(h, sid)
    assert studio.volume["kind"] == "" and studio.volume["sizeBytes"] == 2 << 30
    assert studio.tool_port == 41000

    # Its checkpoint events are recorded and acknowledged (the ack decoded by V1 code).
    await agent.send(
        v1.ConnectRequest(
            checkpoint=v1.CheckpointEvent(
                session_id=sid,
                generation=gen,
                key="k-old-1",
                uri=f"file:///tmp/work/.studios/checkpoints/manifests/{sid}/k-old-1",
                status=v1.CHECKPOINT_STATUS_INTERIM,
                size_bytes=10,
                saved_at=1,
            )
        )
    )
    ack = await agent.wait_ack(sid, "k-old-1")
    assert ack.result == v1.CHECKPOINT_ACK_RESULT_RECORDED

    start = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    stop = await agent.wait_desired(sid, v1.DESIRED_STATUS_STOPPED, start=start)
    assert stop.generation == gen
    await agent.report_v1(
        sid, gen, v1.SESSION_STATUS_STOPPED, mounts=((link["id"], "scratch", "unmounted"),)
    )
    await _wait_status(h, sid, "stopped")


async def test_unspecified_keeps_what_was_known(
    controller_harness: ControllerHarness, started: list[FakeAgent], v1: ModuleType
) -> None:
    """A V1 report after a V2 one (a downgraded agent, or the row an older controller
    wrote) leaves the known runtime, volume kind and mount state as they were."""
    h = controller_harness
    new = FakeAgent(h.grpc_target, h.agent_token, agent_id="a", compute_env_id=h.compute_env_id)
    started.append(new)
    await new.connect(inventory=[])
    assert new.welcome is not None and new.welcome.protocol_version == pb.PROTOCOL_VERSION_V2
    assert (await _agent_row(h, "a"))["runtime"] == "local"
    cred = await add_credentials(h, "c")
    link = await add_link(h, "scratch", "s3://scratch-bucket", cred)
    _, body = await h.request(
        "POST",
        "/studios",
        {
            "name": "mixed",
            "computeEnvId": h.compute_env_id,
            "configuration": {"mountDataV2": [{"dataLinkId": link["id"]}]},
        },
        expect=200,
    )
    sid = body["studio"]["sessionId"]
    gen = (await new.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)).generation
    obs = pb.SessionObserved(
        session_id=sid,
        generation=gen,
        status=pb.SESSION_STATUS_RUNNING,
        runtime="local",
        tool_port=41000,
        volume=pb.Volume(volume_kind=pb.VOLUME_KIND_XFS_LOOP, path="/v", size_bytes=1 << 30),
        data_links=[
            pb.DataLinkMountStatus(
                data_link_id=link["id"],
                mount_name="scratch",
                mount_state=pb.DATA_LINK_MOUNT_STATE_READ_ONLY,
            )
        ],
    )
    await new.send(pb.ConnectRequest(session=obs))
    body = await _wait_status(h, sid, "running")
    assert body["mountedDataLinks"][0]["mountState"] == "read-only"
    assert (await _studio_row(h, sid)).volume["kind"] == "xfs-loop"
    await new.close()

    old = V1Agent(v1, h.grpc_target, h.agent_token, agent_id="a", compute_env_id=h.compute_env_id)
    started.append(old)
    await old.connect()
    assert old.welcome is not None and old.welcome.protocol_version == v1.PROTOCOL_VERSION_V1
    row = await _agent_row(h, "a")
    assert row["runtime"] == "local" and row["hostname"] == "v1-host"
    observed = old.observed_v1(
        sid,
        gen,
        v1.SESSION_STATUS_RUNNING,
        volume_kind="xfs-loop",
        mounts=((link["id"], "scratch", "read-only"),),
    )
    await old.send(v1.ConnectRequest(inventory=v1.Inventory(sessions=[observed])))
    for _ in range(100):
        studio = await _studio_row(h, sid)
        if studio.volume.get("path") != "/v":
            break
        await asyncio.sleep(0.05)
    assert studio.volume["kind"] == "xfs-loop" and studio.volume["sizeBytes"] == 2 << 30
    body = await _studio_api(h, sid)
    assert body["statusInfo"]["status"] == "running"
    assert body["mountedDataLinks"][0]["mountState"] == "read-only"


async def test_a_v1_controller_refuses_a_v2_agent_saying_why(
    controller_harness: ControllerHarness,
    started: list[FakeAgent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Agents upgraded before their controller are refused, with a message that says so."""
    h = controller_harness
    monkeypatch.setattr(agent_service, "SUPPORTED_PROTOCOLS", frozenset({pb.PROTOCOL_VERSION_V1}))
    agent = FakeAgent(h.grpc_target, h.agent_token, agent_id="new", compute_env_id=h.compute_env_id)
    started.append(agent)
    await agent.connect(wait_welcome=False)
    error = await agent.wait_error()
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    # What a V1 controller says too ("... is not supported (supported: [1])").
    assert "protocol version 2 " in details and "(supported: [1]" in details
    assert "PROTOCOL_VERSION_V2" in details and "upgrade controllers before" in details
    _, body = await h.request("GET", "/agents", expect=200)
    assert [a for a in body["agents"] if a["id"] == "new"] == []


async def test_the_agent_against_a_v1_controller_says_upgrade_it_first(tmp_path: Path) -> None:
    """The real agent link, refused by a controller that speaks only V1."""
    from agent.daemon import Agent
    from tests.agent_fixtures import kill_leftover_tools, make_agent_config

    controller = FakeController(protocols=frozenset({pb.PROTOCOL_VERSION_V1}))
    await controller.start()
    config = make_agent_config(tmp_path, controller)
    agent = Agent(config)
    try:
        await agent.start()
        assert agent.link is not None
        for _ in range(200):
            if "FAILED_PRECONDITION" in agent.link.last_error:
                break
            await asyncio.sleep(0.05)
        error = agent.link.last_error
        assert "protocol version 2 is not supported (supported: [1])" in error, error
        assert "speaks protocol PROTOCOL_VERSION_V2" in error
        assert "upgrade the controller before its agents" in error
        assert agent.link.connects == 0
        [hello] = controller.messages("hello")[:1]
        assert hello.protocol_version == PROTOCOL_VERSION == pb.PROTOCOL_VERSION_V2
        assert hello.runtime_kind == pb.RUNTIME_KIND_LOCAL
    finally:
        await agent.close()
        await controller.stop()
        kill_leftover_tools(config.state_dir)


def test_every_name_has_a_wire_value_that_maps_back() -> None:
    """Agent string -> V2 enum -> the same string on the controller, for every value."""
    from agent.sessions.report import volume_pb
    from controller.observed import _MOUNT_STATE, _VOLUME_KIND

    for name in runtime_names():
        kind = runtime_kind(name)
        assert kind != pb.RUNTIME_KIND_UNSPECIFIED, name
        assert agent_service.runtime_name(pb.Hello(runtime_kind=kind)) == name
    assert runtime_kind("no-such-runtime") == pb.RUNTIME_KIND_UNSPECIFIED
    assert agent_service.runtime_name(pb.Hello()) is None

    for volume_kind in volume_kinds():
        wire = volume_pb(VolumeInfo(volume_kind, "/v", 1)).volume_kind
        assert wire != pb.VOLUME_KIND_UNSPECIFIED, volume_kind
        assert _VOLUME_KIND[wire] == volume_kind

    for state in (STATE_MOUNTED, STATE_READ_ONLY, STATE_FAILED, STATE_UNMOUNTED):
        status = MountStatus("dl", "m", state).to_pb()
        assert status.mount_state != pb.DATA_LINK_MOUNT_STATE_UNSPECIFIED, state
        assert state_of(status) == state
        assert _MOUNT_STATE[status.mount_state] == state
    assert len(_MOUNT_STATE) == len(pb.DataLinkMountState.keys()) - 1
    assert len(_VOLUME_KIND) == len(pb.VolumeKind.keys()) - 1


def test_v1_field_numbers_are_reserved_and_v1_bytes_decode(v1: ModuleType) -> None:
    """The retired numbers stay unused, and V1 bytes parse (their strings are unknown fields)."""
    for message, number, name in (
        (pb.Hello, 5, "runtime"),
        (pb.Volume, 1, "kind"),
        (pb.DataLinkMountStatus, 3, "state"),
    ):
        fields = message.DESCRIPTOR.fields_by_number
        assert number not in fields and name not in message.DESCRIPTOR.fields_by_name
    old = v1.Hello(protocol_version=1, agent_id="x", runtime="podman", proxy_url="http://p")
    new = pb.Hello.FromString(old.SerializeToString())
    assert new.protocol_version == pb.PROTOCOL_VERSION_V1 and new.agent_id == "x"
    assert new.proxy_url == "http://p" and new.runtime_kind == pb.RUNTIME_KIND_UNSPECIFIED
    # And the other way: a V2 message reads on a V1 agent with the new fields unknown.
    back = v1.Volume.FromString(
        pb.Volume(volume_kind=pb.VOLUME_KIND_XFS_LOOP, path="/v").SerializeToString()
    )
    assert back.kind == "" and back.path == "/v"
