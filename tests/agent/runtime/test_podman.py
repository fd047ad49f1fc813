"""The podman runtime end to end: real containers on an agent-assembled overlay root on an
xfs-loop volume, driven through the agent by the fake controller; and its faults."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent, AgentConfig
from agent.errors import RuntimeStartError
from agent.host import doctor_report
from agent.runtime import BindMount, RuntimeOptions, StartSpec, free_tcp_port
from agent.runtime.podman import LABEL_OWNER, LABEL_SESSION, PodmanClient, PodmanRuntime
from agent.volumes.xfs import XfsLoopVolume, mounted_source
from tests import REPO_ROOT
from tests.agent.volumes.test_xfs import _force_cleanup
from tests.agent_fixtures import controller_fixture, make_agent_config  # noqa: F401
from tests.fake_controller import FakeController, desired
from tests.integration import require

IMAGE = os.environ.get("STUDIOS_TEST_IMAGE", "localhost/studios/busybox-httpd:1.36-0.1")
SOCKET = Path(os.environ.get("STUDIOS_PODMAN_SOCKET", "/run/podman/podman.sock"))
RUNNING = pb.SESSION_STATUS_RUNNING
STARTING = pb.SESSION_STATUS_STARTING
STOPPING = pb.SESSION_STATUS_STOPPING
STOPPED = pb.SESSION_STATUS_STOPPED
ERRORED = pb.SESSION_STATUS_ERRORED

# Test images built FROM the busybox one (offline): tools that misbehave.
VARIANTS = {
    "silent": '["sleep", "3600"]',
    "dies": '["/bin/sh", "-c", "busybox httpd -p $CONNECT_TOOL_PORT -h /www; sleep 3; exit 7"]',
    "stubborn": '["/bin/sh", "-c", "trap \\"\\" TERM; busybox httpd -f -p $CONNECT_TOOL_PORT"]',
}


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=False)


def _require_podman() -> None:
    ok, why = XfsLoopVolume.available()
    require(ok, f"xfs-loop volumes: {why}")
    report = doctor_report("podman", "xfs-loop", SOCKET)
    podman = report["runtimes"][1]
    require(podman["usable"], f"podman runtime: {podman['reason']}")
    require(_podman("image", "exists", IMAGE).returncode == 0, f"{IMAGE} (scripts/podman-setup)")


def _variant(name: str, tmp: Path) -> str:
    tag = f"localhost/studios/test-{name}:1"
    if _podman("image", "exists", tag).returncode != 0:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "Containerfile").write_text(f"FROM {IMAGE}\nCMD {VARIANTS[name]}\n")
        out = _podman("build", "-q", "-t", tag, str(tmp))
        assert out.returncode == 0, out.stderr
    return tag


def _containers(session_id: str) -> list[dict[str, object]]:
    out = _podman("ps", "-a", "--format", "json", "--filter", f"label={LABEL_SESSION}={session_id}")
    containers: list[dict[str, object]] = json.loads(out.stdout or "[]")
    return containers


def _cleanup(state_dir: Path) -> None:
    # Only this test's agent's containers and networks: another test process on the
    # host (or a concurrent CI run) keeps its own.
    try:
        owner = (state_dir / "agent-id").read_text().strip()
    except FileNotFoundError:
        owner = ""
    if owner:
        label = f"label={LABEL_OWNER}={owner}"
        out = _podman("ps", "-aq", "--filter", label)
        for cid in out.stdout.split():
            _podman("rm", "-f", "-t", "0", cid)
        # Each session's own network (`--podman-network bridge`) goes with its container.
        out = _podman("network", "ls", "-q", "--filter", label)
        for name in out.stdout.split():
            _podman("network", "rm", "-f", name)
    sessions = state_dir / "sessions"
    if sessions.is_dir():
        for merged in sessions.glob("*/merged"):
            if mounted_source(merged) is not None:
                subprocess.run(["umount", "-l", str(merged)], check=False)
        _force_cleanup(sessions)


def _config(tmp_path: Path, controller: FakeController, **kw: object) -> AgentConfig:
    return make_agent_config(
        tmp_path,
        controller,
        runtime="podman",
        volume_kind="xfs-loop",
        podman_socket=SOCKET,
        podman_runtime="runc",
        container_ulimits=("nofile=1024:1024", "nproc=1024:1024"),
        **kw,
    )


@pytest.fixture(name="pconfig")
def pconfig_fixture(tmp_path: Path, controller: FakeController) -> Iterator[AgentConfig]:
    _require_podman()
    config = _config(tmp_path, controller)
    yield config
    _cleanup(config.state_dir)


def _get(port: int, path: str = "/index.html") -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return bytes(resp.read())


async def test_studio_runs_in_a_container_and_opt_lands_in_the_upper_dir(
    controller: FakeController, pconfig: AgentConfig
) -> None:
    async with _agent(pconfig) as agent:
        d = desired("cccc0001", image=IMAGE, environment={"GREETING": "hi"})
        d.spec.cpu, d.spec.memory_mib = 1, 256
        controller.push(d)
        obs = await controller.wait_status("cccc0001", RUNNING, timeout=60)
        assert obs.runtime == "podman" and obs.volume.volume_kind == pb.VOLUME_KIND_XFS_LOOP
        assert _get(obs.tool_port) == b"studios busybox httpd\n"
        [container] = _containers("cccc0001")
        cid = str(container["Id"])
        # What the tool sees as / is the merged overlay, reported as rootDir.
        assert obs.root_dir.endswith("/cccc0001/merged") and mounted_source(Path(obs.root_dir))
        out = _podman("exec", cid, "sh", "-c", "echo from-inside > /opt/hello && env")
        assert out.returncode == 0, out.stderr
        assert "GREETING=hi" in out.stdout and f"CONNECT_TOOL_PORT={obs.tool_port}" in out.stdout
        # The tool gets the run's proxy secret (an image's tool checks it on every
        # request: issue 13); what users read shows neither it nor the port.
        assert agent.manager is not None
        handle = agent.manager.get("cccc0001")
        assert handle is not None and len(handle.proxy_secret) >= 43
        assert f"CONNECT_PROXY_SECRET={handle.proxy_secret}\n" in out.stdout
        seen = [obs.message, *(s.message for s in obs.progress)]
        assert obs.message == "python-http is answering"
        assert not [m for m in seen if re.search(rf"\bport\b|\b{obs.tool_port}\b", m)], seen
        assert not [m for m in seen if handle.proxy_secret in m], seen
        upper = Path(obs.volume.path) / "upper"
        assert (upper / "opt" / "hello").read_text() == "from-inside\n"
        # On the session volume (the XFS mount), not on the host's disk.
        assert os.stat(upper).st_dev == os.stat(obs.volume.path).st_dev
        inspect = json.loads(_podman("inspect", cid).stdout)[0]
        assert inspect["HostConfig"]["Memory"] == 256 * 1024 * 1024
        assert inspect["HostConfig"]["CpuQuota"] == 100_000
        assert inspect["Config"]["Labels"]["studios.generation"] == "1"
        assert agent.manager is not None
        assert agent.manager.runtime.checkpoint_dir(Path(obs.volume.path)) == upper

        controller.push(desired("cccc0001", status=pb.DESIRED_STATUS_STOPPED))
        await controller.wait_status("cccc0001", STOPPED, timeout=60)
        assert _containers("cccc0001") == []
        assert mounted_source(Path(obs.root_dir)) is None
        # The volume's release follows the `stopped` report, reported without a volume.
        await controller.wait_for(
            lambda: (
                (o := controller.latest("cccc0001")) and o.status == STOPPED and not o.volume.path
            )
        )
        assert mounted_source(Path(obs.volume.path)) is None


async def test_agent_restart_keeps_the_session_without_a_duplicate(
    controller: FakeController, pconfig: AgentConfig
) -> None:
    async with _agent(pconfig):
        controller.push(desired("cccc0002", image=IMAGE))
        obs = await controller.wait_status("cccc0002", RUNNING, timeout=60)
    # The agent is gone; the container is not.
    assert _get(obs.tool_port)
    [before] = _containers("cccc0002")
    async with _agent(pconfig):
        await controller.wait_for(lambda: len(controller.messages("inventory")) >= 2)
        inv = controller.messages("inventory")[-1]
        [sess] = [s for s in inv.sessions if s.session_id == "cccc0002"]
        assert sess.status == RUNNING
        controller.push(desired("cccc0002", image=IMAGE), full=True)
        await asyncio.sleep(1.5)
        [after] = _containers("cccc0002")
        assert after["Id"] == before["Id"] and _get(obs.tool_port)
        latest = controller.latest("cccc0002")
        assert latest is not None and latest.status == RUNNING


async def test_image_missing_errors_with_podmans_message(
    controller: FakeController, pconfig: AgentConfig
) -> None:
    async with _agent(pconfig):
        controller.push(desired("cccc0003", image="localhost/studios/no-such-image:0"))
        obs = await controller.wait_status("cccc0003", ERRORED, timeout=60)
        assert "cannot pull image localhost/studios/no-such-image:0" in obs.message
        # Images of the project are built on the host, never pulled: the message says how.
        assert "studio-agent images build localhost/studios/no-such-image:0" in obs.message
        assert not (pconfig.state_dir / "sessions" / "cccc0003" / "root.xfs").exists()


async def test_podman_socket_down(
    tmp_path: Path, controller: FakeController, pconfig: AgentConfig
) -> None:
    pconfig.podman_socket = tmp_path / "no-podman.sock"
    async with _agent(pconfig):
        controller.push(desired("cccc0004", image=IMAGE))
        obs = await controller.wait_status("cccc0004", ERRORED, timeout=60)
        assert "does not answer" in obs.message and "no-podman.sock" in obs.message
        assert not (pconfig.state_dir / "sessions" / "cccc0004" / "root.xfs").exists()


async def test_tool_never_opens_its_port(
    tmp_path: Path, controller: FakeController, pconfig: AgentConfig
) -> None:
    image = _variant("silent", tmp_path / "silent")
    pconfig.start_timeout_seconds = 3
    async with _agent(pconfig):
        controller.push(desired("cccc0005", image=image))
        obs = await controller.wait_status("cccc0005", ERRORED, timeout=60)
        assert "did not answer" in obs.message
        assert _containers("cccc0005") == []
        assert not (pconfig.state_dir / "sessions" / "cccc0005" / "root.xfs").exists()
        assert mounted_source(pconfig.state_dir / "sessions" / "cccc0005" / "merged") is None


async def test_container_dies_while_running(
    tmp_path: Path, controller: FakeController, pconfig: AgentConfig
) -> None:
    image = _variant("dies", tmp_path / "dies")
    async with _agent(pconfig):
        controller.push(desired("cccc0006", image=image))
        await controller.wait_status("cccc0006", RUNNING, timeout=60)
        obs = await controller.wait_status("cccc0006", ERRORED, timeout=60)
        assert "status 7" in obs.message and obs.exited and obs.exit_code == 7
        await controller.wait_for(lambda: _containers("cccc0006") == [])


async def test_agent_killed_mid_start(
    tmp_path: Path, controller: FakeController, pconfig: AgentConfig
) -> None:
    image = _variant("silent", tmp_path / "silent")
    async with _agent(pconfig):
        controller.push(desired("cccc0007", image=image))
        await controller.wait_for(
            lambda: any(
                p.name == "waiting for the tool to answer"
                and p.status == pb.STEP_STATUS_IN_PROGRESS
                for p in (controller.latest("cccc0007") or pb.SessionObserved()).progress
            ),
            timeout=60,
        )
    # As after SIGKILL: a handle saying "starting", a container, mounts.
    assert _containers("cccc0007")
    async with _agent(pconfig):
        obs = await controller.wait_status("cccc0007", ERRORED, timeout=60)
        assert "agent restarted during start" in obs.message
        assert _containers("cccc0007") == []
        assert not (pconfig.state_dir / "sessions" / "cccc0007" / "root.xfs").exists()


async def test_agent_killed_mid_stop(
    tmp_path: Path, controller: FakeController, pconfig: AgentConfig
) -> None:
    image = _variant("stubborn", tmp_path / "stubborn")
    pconfig.stop_grace_seconds = 30
    async with _agent(pconfig):
        controller.push(desired("cccc0008", image=image))
        await controller.wait_status("cccc0008", RUNNING, timeout=60)
        controller.push(desired("cccc0008", status=pb.DESIRED_STATUS_STOPPED))
        await controller.wait_status("cccc0008", STOPPING, timeout=30)
    pconfig.stop_grace_seconds = 1
    async with _agent(pconfig):
        await controller.wait_status("cccc0008", STOPPED, timeout=60)
        assert _containers("cccc0008") == []


class _agent:
    def __init__(self, config: AgentConfig) -> None:
        self.agent = Agent(config)

    async def __aenter__(self) -> Agent:
        await self.agent.start()
        return self.agent

    async def __aexit__(self, *exc: object) -> None:
        # close() leaves containers running, like a SIGKILLed agent leaves them.
        await self.agent.close()


def test_podman_setup_script_is_idempotent() -> None:
    """`start` twice: the second finds the service answering and the image present.

    On a service of its own (a short socket path of its own, stopped at the end), never the
    host's shared one: `start` there, were the shared service slow to answer its 2 s ping
    (a loaded machine), deleted its socket and started a replacement in this test's process
    group, which died with that group and left the shared socket answering nowhere."""
    _require_podman()
    script = REPO_ROOT / "scripts" / "podman-setup"
    own = Path(tempfile.mkdtemp(prefix="studios-podman-"))
    env = dict(os.environ, STUDIOS_PODMAN_SOCKET=str(own / "podman.sock"))

    def setup(command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), command],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=600,
            check=False,
        )

    try:
        first = setup("start", STUDIOS_SKIP_STUDIO_IMAGES="1")
        assert first.returncode == 0, first.stderr
        assert "starting podman system service" in first.stdout, first.stdout
        again = setup("start")
        assert again.returncode == 0, again.stderr
        assert "already answers" in again.stdout and "present" in again.stdout, again.stdout
    finally:
        setup("stop")
        deadline = time.monotonic() + 30
        while setup("status").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(own, ignore_errors=True)
    assert setup("status").returncode != 0, "the test's own podman service still answers"


def test_doctor_names_the_network_backend_that_isolates_sessions() -> None:
    _require_podman()
    bridge = doctor_report("podman", "xfs-loop", SOCKET)["runtimes"][1]
    assert "network backend netavark" in bridge["reason"], bridge
    host = doctor_report("podman", "xfs-loop", SOCKET, podman_network="host")["runtimes"][1]
    assert "netavark" not in host["reason"], host


def test_doctor_refuses_bridge_sessions_on_a_cni_podman(tmp_path: Path) -> None:
    # A podman with CNI cannot be installed beside this host's netavark one: a socket
    # that answers the ping and the info call as such a podman would stands in for it.
    sock_path = tmp_path / "podman.sock"
    info = json.dumps({"host": {"networkBackend": "cni"}}).encode()

    def serve(server: socket.socket) -> None:
        for _ in range(2):
            conn, _addr = server.accept()
            with conn:
                request = conn.recv(4096)
                body = b"OK" if b"/_ping" in request else info
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock_path))
        server.listen()
        thread = threading.Thread(target=serve, args=(server,), daemon=True)
        thread.start()
        podman = doctor_report("podman", None, sock_path)["runtimes"][1]
        thread.join(timeout=10)
    assert podman["name"] == "podman" and not podman["usable"]
    assert "network backend is cni, not netavark" in podman["reason"], podman
    assert "--podman-network host" in podman["reason"]


# ------------------------------------------------------------ the runtime itself (issue 18)


class _CountingClient(PodmanClient):
    """The real client, counting the image inspections it makes."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(socket_path)
        self.inspections = 0

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        if method == "GET" and path.startswith("/images/"):
            self.inspections += 1
        return await super().request(method, path, **kw)


