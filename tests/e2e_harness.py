"""Runs the controller and agents as real processes for end-to-end tests and the quick start.

Nothing here is a double: `studio-controller serve` and `studio-agent serve` are started as
child processes with their console scripts, and the tests talk to them over REST, the proxy
and the agent's admin socket, as an upstream service, a browser and an operator would.

`Stack` is the tests' pair: a controller, one compute environment (any workDir: a path or an
`s3://` URL) and one or more agents (local or podman runtime, extra environment such as S3
keys), with the clean-up a failed test needs (studios stopped, stray tools, containers,
mounts and loop devices removed). `LocalStack` is the benchmarks' simpler one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = [
    "AgentProcess",
    "ControllerProcess",
    "LocalStack",
    "LocalhostResolver",
    "RestClient",
    "Stack",
    "agent_session",
    "free_port",
    "open_studio",
    "script",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def script(name: str) -> str:
    """Path of an installed console script, preferring the running interpreter's."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (pip install -e .)")
    return found


class LocalhostResolver(AbstractResolver):
    """Resolves `*.localhost` to 127.0.0.1 as browsers do (RFC 6761), whatever the system says."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host == "localhost" or host.endswith(".localhost"):
            host = "127.0.0.1"
        return [
            {
                "hostname": host,
                "host": host,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


@dataclass
class _Process:
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class ControllerProcess(_Process):
    def __init__(
        self,
        data_dir: Path,
        *,
        database: str | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        grpc_agents_port: int | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.http_port = http_port or free_port()
        # The enrollment endpoint (what agents are given) and the mutual-TLS agent endpoint.
        self.grpc_port = grpc_port or free_port()
        self.grpc_agents_port = grpc_agents_port or free_port()
        argv = [
            script("studio-controller"),
            "serve",
            "--data-dir",
            str(data_dir),
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--grpc",
            f"127.0.0.1:{self.grpc_port}",
            "--grpc-agents",
            f"127.0.0.1:{self.grpc_agents_port}",
            *extra_args,
        ]
        if database:
            argv += ["--database", database]
        super().__init__(
            argv=argv, log_path=data_dir.parent / f"{data_dir.name}.log", env=dict(env or {})
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        """The enrollment endpoint, what `studio-agent --controller` names."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def grpc_agents_address(self) -> str:
        return f"127.0.0.1:{self.grpc_agents_port}"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    @property
    def agent_token_file(self) -> Path:
        return self.data_dir / "agent-token"

    def add_user(self, name: str, role: str) -> str:
        """A user with `role` in workspace 1, made by `studio-controller user add` as an
        operator would; their API token."""
        out = subprocess.run(
            [
                script("studio-controller"),
                "user",
                "add",
                "--data-dir",
                str(self.data_dir),
                "--name",
                name,
                "--email",
                f"{name}@example.org",
                "--workspace",
                "1",
                "--role",
                role,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"controller exited:\n{self.log_tail()}")
                if (self.data_dir / "admin-token").exists():
                    try:
                        async with http.get(
                            f"{self.url}/studios/templates",
                            headers={"Authorization": f"Bearer {self.admin_token}"},
                        ) as resp:
                            if resp.status == 200:
                                return
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"controller not ready after {timeout}s:\n{self.log_tail()}")


