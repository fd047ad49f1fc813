"""The pieces of tests/bench/bench_images.py: what answers for each studio image, one
create through a real agent's proxy, one bare `podman run`, image sizes, warm builds, and
cold builds in a temporary podman storage (so that the shared localhost/studios/* images and
their layer cache are neither used nor touched)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.images.builder import build_images, image_states, inspect_image
from agent.images.definitions import ImageDefinition
from agent.runtime import free_tcp_port
from agent.runtime.tool_guard import PROXY_SECRET_ENV, PROXY_SECRET_HEADER, USER_HEADER
from studios_shared.connect_token import sign_connect_token
from tests.agent.runtime.test_podman import _cleanup
from tests.agent_fixtures import make_agent_config
from tests.fake_controller import FakeController, desired

__all__ = [
    "DEFAULT_SOCKET",
    "TARGETS",
    "ImageTarget",
    "bare_podman_run",
    "cold_builds",
    "create_through_the_proxy",
    "image_sizes",
    "podman_agent",
    "podman_service",
    "summary",
    "warm_build",
]

DEFAULT_SOCKET = Path(os.environ.get("STUDIOS_PODMAN_SOCKET", "/run/podman/podman.sock"))
# Every wait for a tool: its own start is seconds, more on a loaded 2-core host.
ANSWER_TIMEOUT_S = 180.0
STORAGE_CONF_ENV = "CONTAINERS_STORAGE_CONF"


@dataclass(frozen=True, slots=True)
class ImageTarget:
    """A catalogue template and the request that shows its tool answering."""

    name: str  # the image definition's name (images/<name>)
    template: str  # the catalogue's repository, as the controller sends it
    tool: str
    path: str  # a GET that answers 200 once the tool serves its UI


# The readiness paths are the ones the image tests check (tests/agent/runtime/test_podman_*).
TARGETS = (
    ImageTarget("jupyterlab", "studios/jupyterlab:4.6-0.1", "jupyter", "/api/status"),
    ImageTarget("code-server", "studios/code-server:4.139-0.1", "vscode", "/healthz"),
    # The R IDE is JupyterLab with the R kernel: its page is the lab's.
    ImageTarget("r-ide", "studios/r-ide:4.2-0.1", "r-ide", "/lab"),
    # Xpra's HTML5 client page.
    ImageTarget("xpra", "studios/xpra:3.1-0.1", "xpra", "/"),
)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
    }


async def _first_200(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    t0: float,
    failed: Callable[[], str] = lambda: "",
) -> float:
    """Seconds from t0 to the first 200 of `url`; `failed` names a failure (the session
    errored) that ends the wait early."""
    while time.monotonic() - t0 < ANSWER_TIMEOUT_S:
        if why := failed():
            raise RuntimeError(why)
        try:
            # No redirects: the path itself must answer (a redirect to a login page would
            # otherwise count as the tool answering).
            async with http.get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 in {ANSWER_TIMEOUT_S:g} s")


def _answers(sock_path: Path) -> bool:
    """podman's REST API answers its ping on the socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(sock_path))
            sock.sendall(b"GET /v4.0.0/libpod/_ping HTTP/1.1\r\nHost: d\r\n\r\n")
            return sock.recv(64).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


@contextmanager
def podman_service(wanted: Path, scratch: Path) -> Iterator[tuple[Path, str]]:
    """The podman REST API the agent talks to: `wanted` when it answers, else a service of
    this run's own on a socket in `scratch` (stopped on the way out; the host's shared
    socket is left to scripts/podman-setup). Yields the socket and what was done."""
    if _answers(wanted):
        yield wanted, f"the host's service on {wanted}"
        return
    own = scratch / "podman.sock"
    env = {k: v for k, v in os.environ.items() if k != STORAGE_CONF_ENV}
    with open(scratch / "podman-service.log", "wb") as log:
        service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{own}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 20
        while not _answers(own):
            if service.poll() is not None or time.monotonic() > deadline:
                said = (scratch / "podman-service.log").read_text(errors="replace")
                raise RuntimeError(
                    f"podman system service on {own} did not answer in 20 s; it said: "
                    f"{said.strip()[-2000:] or 'nothing'}"
                )
            time.sleep(0.1)
        yield own, f"nothing answered on {wanted}: a service of this run's own on {own}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


@asynccontextmanager
async def podman_agent(
    work: Path, podman_socket: Path
) -> AsyncIterator[tuple[Agent, FakeController]]:
    """A real agent (podman runtime, xfs-loop volumes, bridge network: the defaults a host
    runs) behind a fake controller; its containers are removed on the way out."""
    controller = FakeController()
    await controller.start()
    config = make_agent_config(
        work,
        controller,
        runtime="podman",
        volume_kind="xfs-loop",
        podman_socket=podman_socket,
        podman_runtime="runc",
        container_ulimits=("nofile=1024:1024", "nproc=1024:1024"),
        start_timeout_seconds=ANSWER_TIMEOUT_S - 30,
    )
    agent = Agent(config)
    try:
        await agent.start()
        yield agent, controller
    finally:
        await agent.close()
        await controller.stop()
        _cleanup(config.state_dir)


