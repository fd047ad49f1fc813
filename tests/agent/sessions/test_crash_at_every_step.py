"""The agent SIGKILLed at every step of a stop and of a start loses nothing.

Real processes: `studio-controller serve` and `studio-agent serve` (xfs-loop volumes; the
local runtime, then podman). The agent runs with the test-only crash hook
(`agent/crash_points.py`): the test names a step, triggers a stop or a start, waits for the
agent to die by SIGKILL at that step, starts a new agent on the same state directory, and
then checks, byte for byte after the next start, every file the studio ever had.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from agent import crash_points
from agent.runtime.local import LABEL_ENV
from agent.runtime.podman import LABEL_SESSION
from agent.volumes.xfs import XfsLoopVolume, mounted_source
from tests.agent_fixtures import kill_leftover_tools
from tests.e2e_harness import AgentProcess, ControllerProcess, RestClient
from tests.integration import require

pytestmark = [pytest.mark.e2e, pytest.mark.root]

IMAGE = os.environ.get("STUDIOS_TEST_IMAGE", "localhost/studios/busybox-httpd:1.36-0.1")
SOCKET = Path(os.environ.get("STUDIOS_PODMAN_SOCKET", "/run/podman/podman.sock"))

# In the order a stop passes them (agent/sessions.py `_stop`, agent/volume_xfs.py).
STOP_POINTS = [
    "stop:stopping-saved",
    "stop:tool-stopped",
    "final-checkpoint:committed",
    "final-checkpoint:recorded",
    "stop:reported",
    "release:unmounted",
    "stop:released",
]
# In the order a start passes them (agent/sessions.py `_start`, runtime_podman.start).
START_POINTS = [
    "start:starting-saved",
    "start:volume-prepared",
    "start:restored",
    "start:tool-recorded",
    "start:answered",
]


@dataclass
class Rig:
    tmp: Path
    controller: ControllerProcess
    api: RestClient
    agent: AgentProcess
    crash_file: Path
    session_id: str = ""
    expected: dict[str, str] = field(default_factory=dict)

    def restart_agent(self) -> None:
        self.agent.proc = None
        self.agent.start()

    async def wait_connected(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, agents = await self.api.request("GET", "/agents", expect=200)
            if any(a["connected"] for a in agents["agents"]):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"agent did not connect:\n{self.agent.log_tail()}")

    def root_dir(self) -> Path:
        [entry] = [s for s in self.agent.cli("sessions")["sessions"] if s["id"] == self.session_id]
        return Path(entry["rootDir"])

    def write(self, name: str, size: int) -> None:
        """A new file, and one more line in a file every step changes."""
        work = self.root_dir() / "work"
        work.mkdir(exist_ok=True)
        (work / name).write_bytes(os.urandom(size))
        with open(work / "steps.log", "a") as f:
            f.write(f"{name}\n")
        self.expected = _tree(work)

    def check(self, context: str) -> None:
        got = _tree(self.root_dir() / "work")
        differ = sorted(
            k for k in got.keys() | self.expected.keys() if got.get(k) != self.expected.get(k)
        )
        assert not differ, (
            f"{context}: the studio's files differ after the restart: {differ}\n"
            f"{self.agent.log_tail(60)}"
        )

    async def crash_at(self, point: str, action: str) -> None:
        """Arm the hook, trigger `action`, wait for the agent's SIGKILL at `point`."""
        self.crash_file.write_text(point)
        await self.api.request("PUT", f"/studios/{self.session_id}/{action}", {}, expect=200)
        assert self.agent.proc is not None
        try:
            code = await asyncio.to_thread(self.agent.proc.wait, 90)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the agent never reached {point}:\n{self.agent.log_tail()}"
            ) from None
        assert code == -signal.SIGKILL, f"{point}: agent exited {code}:\n{self.agent.log_tail()}"
        assert not self.crash_file.exists()
        self.restart_agent()
        await self.wait_connected()


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _tools_of(rig: Rig) -> list[str]:
    """Processes labelled as the studio's tools, and its containers."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if f"/{rig.session_id}/" in proc.environ().get(LABEL_ENV, ""):
                found.append(f"pid {proc.pid}")
    out = subprocess.run(
        ["podman", "ps", "-aq", "--filter", f"label={LABEL_SESSION}={rig.session_id}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found + [f"container {c}" for c in out.stdout.split()]


def _release_leftovers(state_dir: Path, session_id: str) -> None:
    """What a failed test may leave running or mounted (tools, containers, overlays, XFS
    volumes, loop devices): a running tool would keep its volume busy for ever."""
    kill_leftover_tools(state_dir)
    if session_id:
        out = subprocess.run(
            ["podman", "ps", "-aq", "--filter", f"label={LABEL_SESSION}={session_id}"],
            capture_output=True,
            text=True,
            check=False,
        )
        for cid in out.stdout.split():
            subprocess.run(["podman", "rm", "-f", "-t", "0", cid], capture_output=True, check=False)
    sessions = state_dir / "sessions"
    if not sessions.is_dir():
        return
    for path in [*sessions.glob("*/merged"), *sessions.glob("*/root")]:
        if mounted_source(path) is not None:
            subprocess.run(["umount", "-l", str(path)], check=False)
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in loops.splitlines():
        name, _, back = line.strip().partition(" ")
        if back.strip().startswith(str(sessions)):
            subprocess.run(["losetup", "-d", name], check=False)


@contextlib.asynccontextmanager
async def _rig(tmp: Path, runtime: str) -> AsyncIterator[Rig]:
    controller = ControllerProcess(tmp / "controller")
    controller.start()
    api: RestClient | None = None
    agent: AgentProcess | None = None
    rig: Rig | None = None
    try:
        await controller.wait_ready()
        api = RestClient(controller.url, controller.admin_token)
        env_id = await api.create_compute_env("crashes", tmp / "work")
        args = [
            "--runtime",
            runtime,
            "--volume-kind",
            "xfs-loop",
            "--stop-grace-seconds",
            "1",
            "--checkpoint-interval-seconds",
            "3600",
        ]
        agent = AgentProcess(controller, env_id, tmp / "agent", extra_args=args)
        crash_file = tmp / "crash-at"
        agent.env = {crash_points.ENV_VAR: str(crash_file)}
        agent.start()
        rig = Rig(tmp, controller, api, agent, crash_file)
        await rig.wait_connected()
        yield rig
    finally:
        if api is not None:
            await api.close()
        if agent is not None:
            agent.stop()
        controller.stop()
        _release_leftovers(tmp / "agent", rig.session_id if rig is not None else "")


async def _kill_at_every_step(rig: Rig, template: str, extra_start_points: list[str]) -> None:
    _, body = await rig.api.request(
        "POST",
        "/studios?autoStart=true",
        {
            "name": "crash test",
            "computeEnvId": rig.agent.argv[rig.agent.argv.index("--compute-env") + 1],
            "dataStudioToolUrl": template,
        },
        expect=200,
    )
    rig.session_id = body["studio"]["sessionId"]
    await rig.api.wait_status(rig.session_id, "running", timeout=90)
    for n, point in enumerate(STOP_POINTS):
        rig.write(f"before-{point.replace(':', '-')}.bin", (1 + n % 3) * 1024 * 1024)
        await rig.crash_at(point, "stop")
        studio = await rig.api.wait_status(rig.session_id, {"stopped", "errored"}, timeout=90)
        assert studio["statusInfo"]["status"] == "stopped", (point, studio["statusInfo"])
        await rig.api.request("PUT", f"/studios/{rig.session_id}/start", {}, expect=200)
        await rig.api.wait_status(rig.session_id, "running", timeout=90)
        rig.check(f"agent killed at {point}")
    for point in [*START_POINTS, *extra_start_points]:
        rig.write(f"before-{point.replace(':', '-')}.bin", 512 * 1024)
        await rig.api.request("PUT", f"/studios/{rig.session_id}/stop", {}, expect=200)
        await rig.api.wait_status(rig.session_id, "stopped", timeout=90)
        await rig.crash_at(point, "start")
        # The restarted agent errors the interrupted start and releases what it made.
        studio = await rig.api.wait_status(rig.session_id, {"errored", "running"}, timeout=90)
        assert studio["statusInfo"]["status"] == "errored", (point, studio["statusInfo"])
        assert "agent restarted during start" in studio["statusInfo"].get("message", "")
        await rig.api.request("PUT", f"/studios/{rig.session_id}/start", {}, expect=200)
        studio = await rig.api.wait_status(rig.session_id, {"running", "errored"}, timeout=90)
        assert studio["statusInfo"]["status"] == "running", (point, studio["statusInfo"])
        rig.check(f"agent killed at {point}")
    await rig.api.request("PUT", f"/studios/{rig.session_id}/stop", {}, expect=200)
    await rig.api.wait_status(rig.session_id, "stopped", timeout=90)
    # Nothing of the interrupted starts is left behind: no tool of the studio runs, and
    # neither its volume nor its overlay is mounted.
    assert _tools_of(rig) == []
    # The volume's release follows the `stopped` report within the same operation.
    session_dir = rig.agent.state_dir / "sessions" / rig.session_id
    for _ in range(300):
        if mounted_source(session_dir / "root") is None:
            break
        await asyncio.sleep(0.1)
    assert mounted_source(session_dir / "root") is None
    assert mounted_source(session_dir / "merged") is None


def _require_xfs() -> None:
    ok, why = XfsLoopVolume.available()
    require(ok, f"xfs-loop volumes: {why}")


async def test_local_runtime_agent_killed_at_every_step(tmp_path: Path) -> None:
    _require_xfs()
    async with _rig(tmp_path, "local") as rig:
        await _kill_at_every_step(rig, "studios/python-http:3.11-0.1", [])


async def test_podman_agent_killed_at_every_step(tmp_path: Path) -> None:
    _require_xfs()
    from agent.host import doctor_report

    podman = doctor_report("podman", "xfs-loop", SOCKET)["runtimes"][1]
    require(podman["usable"], f"podman runtime: {podman['reason']}")
    exists = subprocess.run(["podman", "image", "exists", IMAGE], check=False).returncode == 0
    require(exists, f"{IMAGE} (scripts/podman-setup)")
    async with _rig(tmp_path, "podman") as rig:
        await _kill_at_every_step(rig, IMAGE, ["podman:created"])


JUPYTERLAB = "localhost/studios/jupyterlab:4.6-0.1"
# A small PyPI package: the build is short, long enough to be killed in.
CRASH_ENVIRONMENT = "dependencies:\n  - pip:\n      - tomli-w==1.0.0\n"


def _forget_environment_image(template: str, text: str) -> None:
    """The image an earlier run built for this environment, removed: this run must build."""
    from agent.images.environment import (
        environment_hash,
        environment_reference,
        parse_environment,
    )

    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", template],
        capture_output=True,
        text=True,
        check=True,
    )
    env_hash = environment_hash(parse_environment(text), out.stdout.strip())
    reference = environment_reference(template, env_hash)
    subprocess.run(["podman", "rmi", "-f", reference], capture_output=True, check=False)


async def test_podman_agent_killed_mid_environment_build(tmp_path: Path) -> None:
    """SIGKILL while a custom environment builds: the restarted agent ends the orphaned
    build and builds again; the studio runs, never stuck in `building`."""
    _require_xfs()
    from agent.host import doctor_report

    podman = doctor_report("podman", "xfs-loop", SOCKET)["runtimes"][1]
    require(podman["usable"], f"podman runtime: {podman['reason']}")
    exists = subprocess.run(["podman", "image", "exists", JUPYTERLAB], check=False).returncode
    require(exists == 0, f"{JUPYTERLAB} (studio-agent images build jupyterlab)")
    _forget_environment_image(JUPYTERLAB, CRASH_ENVIRONMENT)
    async with _rig(tmp_path, "podman") as rig:
        _, body = await rig.api.request(
            "POST",
            "/studios?autoStart=false",
            {
                "name": "crash build",
                "computeEnvId": rig.agent.argv[rig.agent.argv.index("--compute-env") + 1],
                "dataStudioToolUrl": "studios/jupyterlab:4.6-0.1",
                "configuration": {"condaEnvironment": CRASH_ENVIRONMENT},
            },
            expect=200,
        )
        rig.session_id = body["studio"]["sessionId"]
        handle_path = rig.agent.state_dir / "sessions" / rig.session_id / "handle.json"
        rig.crash_file.write_text("start:building")
        await rig.api.request("PUT", f"/studios/{rig.session_id}/start", {}, expect=200)
        assert rig.agent.proc is not None
        code = await asyncio.to_thread(rig.agent.proc.wait, 120)
        assert code == -signal.SIGKILL, rig.agent.log_tail()
        handle = json.loads(handle_path.read_text())
        assert handle["status"] == "building" and handle["build_pid"] > 0, handle
        orphan = handle["build_pid"]
        rig.restart_agent()
        await rig.wait_connected()
        studio = await rig.api.wait_status(
            rig.session_id, {"running", "errored", "buildFailed"}, timeout=600
        )
        assert studio["statusInfo"]["status"] == "running", studio["statusInfo"]
        # The build the killed agent left was ended, not left to race the new one.
        assert not psutil.pid_exists(orphan) or (
            psutil.Process(orphan).create_time() != handle["build_create_time"]
        )
        _, build = await rig.api.request("GET", f"/studios/{rig.session_id}/build", expect=200)
        assert build["status"] == "succeeded" and build["image"], build
        await rig.api.request("PUT", f"/studios/{rig.session_id}/stop", {}, expect=200)
        await rig.api.wait_status(rig.session_id, "stopped", timeout=120)
    _forget_environment_image(JUPYTERLAB, CRASH_ENVIRONMENT)