class AgentProcess(_Process):
    def __init__(
        self,
        controller: ControllerProcess,
        compute_env_id: str,
        state_dir: Path,
        *,
        proxy_port: int | None = None,
        extra_args: Iterable[str] = (),
        runtime: str = "local",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.runtime = runtime
        self.proxy_port = proxy_port or free_port()
        argv = [
            script("studio-agent"),
            "serve",
            "--controller",
            controller.grpc_address,
            "--token-file",
            str(controller.agent_token_file),
            "--compute-env",
            compute_env_id,
            "--state-dir",
            str(state_dir),
            "--runtime",
            runtime,
            "--proxy",
            f"127.0.0.1:{self.proxy_port}",
            # Local tools as the agent's user: pytest's temporary directories (0700) are
            # out of a per-session user's reach (tests/agent/runtime/test_local_unprivileged.py).
            "--local-tool-user",
            "agent",
            *extra_args,
        ]
        super().__init__(
            argv=argv, log_path=state_dir.parent / f"{state_dir.name}.log", env=dict(env or {})
        )

    def cli(self, *args: str) -> Any:
        """Run `studio-agent <args> --state-dir DIR --json` and return the parsed JSON."""
        out = subprocess.run(
            [script("studio-agent"), *args, "--state-dir", str(self.state_dir), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return json.loads(out.stdout)


class RestClient:
    """A thin REST client with the bearer token of one user.

    With `check` (the tests'), every answer of the controller's API is checked as the
    controller tests check theirs: documented by controller/openapi.yaml and, where the
    reference has the operation, as the reference describes it (`tests.api_contract`).
    """

    def __init__(self, base_url: str, token: str, *, check: bool = True) -> None:
        self.base_url = base_url
        self.token = token
        self.check = check
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=LocalhostResolver()),
            cookie_jar=aiohttp.CookieJar(unsafe=True),
        )

    async def close(self) -> None:
        await self.http.close()

    async def request(
        self, method: str, path: str, body: Any = None, *, expect: int | None = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.http.request(
            method, f"{self.base_url}{path}", json=body, headers=headers, **kw
        ) as resp:
            text = await resp.text()
            data = json.loads(text) if text and resp.content_type == "application/json" else text
            if self.check and not resp.history:
                # Imported here: the demo uses this client without the test dependencies.
                from tests import api_contract

                parsed = data if resp.content_type == "application/json" else None
                api_contract.check_response(method, path, resp.status, resp.content_type, parsed)
            if expect is not None and resp.status != expect:
                raise AssertionError(f"{method} {path}: {resp.status} {text}")
            return resp.status, data

    async def create_compute_env(self, name: str, work_dir: str | Path, **config: Any) -> str:
        """A studio-agent compute environment (30 GB of disk per host unless `config`
        says otherwise); its id."""
        _, body = await self.request(
            "POST",
            "/compute-envs",
            {
                "computeEnv": {
                    "name": name,
                    "platform": "studio-agent",
                    "config": {"workDir": str(work_dir), "bootDiskSizeGb": 30, **config},
                }
            },
            expect=200,
        )
        return str(body["computeEnvId"])

    async def wait_status(
        self, session_id: str, wanted: str | set[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        wanted_set = {wanted} if isinstance(wanted, str) else wanted
        deadline = time.monotonic() + timeout
        studio: dict[str, Any] = {}
        while time.monotonic() < deadline:
            _, studio = await self.request("GET", f"/studios/{session_id}", expect=200)
            if studio["statusInfo"]["status"] in wanted_set:
                return studio
            await asyncio.sleep(0.05)
        raise TimeoutError(f"studio {session_id} not {wanted_set} after {timeout}s: {studio}")


class LocalStack:
    """A controller, one compute environment and one agent, as real processes in `tmp`.

    For the benchmarks: `async with LocalStack(tmp) as stack:` yields a connected agent; on
    exit every studio still running is stopped (so its volume is released) before the agent
    and the controller stop.
    """

    def __init__(self, tmp: Path, *, agent_args: Iterable[str] = ()) -> None:
        self.tmp = tmp
        self.controller = ControllerProcess(tmp / "controller")
        self.agent_args = tuple(agent_args)
        self.agent: AgentProcess | None = None
        self.api: RestClient | None = None
        self.compute_env_id = ""

    async def __aenter__(self) -> LocalStack:
        self.controller.start()
        try:
            await self.controller.wait_ready()
            self.api = RestClient(self.controller.url, self.controller.admin_token)
            self.compute_env_id = await self.api.create_compute_env("bench", self.tmp / "work")
            self.agent = AgentProcess(
                self.controller, self.compute_env_id, self.tmp / "agent", extra_args=self.agent_args
            )
            self.agent.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                _, agents = await self.api.request("GET", "/agents", expect=200)
                if any(a["connected"] for a in agents["agents"]):
                    return self
                await asyncio.sleep(0.05)
            raise TimeoutError(f"agent did not connect:\n{self.agent.log_tail()}")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self.api is not None:
            if self.agent is not None and self.agent.alive():
                _, listing = await self.api.request("GET", "/studios?max=1000")
                for studio in listing.get("studios", []) if isinstance(listing, dict) else []:
                    if studio["statusInfo"]["status"] in ("running", "starting"):
                        await self.api.request("PUT", f"/studios/{studio['sessionId']}/stop")
                        await self.api.wait_status(
                            studio["sessionId"], {"stopped", "errored"}, timeout=120
                        )
            await self.api.close()
        if self.agent is not None:
            self.agent.stop()
        self.controller.stop()


def agent_session(agent: AgentProcess, session_id: str) -> dict[str, Any]:
    """The session as `studio-agent sessions --json` (the operator's view) shows it."""
    listing = agent.cli("sessions")
    sessions = listing["sessions"] if isinstance(listing, dict) else listing
    for session in sessions:
        if session.get("sessionId", session.get("id")) == session_id:
            return dict(session)
    raise AssertionError(f"session {session_id} not in `studio-agent sessions`: {listing}")


async def open_studio(api: RestClient, studio: dict[str, Any], path: str = "/") -> str:
    """Open `studioUrl` as a browser would, then fetch `path` through the proxy."""
    async with api.http.get(
        studio["studioUrl"],
        headers={"Authorization": f"Bearer {api.token}"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    assert location.startswith(f"http://{studio['sessionId']}.localhost:"), location
    async with api.http.get(location) as resp:  # token -> cookie -> clean URL
        assert resp.status == 200, await resp.text()
        base = str(resp.url).split("?")[0].rstrip("/")
    async with api.http.get(base + path) as resp:
        assert resp.status == 200, (
            f"GET {path} through the proxy: {resp.status} {await resp.text()}"
        )
        return await resp.text()


class Stack:
    """A controller, one compute environment and its agents, as real processes in `tmp`.

    `start()` starts the controller (with `controller_env` in its environment), creates the
    compute environment (`work_dir`, default `tmp/work`; `compute_env_config` adds to its
    config) and starts one agent; `add_agent()` starts another or a replacement on the same
    state directory. `close()` stops every studio still running (so its volume is
    released and its checkpoint written), then the agents and the controller, and removes
    whatever a failed test left behind under `tmp`.
    """

    def __init__(
        self,
        tmp: Path,
        *,
        work_dir: str | None = None,
        controller_env: Mapping[str, str] | None = None,
        compute_env_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.tmp = tmp
        self.work_dir = work_dir or str(tmp / "work")
        self.compute_env_config = dict(compute_env_config or {})
        self.controller = ControllerProcess(tmp / "controller", env=controller_env)
        self.agents: list[AgentProcess] = []
        self.api: RestClient | None = None
        self.compute_env_id = ""
        self.session_ids: set[str] = set()

    @property
    def agent(self) -> AgentProcess:
        return self.agents[-1]

    async def start(
        self,
        *,
        agent_args: Iterable[str] = (),
        runtime: str = "local",
        agent_env: Mapping[str, str] | None = None,
    ) -> None:
        self.controller.start()
        await self.controller.wait_ready()
        self.api = RestClient(self.controller.url, self.controller.admin_token)
        self.compute_env_id = await self.api.create_compute_env(
            "local", self.work_dir, **self.compute_env_config
        )
        await self.add_agent(agent_args=agent_args, runtime=runtime, env=agent_env)

    async def add_agent(
        self,
        *,
        agent_args: Iterable[str] = (),
        runtime: str = "local",
        env: Mapping[str, str] | None = None,
        state_dir: Path | None = None,
        proxy_port: int | None = None,
    ) -> AgentProcess:
        agent = AgentProcess(
            self.controller,
            self.compute_env_id,
            state_dir or self.tmp / f"agent{len(self.agents) or ''}",
            proxy_port=proxy_port,
            extra_args=agent_args,
            runtime=runtime,
            env=env,
        )
        self.agents.append(agent)
        agent.start()
        await self.wait_agent_connected()
        return agent

    async def wait_agent_connected(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.api is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.agent.alive():
                raise RuntimeError(f"agent exited:\n{self.agent.log_tail()}")
            _, body = await self.api.request("GET", "/agents", expect=200)
            connected = [a for a in body["agents"] if a["connected"]]
            if connected:
                return dict(connected[0])
            await asyncio.sleep(0.1)
        raise TimeoutError(f"agent did not connect:\n{self.agent.log_tail()}")

    # ------------------------------------------------------------ studios

    async def create_studio(self, name: str, *, auto_start: bool = True, **fields: Any) -> str:
        """POST /studios in this compute environment (`fields` join the body); the new
        session id."""
        assert self.api is not None
        body = {"name": name, "computeEnvId": self.compute_env_id, **fields}
        path = "/studios" if auto_start else "/studios?autoStart=false"
        _, answer = await self.api.request("POST", path, body, expect=200)
        sid = str(answer["studio"]["sessionId"])
        self.session_ids.add(sid)
        return sid

    async def start_studio(self, sid: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self.api is not None
        await self.api.request("PUT", f"/studios/{sid}/start", {}, expect=200)
        return await self.wait_running(sid, timeout)

    async def wait_running(self, sid: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for `running`; an `errored` studio fails at once with its message."""
        assert self.api is not None
        studio = await self.api.wait_status(sid, {"running", "errored"}, timeout=timeout)
        status = studio["statusInfo"]
        assert status["status"] == "running", (
            f"studio {sid} errored: {status.get('message')}\n{self.agent.log_tail()}"
        )
        return studio

    async def stop_studio(self, sid: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self.api is not None
        await self.api.request("PUT", f"/studios/{sid}/stop", expect=200)
        studio = await self.api.wait_status(sid, {"stopped", "errored"}, timeout=timeout)
        status = studio["statusInfo"]
        assert status["status"] == "stopped", (
            f"studio {sid} did not stop cleanly: {status.get('message')}\n{self.agent.log_tail()}"
        )
        return studio

    async def checkpoints(self, sid: str) -> list[dict[str, Any]]:
        """The studio's checkpoints, oldest first (by id: the catalogue's order of runs)."""
        assert self.api is not None
        _, body = await self.api.request("GET", f"/studios/{sid}/checkpoints?max=100", expect=200)
        return sorted(body["checkpoints"], key=lambda c: int(c["id"]))

    # ------------------------------------------------------------ clean-up

    async def close(self) -> None:
        if self.api is not None:
            # Stop what a failed test left running, so that its volume is released.
            if self.controller.alive() and any(agent.alive() for agent in self.agents):
                with_timeout = aiohttp.ClientTimeout(total=10)
                try:
                    _, listing = await self.api.request("GET", "/studios", timeout=with_timeout)
                except (aiohttp.ClientError, TimeoutError):
                    listing = {}
                for studio in listing.get("studios", []) if isinstance(listing, dict) else []:
                    self.session_ids.add(studio["sessionId"])
                    if studio["statusInfo"]["status"] in ("running", "starting"):
                        await self.api.request("PUT", f"/studios/{studio['sessionId']}/stop")
                        try:
                            await self.api.wait_status(
                                studio["sessionId"], {"stopped", "errored"}, timeout=60
                            )
                        except TimeoutError:
                            pass
            await self.api.close()
        for agent in self.agents:
            agent.stop()
        self.controller.stop()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        # Tools are started in their own process sessions so that they outlive an agent
        # restart, and containers outlive it by design: a test must not leave them behind.
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(self.tmp) in cmdline:
                proc.kill()
        if any(agent.runtime == "podman" for agent in self.agents) and shutil.which("podman"):
            from agent.runtime.podman import LABEL_SESSION

            for sid in self.session_ids:
                out = subprocess.run(
                    ["podman", "ps", "-aq", "--filter", f"label={LABEL_SESSION}={sid}"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                for cid in out.stdout.split():
                    subprocess.run(
                        ["podman", "rm", "-f", "-t", "0", cid], capture_output=True, check=False
                    )
        if os.geteuid() == 0:
            from agent.host_mounts import detach_mounts_under_sync

            detach_mounts_under_sync(self.tmp)
            for image in self.tmp.rglob("*.xfs"):
                out = subprocess.run(
                    ["losetup", "-j", str(image)], capture_output=True, text=True, check=False
                )
                for line in out.stdout.splitlines():
                    device = line.split(":", 1)[0]
                    subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