async def create_through_the_proxy(
    agent: Agent,
    controller: FakeController,
    http: aiohttp.ClientSession,
    target: ImageTarget,
    sid: str,
) -> tuple[float, float]:
    """(create -> the tool's path answers 200 through the agent's proxy, stop -> stopped):
    the first from the desired state's push, as a controller's create reaches the agent."""
    cookie = sign_connect_token(
        controller.key,
        session_id=sid,
        user_id=7,
        user_name="alice",
        ttl_seconds=600,
        purpose="cookie",
    )
    headers = {
        "Host": f"{sid}.localhost:{agent.proxy_port}",
        "Cookie": f"studios-connect={cookie}",
    }
    d = desired(sid, image=target.template)
    d.spec.tool = target.tool

    def errored() -> str:
        obs = controller.latest(sid)
        if obs is not None and obs.status == pb.SESSION_STATUS_ERRORED:
            return f"session {sid} ({target.template}) errored: {obs.message}"
        return ""

    t0 = time.monotonic()
    controller.push(d)
    try:
        url = f"http://127.0.0.1:{agent.proxy_port}{target.path}"
        answered = await _first_200(http, url, headers, t0, errored)
    finally:
        t1 = time.monotonic()
        controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED))
        try:
            await controller.wait_status(sid, pb.SESSION_STATUS_STOPPED, timeout=120)
        except AssertionError:
            # The fake controller's timeout: named here, the cause of a failed start
            # (raised above, if any) stays the one reported.
            raise RuntimeError(f"session {sid} did not stop in 120 s") from None
    return answered, time.monotonic() - t1


async def bare_podman_run(http: aiohttp.ClientSession, target: ImageTarget, image: str) -> float:
    """`podman run -d` of the image (its own command, user and environment, the default
    bridge network, the port published on 127.0.0.1) -> the same path answers 200 on the
    published port, with the secret and user headers the proxy would send."""
    port = free_tcp_port()
    headers = {PROXY_SECRET_HEADER: "bench", USER_HEADER: "alice"}
    argv = ["podman", "run", "-d", "--rm", "-e", f"CONNECT_TOOL_PORT={port}"]
    argv += ["-e", f"{PROXY_SECRET_ENV}=bench", "-p", f"127.0.0.1:{port}:{port}", image]
    t0 = time.monotonic()
    started = subprocess.run(argv, capture_output=True, text=True, check=False)
    if started.returncode != 0:
        raise RuntimeError(f"podman run {image} failed: {started.stderr.strip()}")
    try:
        return await _first_200(http, f"http://127.0.0.1:{port}{target.path}", headers, t0)
    finally:
        subprocess.run(
            ["podman", "rm", "-f", "-t", "0", started.stdout.strip()],
            capture_output=True,
            check=False,
        )


def _mb(size: int) -> float:
    return round(size / 1e6, 1)


def image_sizes(definitions: dict[str, ImageDefinition]) -> dict[str, dict[str, object]]:
    """podman's size of each image and its own bytes over its parent. An image's layers
    are its parent's plus its own, and podman's size is the sum of its layers, so the
    difference is what this image alone adds to the host's storage."""
    inspected = {n: inspect_image(d.reference) for n, d in definitions.items()}
    out: dict[str, dict[str, object]] = {}
    for name, d in definitions.items():
        image = inspected[name]
        if image is None:
            out[name] = {"error": f"{d.reference} is not built (studio-agent images build {name})"}
            continue
        size = int(image.get("Size") or 0)
        layers = list((image.get("RootFS") or {}).get("Layers") or [])
        row: dict[str, object] = {"reference": d.reference, "size_mb": _mb(size)}
        parent = inspected.get(d.parent or "") if d.parent_is_definition else None
        if parent is not None:
            parent_layers = list((parent.get("RootFS") or {}).get("Layers") or [])
            row["parent"] = d.parent
            row["own_mb"] = _mb(size - int(parent.get("Size") or 0))
            row["own_layers"] = len(layers) - len(parent_layers)
            # A parent rebuilt since this image was: the difference then means nothing.
            row["parent_layers_shared"] = layers[: len(parent_layers)] == parent_layers
        else:
            row["own_mb"] = _mb(size)
            row["own_layers"] = len(layers)
        out[name] = row
    return out


