"""Two controllers on one PostgreSQL behind nginx, with many simulated agents (issue 16).

Real processes: two `studio-controller serve` on one PostgreSQL (a database of its own on
the server STUDIOS_TEST_POSTGRES_URL names, else a throw-away one from
scripts/test-postgres, as root) with one `--secrets-key-file`, and Debian's nginx in front
of their HTTP (tests/multi_controller.py). The agents are simulated: real gRPC clients
(enrollment with the join token, mutual TLS, the Connect stream: Hello, Inventory,
Heartbeats at the interval the Welcome asks for, an observed report for every desired
change), many per worker process, sessions faked at the runtime boundary (a desired
RUNNING is reported RUNNING, a STOPPED stopped, at once). Each agent is given both
controllers (half list A first, half B first) and fails over to the other when its stream
breaks, as `studio-agent --controller A,B` does.

The N x S studios are inserted through the ORM as running on their agents (creating
10,000 through the API would take most of the run); each agent reports its S sessions
running in its Inventory, so the controllers hold the full steady state.

Measured, printed as JSON:
- each controller's CPU per second of wall time over a steady-state window (agents
  heartbeating, nothing else happening);
- the time from a REST change (stop, then start, through nginx, so either controller
  takes it) to the DesiredState reaching the agent, p50/p99;
- GET /studios through nginx under that load (default page, deep page, free-text
  search), p50/p99, and beside them the cheapest authenticated GET
  (/studios/templates?max=1: no database read beyond authentication), the floor the
  host and the stack impose under that load;
- failover: SIGKILL one controller; the time until each of its agents is connected to
  the other (p50, max) and until a change reaches such an agent.

    python tests/bench/bench_multi_controller.py [--agents 500] [--sessions 20]
        [--workers 2] [--steady-seconds 30] [--changes 100] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from operator import contains
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp
import asyncpg
import grpc
import psutil
from studios.agent.v1 import agent_pb2 as pb

from controller.config import normalize_database_url
from controller.db import Database
from controller.models import Studio, utcnow
from controller.notify import asyncpg_dsn
from tests.fake_agent import CONNECT_METHOD, AgentCredentials, agent_endpoint, enroll
from tests.multi_controller import Cluster

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "studios/python-http:3.11-0.1"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(_percentile(values, 0.5) * 1000, 1),
        "p99_ms": round(_percentile(values, 0.99) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1) if values else float("nan"),
    }


def session_ids(agent_index: int, sessions: int) -> list[str]:
    return [f"{agent_index * sessions + j:08x}" for j in range(sessions)]


def agent_id(agent_index: int) -> str:
    return f"sim-{agent_index:05d}"


# ------------------------------------------------------------------ the worker side


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class SimAgent:
    """One simulated agent: a real gRPC client of the Connect stream."""

    def __init__(self, index: int, targets: list[str], token: str, env: str, sessions: int) -> None:
        self.index = index
        self.agent_id = agent_id(index)
        # Half the agents list A first, half B first: both controllers get streams.
        self.targets = targets[index % len(targets) :] + targets[: index % len(targets)]
        self.token = token
        self.env = env
        # session id -> (generation, observed status)
        self.sessions = {
            sid: (1, pb.SESSION_STATUS_RUNNING) for sid in session_ids(index, sessions)
        }
        self.credentials: AgentCredentials | None = None

    async def run(self, enroll_slots: asyncio.Semaphore) -> None:
        async with enroll_slots:
            while self.credentials is None:
                try:
                    # Long: an enrollment the controller completed after the client gave up
                    # cannot be repeated (the id is taken).
                    self.credentials = await enroll(
                        self.targets[0],
                        self.token,
                        agent_id=self.agent_id,
                        compute_env_id=self.env,
                        timeout=300,
                    )
                except (grpc.aio.AioRpcError, OSError) as exc:
                    _emit({"e": "enroll-retry", "a": self.agent_id, "why": str(exc)[:200]})
                    await asyncio.sleep(random.uniform(0.5, 1.5))
        index = 0
        while True:
            target = self.targets[index % len(self.targets)]
            try:
                await self._stream(target)
            except (grpc.aio.AioRpcError, OSError) as exc:
                _emit(
                    {
                        "e": "stream-ended",
                        "a": self.agent_id,
                        "c": target,
                        "t": time.time(),
                        "why": str(exc)[:200],
                    }
                )
            index += 1
            await asyncio.sleep(random.uniform(0.05, 0.25))

    async def _stream(self, target: str) -> None:
        assert self.credentials is not None
        endpoint = await agent_endpoint(target, self.credentials.ca_pem)
        async with grpc.aio.secure_channel(
            endpoint, self.credentials.channel_credentials()
        ) as channel:
            call: Any = channel.stream_stream(
                CONNECT_METHOD,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ConnectResponse.FromString,
            )()
            hello = pb.Hello(
                protocol_version=pb.PROTOCOL_VERSION_V2,
                agent_id=self.agent_id,
                hostname=f"sim-host-{self.index}",
                compute_env_id=self.env,
                runtime_kind=pb.RUNTIME_KIND_LOCAL,
                proxy_url=f"http://127.0.0.1:{20000 + self.index}",
                agent_version="bench",
                capacity=pb.HostCapacity(
                    cpus=64, memory_bytes=1 << 40, memory_available_bytes=1 << 40
                ),
            )
            await call.write(pb.ConnectRequest(hello=hello))
            heartbeat: asyncio.Task[None] | None = None
            try:
                async for msg in call:
                    kind = msg.WhichOneof("message")
                    if kind == "welcome":
                        await call.write(
                            pb.ConnectRequest(
                                inventory=pb.Inventory(
                                    sessions=[self._observed(sid) for sid in self.sessions]
                                )
                            )
                        )
                        _emit({"e": "connected", "a": self.agent_id, "c": target, "t": time.time()})
                        heartbeat = asyncio.create_task(
                            self._heartbeats(call, msg.welcome.heartbeat_interval_seconds or 10)
                        )
                    elif kind == "desired":
                        await self._desired(call, msg.desired)
            finally:
                if heartbeat is not None:
                    heartbeat.cancel()
        raise OSError("the controller ended the stream")

    def _observed(self, sid: str) -> pb.SessionObserved:
        generation, status = self.sessions[sid]
        return pb.SessionObserved(
            session_id=sid,
            generation=generation,
            status=status,
            runtime="local",
            tool_port=8080 if status == pb.SESSION_STATUS_RUNNING else 0,
        )

    async def _heartbeats(self, call: Any, interval: float) -> None:
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            await call.write(pb.ConnectRequest(heartbeat=pb.Heartbeat(sent_at=int(time.time()))))
            await asyncio.sleep(interval)

    async def _desired(self, call: Any, desired: pb.DesiredState) -> None:
        now = time.time()
        for s in desired.sessions:
            current = self.sessions.get(s.session_id)
            if s.status == pb.DESIRED_STATUS_RUNNING:
                wanted = (s.generation, pb.SESSION_STATUS_RUNNING)
            elif s.status == pb.DESIRED_STATUS_STOPPED:
                wanted = (s.generation, pb.SESSION_STATUS_STOPPED)
            else:
                self.sessions.pop(s.session_id, None)
                continue
            if current == wanted:
                continue
            self.sessions[s.session_id] = wanted
            # Also from a full set: a change queued with a resync goes out in one message.
            _emit(
                {
                    "e": "desired",
                    "s": s.session_id,
                    "st": int(s.status),
                    "g": s.generation,
                    "t": now,
                    "a": self.agent_id,
                }
            )
            await call.write(pb.ConnectRequest(session=self._observed(s.session_id)))


async def worker(args: argparse.Namespace) -> None:
    targets = args.targets.split(",")
    token = Path(args.token_file).read_text().strip()
    slots = asyncio.Semaphore(8)
    agents = [
        SimAgent(i, targets, token, args.env, args.sessions)
        for i in range(args.first, args.first + args.count)
    ]
    await asyncio.gather(*(a.run(slots) for a in agents))


# ------------------------------------------------------------------ the driver side


class Workers:
    """The worker processes and what they report."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.connected: dict[str, tuple[str, float]] = {}
        self.desired: dict[tuple[str, int], float] = {}
        self.agent_of: dict[str, str] = {}
        self.changed = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    async def start(
        self, cluster: Cluster, env: str, agents: int, sessions: int, count: int
    ) -> None:
        per = -(-agents // count)
        for w in range(count):
            first, n = w * per, min(per, agents - w * per)
            if n <= 0:
                break
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                "--targets",
                cluster.agent_controllers,
                "--token-file",
                str(cluster.controllers[0].agent_token_file),
                "--env",
                env,
                "--first",
                str(first),
                "--count",
                str(n),
                "--sessions",
                str(sessions),
                stdout=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL,
                cwd=str(ROOT),
            )
            self.procs.append(proc)
            self._readers.append(asyncio.create_task(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event["e"] == "connected":
                self.connected[event["a"]] = (event["c"], event["t"])
            elif event["e"] == "desired":
                self.desired[(event["s"], event["st"])] = event["t"]
            self.changed.set()

    async def wait(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not within {timeout:.0f} s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)

    async def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for reader in self._readers:
            reader.cancel()


async def _insert_studios(url: str, env: str, agents: int, sessions: int) -> None:
    db = Database(url)
    now = utcnow()
    try:
        for first in range(0, agents, 50):
            async with db.transaction() as session:
                for k in range(first, min(agents, first + 50)):
                    for sid in session_ids(k, sessions):
                        session.add(
                            Studio(
                                session_id=sid,
                                workspace_id=1,
                                user_id=1,
                                name=f"studio-{sid}",
                                template_repository=TEMPLATE,
                                tool="python-http",
                                custom_image=False,
                                compute_env_id=env,
                                configuration={"cpu": 1},
                                is_private=False,
                                allowed_user_ids=[],
                                status="running",
                                desired_status="running",
                                generation=1,
                                agent_id=agent_id(k),
                                placed_at=now,
                                progress=[],
                                volume={},
                                date_created=now,
                                last_updated=now,
                                status_updated_at=now,
                                last_started=now,
                            )
                        )
    finally:
        await db.close()


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _cpu_per_second(cluster: Cluster, seconds: float) -> dict[str, float]:
    pids = {c.data_dir.name: c.proc.pid for c in cluster.controllers if c.proc and c.alive()}
    before = {name: _cpu(pid) for name, pid in pids.items()}
    started = time.monotonic()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - started
    return {name: round((_cpu(pid) - before[name]) / wall, 3) for name, pid in pids.items()}


async def _changes(
    http: aiohttp.ClientSession, base: str, token: str, workers: Workers, sids: list[str]
) -> list[float]:
    """Stop then start each studio through `base`; the seconds from the request to the
    DesiredState at its agent."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    for sid in sids:
        for verb, status in (
            ("stop", pb.DESIRED_STATUS_STOPPED),
            ("start", pb.DESIRED_STATUS_RUNNING),
        ):
            workers.desired.pop((sid, status), None)
            sent = time.time()
            async with http.put(
                f"{base}/studios/{sid}/{verb}",
                json={} if verb == "start" else None,
                headers=headers,
            ) as resp:
                assert resp.status == 200, f"{verb} {sid}: {resp.status} {await resp.text()}"
            key = (sid, int(status))
            await workers.wait(
                functools.partial(contains, workers.desired, key), 60, f"{verb} {sid}"
            )
            latencies.append(workers.desired[key] - sent)
            if verb == "stop":
                # The agent reported stopped: wait for the controller to have it so.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    async with http.get(
                        f"{base}/studios/{sid}?workspaceId=1", headers=headers
                    ) as r:
                        body = await r.json() if r.status == 200 else {}
                        if body.get("statusInfo", {}).get("status") == "stopped":
                            break
                    await asyncio.sleep(0.05)
    return latencies


async def _list_latencies(
    http: aiohttp.ClientSession, base: str, token: str, requests: int
) -> dict[str, dict[str, float]]:
    headers = {"Authorization": f"Bearer {token}"}
    out = {}
    for name, path, n in (
        ("default page", "/studios?workspaceId=1", requests),
        (
            "deep page (offset 9000, max 50)",
            "/studios?workspaceId=1&offset=9000&max=50",
            requests // 4,
        ),
        ("search (free text)", "/studios?workspaceId=1&search=studio-0000", requests // 4),
        # The floor under the same load: authentication, nginx and the controller's HTTP
        # and event loop, with no database read of its own.
        ("floor: authenticated GET /studios/templates", "/studios/templates?max=1", requests),
    ):
        times = []
        for _ in range(max(n, 1)):
            started = time.perf_counter()
            async with http.get(f"{base}{path}", headers=headers) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            times.append(time.perf_counter() - started)
        out[name] = _ms(times)
    return out


async def _database(url: str | None) -> tuple[str, str]:
    """(a new database's URL, the server's admin DSN to drop it with)."""
    if not url:
        out = subprocess.run(
            [str(ROOT / "scripts" / "test-postgres"), "start"],
            capture_output=True,
            text=True,
            check=True,
        )
        url = out.stdout.strip().partition("=")[2]
    base = normalize_database_url(url)
    admin = asyncpg_dsn(base)
    name = f"studios_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    from sqlalchemy import make_url

    return make_url(base).set(database=name).render_as_string(False), admin


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url, admin = await _database(os.environ.get("STUDIOS_TEST_POSTGRES_URL"))
    result: dict[str, Any] = {
        "agents": args.agents,
        "sessions_per_agent": args.sessions,
        "studios": args.agents * args.sessions,
        "workers": args.workers,
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="studios-bench-multi-") as tmp:
        cluster = Cluster(Path(tmp) / "cluster", url)
        workers = Workers()
        try:
            t0 = time.monotonic()
            await cluster.start()
            token = cluster.controllers[0].admin_token
            front = cluster.nginx.url
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{front}/compute-envs",
                    json={
                        "computeEnv": {
                            "name": "bench",
                            "platform": "studio-agent",
                            "config": {"workDir": str(Path(tmp) / "work")},
                        }
                    },
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    env = str((await resp.json())["computeEnvId"])
                started = time.monotonic()
                await _insert_studios(url, env, args.agents, args.sessions)
                result["insert_studios_s"] = round(time.monotonic() - started, 1)
                started = time.monotonic()
                await workers.start(cluster, env, args.agents, args.sessions, args.workers)
                try:
                    await workers.wait(
                        lambda: len(workers.connected) >= args.agents,
                        args.connect_timeout,
                        f"{args.agents} agents connected",
                    )
                except TimeoutError:
                    # Go on with those that made it, and say how many.
                    result["agents_not_connected"] = args.agents - len(workers.connected)
                result["agents_connected"] = len(workers.connected)
                result["all_agents_connected_s"] = round(time.monotonic() - started, 1)
                result["agents_per_controller"] = {
                    c.data_dir.name: sum(
                        1 for t, _ in workers.connected.values() if t == c.grpc_address
                    )
                    for c in cluster.controllers
                }
                await asyncio.sleep(args.warmup_seconds)
                result["steady_cpu_per_second"] = await _cpu_per_second(
                    cluster, args.steady_seconds
                )

                live = sorted(int(a.split("-")[1]) for a in workers.connected)
                all_sids = [sid for k in live for sid in session_ids(k, args.sessions)]
                picked = random.Random(1).sample(all_sids, min(args.changes // 2, len(all_sids)))
                result["change_to_agent"] = _ms(await _changes(http, front, token, workers, picked))
                result["get_studios_under_load"] = await _list_latencies(
                    http, front, token, args.requests
                )

                # Failover: kill the controller with the most streams.
                victim = cluster.controllers[0]
                survivor = cluster.controllers[1]
                moved = [a for a, (c, _) in workers.connected.items() if c == victim.grpc_address]
                killed_at = time.time()
                victim.kill()
                await workers.wait(
                    lambda: all(workers.connected[a][0] == survivor.grpc_address for a in moved),
                    120,
                    "the killed controller's agents on the other",
                )
                times = [workers.connected[a][1] - killed_at for a in moved]
                result["failover"] = {
                    "agents_moved": len(moved),
                    "reconnect_p50_s": round(_percentile(times, 0.5), 2),
                    "reconnect_max_s": round(max(times), 2) if times else None,
                }
                moved_sids = [
                    sid
                    for a in moved[:10]
                    for sid in session_ids(int(a.split("-")[1]), args.sessions)[:1]
                ]
                result["failover"]["change_to_moved_agent"] = _ms(
                    await _changes(http, front, token, workers, moved_sids)
                )
                result["total_s"] = round(time.monotonic() - t0, 1)
        finally:
            await workers.stop()
            cluster.stop()
            conn = await asyncpg.connect(admin)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{make_db_name(url)}" WITH (FORCE)')
            finally:
                await conn.close()
    return result


def make_db_name(url: str) -> str:
    from sqlalchemy import make_url

    return str(make_url(url).database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup-seconds", type=float, default=15.0)
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    # The worker side (started by the driver).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    parser.add_argument("--token-file", help=argparse.SUPPRESS)
    parser.add_argument("--env", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(args))
        return
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