@pytest.fixture(name="runtime")
def runtime_fixture(request: pytest.FixtureRequest) -> Iterator[PodmanRuntime]:
    _require_podman()
    network = getattr(request, "param", "bridge")
    rt = PodmanRuntime(
        RuntimeOptions(
            podman_socket=SOCKET,
            oci_runtime="runc",
            ulimits=("nofile=1024:1024", "nproc=1024:1024"),
            podman_network=network,
        )
    )
    rt.owner = f"test-runtime-{os.getpid()}-{secrets.token_hex(4)}"
    rt.client = _CountingClient(SOCKET)
    yield rt
    label = f"label={LABEL_OWNER}={rt.owner}"
    for cid in _podman("ps", "-aq", "--filter", label).stdout.split():
        _podman("rm", "-f", "-t", "0", cid)
    for name in _podman("network", "ls", "-q", "--filter", label).stdout.split():
        _podman("network", "rm", "-f", name)


def _spec(tmp_path: Path, session_id: str, image: str = IMAGE, **kw: Any) -> StartSpec:
    root = tmp_path / session_id / "root"
    root.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / session_id / "log"
    return StartSpec(session_id, image, "httpd", {}, root, log_path, free_tcp_port(), **kw)


async def _answer(port: int, path: str = "/index.html") -> bytes:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            return await asyncio.to_thread(_get, port, path)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def _network_exists(name: str) -> bool:
    return _podman("network", "exists", name).returncode == 0