def warm_build(definitions: dict[str, ImageDefinition]) -> dict[str, object]:
    """`images build` of every image with nothing changed: hashing and inspecting only.
    An image that is not current (someone changed its definition, or it is missing) is
    left out: building it would retag an image other people's test runs use."""
    # Only each definition's own row: other images with its label (superseded by a
    # rebuild, or derived from it) follow under the same name.
    references = {d.reference: n for n, d in definitions.items()}
    states = {
        references[str(r["reference"])]: str(r["state"])
        for r in image_states(definitions)
        if str(r["reference"]) in references
    }
    current = [n for n in definitions if states.get(n) == "current"]
    # An image is built FROM its ancestors: all of them must be current too.
    current = [n for n in current if _ancestors(definitions, n) <= set(current)]
    result: dict[str, object] = {}
    skipped = {n: states.get(n, "missing") for n in definitions if n not in current}
    if skipped:
        result["left_out_not_current"] = skipped
    # The host lock may be held by another build (other people's tests build images):
    # the wait for it is not the build's own time.
    events: list[tuple[float, str]] = []

    def on_event(name: str, event: str, text: str) -> None:
        if event == "state":
            events.append((time.monotonic(), text))

    t0 = time.monotonic()
    done = build_images(definitions, current, on_event=on_event)
    total = time.monotonic() - t0
    waited = 0.0
    if len(events) > 1 and events[0][1].startswith("waiting for another image build"):
        waited = events[1][0] - events[0][0]
    result["total_s"] = round(total - waited, 2)
    result["waited_for_host_lock_s"] = round(waited, 1)
    result["statuses"] = {r.name: r.status for r in done}
    return result


def _ancestors(definitions: dict[str, ImageDefinition], name: str) -> set[str]:
    out: set[str] = set()
    d = definitions[name]
    while d.parent is not None and d.parent_is_definition:
        out.add(d.parent)
        d = definitions[d.parent]
    return out


def _mounts_under(paths: Sequence[Path]) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    roots = [str(p) for p in paths]
    return [m for m in points if any(m == r or m.startswith(r + "/") for r in roots)]


@contextmanager
def temporary_storage() -> Iterator[tuple[Path, dict[str, str]]]:
    """A podman storage of its own (graph root under /var/tmp, run root under /run) for
    this process's podman calls while inside: `CONTAINERS_STORAGE_CONF` points at it, and
    the builder's podman and mmdebstrap subprocesses inherit it. Yields the root and the
    environment that still reaches the host's shared storage. Removed on the way out."""
    root = Path(tempfile.mkdtemp(prefix="studios-bench-storage-", dir="/var/tmp"))
    run_root = Path("/run") / root.name
    conf = root / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\nrunroot = "{run_root}"\n'
    )
    shared_env = {k: v for k, v in os.environ.items() if k != STORAGE_CONF_ENV}
    before = os.environ.get(STORAGE_CONF_ENV)
    os.environ[STORAGE_CONF_ENV] = str(conf)
    try:
        yield root, shared_env
    finally:
        if before is None:
            os.environ.pop(STORAGE_CONF_ENV, None)
        else:
            os.environ[STORAGE_CONF_ENV] = before
        # Innermost first; the overlay driver may leave a layer mounted after a failure.
        for point in sorted(_mounts_under([root, run_root]), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(run_root, ignore_errors=True)


def _copy_image(reference: str, shared_env: dict[str, str]) -> None:
    """podman save from the shared storage | podman load into the temporary one: the same
    image id and labels (the build hash), so the builder finds it current."""
    save = subprocess.Popen(
        ["podman", "save", reference],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=shared_env,
    )
    assert save.stdout is not None
    load = subprocess.run(["podman", "load"], stdin=save.stdout, capture_output=True, check=False)
    save.stdout.close()
    _, save_err = save.communicate()
    if save.returncode != 0 or load.returncode != 0:
        err = (save_err or load.stderr).decode(errors="replace").strip()
        raise RuntimeError(f"copying {reference} into the benchmark's storage failed: {err}")


def cold_builds(definitions: dict[str, ImageDefinition], names: Sequence[str]) -> dict[str, object]:
    """Build `names` with no layer cache: in a temporary podman storage holding only the
    ancestors that are not rebuilt (copied from the shared storage, not timed), each named
    image forced. Nothing of the shared storage is reused, tagged or removed."""
    cold = set(names)
    keep = sorted(set().union(*(_ancestors(definitions, n) for n in names)) - cold)
    result: dict[str, object] = {
        "how": (
            "built in a temporary podman storage (CONTAINERS_STORAGE_CONF, graph root under "
            "/var/tmp, removed afterwards) with the parents that are not rebuilt copied in by "
            "podman save | podman load, so no layer of the shared storage is reused and "
            "localhost/studios/* is neither retagged nor removed"
        ),
        "parents_copied": keep,
    }
    with temporary_storage() as (root, shared_env):
        t0 = time.monotonic()
        for name in _in_build_order(definitions, keep):
            _copy_image(definitions[name].reference, shared_env)
        result["parents_copy_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        done = build_images(
            definitions,
            list(names),
            force=list(names),
            log_dir=root / "logs",
            # Its own lock: these builds tag nothing in the shared storage, so they need
            # not wait for (nor hold up) other builds on the host.
            lock_path=root / "build.lock",
        )
        result["total_s"] = round(time.monotonic() - t0, 1)
        per_image: dict[str, object] = {}
        for r in done:
            row: dict[str, object] = {"status": r.status, "seconds": r.seconds}
            if r.size:
                row["size_mb"] = _mb(r.size)
            if r.message:
                row["error"] = r.message
            per_image[r.name] = row
        result["images"] = per_image
    return result


def _in_build_order(definitions: dict[str, ImageDefinition], names: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: len(_ancestors(definitions, n)))
