"""The committed generated code must match a fresh generation from agent.proto."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.integration import require

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py"]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    require(
        importlib.util.find_spec("grpc_tools") is not None,
        "grpcio-tools is not installed (it is in the [test] extra)",
    )
    # The generator this interpreter has (grpcio-tools), not whatever python3 is on PATH.
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "studios/agent/v1" / name).read_bytes()
        != (ROOT / "proto/studios/agent/v1" / name).read_bytes()
    ]
    assert not stale, f"stale generated code {stale}: run scripts/gen-proto and commit"


def test_generated_code_imports_and_speaks_v1() -> None:
    from studios.agent.v1 import agent_pb2, agent_pb2_grpc

    hello = agent_pb2.ConnectRequest(
        hello=agent_pb2.Hello(protocol_version=agent_pb2.PROTOCOL_VERSION_V1, agent_id="a")
    )
    decoded = agent_pb2.ConnectRequest.FromString(hello.SerializeToString())
    assert decoded.WhichOneof("message") == "hello"
    assert decoded.hello.protocol_version == agent_pb2.PROTOCOL_VERSION_V1
    assert hasattr(agent_pb2_grpc, "AgentServiceStub")
    assert sys.modules["studios.agent.v1.agent_pb2"] is agent_pb2