def _image_id(reference: str) -> str:
    out = _podman("image", "inspect", "--format", "{{.Id}}", reference)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _build_page(context: Path, tag: str, page: str) -> str:
    """An image FROM the test image serving `page`, tagged `tag`; its id."""
    context.mkdir(parents=True, exist_ok=True)
    (context / "index.html").write_text(page)
    (context / "Containerfile").write_text(f"FROM {IMAGE}\nCOPY index.html /www/index.html\n")
    out = _podman("build", "-q", "--pull=never", "-t", tag, str(context))
    assert out.returncode == 0, out.stderr
    return _image_id(tag)


async def test_an_image_rebuilt_or_retagged_under_its_name_starts_with_its_new_layers(
    tmp_path: Path, runtime: PodmanRuntime
) -> None:
    tag = f"localhost/studios/test-cache-{os.getpid()}-{secrets.token_hex(3)}:1"
    client = runtime.client
    assert isinstance(client, _CountingClient)
    built = [_build_page(tmp_path / "one", tag, "one\n")]
    try:

        async def page(session_id: str) -> bytes:
            h = await runtime.start(_spec(tmp_path, session_id, tag))
            try:
                return await _answer(h.port)
            finally:
                await runtime.destroy(h)

        assert await page("cache001") == b"one\n"
        assert await page("cache002") == b"one\n"
        # The image store unchanged: the inspection kept is used, podman is not asked.
        inspections = client.inspections
        assert await page("cache003") == b"one\n"
        assert client.inspections == inspections
        # Rebuilt under the same name: the next start runs the new layers.
        built.append(_build_page(tmp_path / "two", tag, "two\n"))
        assert built[1] != built[0]
        assert await page("cache004") == b"two\n"
        # The name moved back to the first image (a retag): its layers again.
        assert _podman("tag", built[0], tag).returncode == 0
        assert await page("cache005") == b"one\n"
    finally:
        _podman("rmi", "-f", *built)


