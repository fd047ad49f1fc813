"""Benchmark (JSON): what TLS costs the agent stream, beside the anchor of the same stream
in plaintext (the transport before issue 12), measured in the same run.

- connect: a fresh channel to the first answer on the stream (TCP + TLS handshake +
  HTTP/2 + one round trip), plaintext vs server TLS vs mutual TLS with an agent
  certificate from the controller's CA (`controller.agent_ca`), median of `--connects`.
- per message: `--agents` concurrent streams (one channel each, as agents have) each
  send `--messages` SessionObserved messages of the size a running session reports;
  the server's CPU time per message (user + system of the server process, which does
  nothing but read and count) and the wall time for all of them.

The server is a separate process so its CPU time is its own. No database: this is
the transport's share only; the controller's handling is the same with or without TLS.

Run: .venv/bin/python tests/bench/bench_agent_tls.py [--agents 300] [--messages 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import psutil
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc as pbg

from controller.agent_ca import AgentCA, DirectoryCaFiles
from studios_shared.agent_pki import AgentIdentity, new_key_and_csr

MODES = ("plaintext", "tls", "mtls")


class _Counter(pbg.AgentServiceServicer):
    """Answers the Hello with a Welcome, then only reads (what the transport costs)."""

    async def Connect(self, request_iterator: Any, context: Any) -> Any:
        async for request in request_iterator:
            if request.WhichOneof("message") == "hello":
                yield pb.ConnectResponse(welcome=pb.Welcome(agent_id=request.hello.agent_id))


def _serve(mode: str, pki: str, port_q: Any, stop: Any) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        pbg.add_AgentServiceServicer_to_server(_Counter(), server)  # type: ignore[no-untyped-call]
        if mode == "plaintext":
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            ca = AgentCA.open(DirectoryCaFiles(Path(pki)))
            key, chain = ca.server_credentials(["127.0.0.1", "localhost"])
            creds = grpc.ssl_server_credentials(
                [(key, chain)],
                root_certificates=ca.certificate_pem if mode == "mtls" else None,
                require_client_auth=mode == "mtls",
            )
            port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        port_q.put(port)
        await asyncio.to_thread(stop.wait)
        await server.stop(0)

    asyncio.run(main())


def _client_credentials(mode: str, pki: Path) -> grpc.ChannelCredentials | None:
    if mode == "plaintext":
        return None
    ca = AgentCA.open(DirectoryCaFiles(pki))
    if mode == "tls":
        return grpc.ssl_channel_credentials(root_certificates=ca.certificate_pem)
    identity = AgentIdentity("bench-agent", "0123456789abcdef")
    key, csr = new_key_and_csr(identity)
    cert = ca.sign_agent(csr, identity, timedelta(hours=1)).certificate_pem
    return grpc.ssl_channel_credentials(ca.certificate_pem, key, cert)


def _channel(port: int, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    target = f"127.0.0.1:{port}"
    return grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)


def _observed(i: int) -> pb.ConnectRequest:
    obs = pb.SessionObserved(
        session_id=f"{i:08x}",
        generation=3,
        status=pb.SESSION_STATUS_RUNNING,
        message="jupyterlab answering on port 41234",
        tool_port=41234,
        root_dir=f"/var/lib/studios/sessions/{i:08x}/root",
        started_at=1764590000,
    )
    obs.volume.CopyFrom(
        pb.Volume(
            volume_kind=pb.VOLUME_KIND_XFS_LOOP, path="/x", size_bytes=2 << 30, used_bytes=1 << 28
        )
    )
    for name in ("preparing the volume", "restoring the checkpoint", "starting the tool"):
        obs.progress.append(pb.ProgressStep(name=name, status=pb.STEP_STATUS_SUCCEEDED))
    return pb.ConnectRequest(session=obs)


class _Gate:
    """Every stream connects first, then all send at once: handshakes are not counted
    in the per-message cost."""

    def __init__(self, streams: int) -> None:
        self.waiting = streams
        self.all_up = asyncio.Event()
        self.go = asyncio.Event()

    async def arrive(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.all_up.set()
        await self.go.wait()


async def _one_stream(
    port: int, creds: grpc.ChannelCredentials | None, messages: int, gate: _Gate
) -> float:
    """Connect, get the Welcome, pass the gate, send; the connect time."""
    t0 = time.perf_counter()
    async with _channel(port, creds) as channel:
        stub = pbg.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Connect()
        await call.write(pb.ConnectRequest(hello=pb.Hello(agent_id="a")))
        await call.read()
        connected = time.perf_counter() - t0
        await gate.arrive()
        for i in range(messages):
            await call.write(_observed(i))
        await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass
    return connected


async def _connect_times(port: int, creds: grpc.ChannelCredentials | None, n: int) -> list[float]:
    out = []
    for _ in range(n):
        gate = _Gate(1)
        gate.go.set()
        out.append(await _one_stream(port, creds, 0, gate))
    return out


async def _load(
    port: int, creds: grpc.ChannelCredentials | None, agents: int, messages: int, server: int
) -> dict[str, float]:
    proc = psutil.Process(server)
    gate = _Gate(agents)
    streams = [asyncio.create_task(_one_stream(port, creds, messages, gate)) for _ in range(agents)]
    await gate.all_up.wait()
    await asyncio.sleep(0.2)
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    gate.go.set()
    await asyncio.gather(*streams)
    wall = time.perf_counter() - t0
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    total = agents * messages
    return {
        "messages": total,
        "server_cpu_us_per_message": round(cpu / total * 1e6, 1),
        "wall_s": round(wall, 3),
        "messages_per_s": round(total / wall),
    }


def run(mode: str, pki: Path, connects: int, agents: int, messages: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(mode, str(pki), port_q, stop), daemon=True)
    server.start()
    try:
        port = port_q.get(timeout=30)
        creds = _client_credentials(mode, pki)
        times = asyncio.run(_connect_times(port, creds, connects))
        load = asyncio.run(_load(port, creds, agents, messages, server.pid or 0))
    finally:
        stop.set()
        server.join(10)
    return {
        "connect_median_ms": round(statistics.median(times) * 1000, 2),
        "connect_min_ms": round(min(times) * 1000, 2),
        "connect_max_ms": round(max(times) * 1000, 2),
        **load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=30)
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--messages", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        AgentCA.open(DirectoryCaFiles(pki))
        results = {m: run(m, pki, args.connects, args.agents, args.messages) for m in MODES}
    plain = results["plaintext"]
    report = {
        "benchmark": "agent stream transport: plaintext (anchor) vs TLS vs mutual TLS",
        "agents": args.agents,
        "messages_per_agent": args.messages,
        "cpus": os.cpu_count(),
        "results": results,
        "vs_plaintext": {
            m: {
                "added_connect_ms": round(
                    results[m]["connect_median_ms"] - plain["connect_median_ms"], 2
                ),
                "server_cpu_per_message_x": round(
                    results[m]["server_cpu_us_per_message"] / plain["server_cpu_us_per_message"],
                    2,
                ),
            }
            for m in ("tls", "mtls")
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