async def test_a_create_failing_after_the_mount_and_network_leaves_nothing(
    tmp_path: Path, runtime: PodmanRuntime
) -> None:
    missing = tmp_path / "no-such-dir"
    spec = _spec(tmp_path, "fail0001", mounts=(BindMount(missing, "/workspace/data/x"),))
    merged = runtime.merged_dir(spec.root_dir)
    with pytest.raises(RuntimeStartError, match=re.escape(str(missing))):
        await runtime.start(spec)
    # The mount and the network were made (the create needs both) and are gone again.
    assert (spec.root_dir / "upper").is_dir() and merged.is_dir()
    assert mounted_source(merged) is None
    assert _containers("fail0001") == []
    assert not _network_exists(runtime.network_name("fail0001"))


@pytest.mark.parametrize("runtime", ["bridge", "host"], indirect=True)
async def test_a_start_over_a_crashed_starts_leftovers_replaces_them(
    tmp_path: Path, runtime: PodmanRuntime
) -> None:
    # A start whose handle was lost (the agent killed before saving it): its container,
    # network and mount are in the way of the session's next start.
    first = await runtime.start(_spec(tmp_path, "left0001"))
    assert await _answer(first.port)
    [before] = _containers("left0001")
    again = await runtime.start(_spec(tmp_path, "left0001"))
    try:
        [after] = _containers("left0001")
        assert after["Id"] != before["Id"] and after["Id"] == again.data["container_id"]
        assert await _answer(again.port) == b"studios busybox httpd\n"
        assert again.pid > 0 and mounted_source(Path(again.root_dir)) is not None
    finally:
        await runtime.destroy(again)
    assert _containers("left0001") == []
    assert not _network_exists(runtime.network_name("left0001"))
    assert mounted_source(Path(again.root_dir)) is None


async def test_the_overlay_mount_outlasts_podman_commands_running_beside_it(
    tmp_path: Path, runtime: PodmanRuntime
) -> None:
    # Each podman command bind-mounts podman's overlay directory on itself while it runs;
    # a mount whose lower dirs are looked up as one of them exits failed with EINVAL
    # (about 1 in 400 mounts here with `podman images` in a loop beside them).
    layers = runtime.image_layers(await runtime.image(IMAGE))
    stop = threading.Event()

    def podman_commands() -> None:
        while not stop.is_set():
            _podman("images", "-q")

    thread = threading.Thread(target=podman_commands)
    thread.start()
    mounts = 0
    try:
        deadline = asyncio.get_running_loop().time() + 8
        while asyncio.get_running_loop().time() < deadline:
            merged = await runtime.mount_rootfs(tmp_path / "root", layers)
            assert mounted_source(merged) is not None
            await runtime.unmount_rootfs(merged)
            mounts += 1
    finally:
        stop.set()
        thread.join()
    assert mounts > 100 and mounted_source(merged) is None
