"""The `podman` runtime: real containers through podman's libpod REST API on its socket.

The agent assembles each session's root file system itself: an overlay whose lower
layers are the image's (from the image's GraphDriver data) and whose upper and work
directories live on the session volume, mounted with mount(2) itself (no mount(8) to fork
on every start) while the session's network is created. An image's inspection is kept
until podman's image store changes (`_ImageCache`), and a crashed earlier start's
container or network is removed only when its name turns out to be taken; so a start asks
podman for the network, the container's create and start and the container's pid, no
more (tests/bench/bench_podman.py --steps). The container runs on the merged directory
(`rootfs`), so every change the tool makes to `/` lands in `<volume>/upper`, which is
what checkpoints read (`checkpoint_dir`). With `rootfs` podman applies none of the
image's configuration, so the command, environment and working directory are taken
from the image and passed explicitly; the agent's own variables (CONNECT_TOOL_PORT and
CONNECT_PROXY_SECRET, which an image's tool checks on every request to believe only the
connect proxy: agent/runtime/tool_guard.py) come last, over the image's and the studio's.

Layout next to the volume mounted at `DIR/sessions/<sid>/root`:
    root/upper, root/work   the overlay's upper and work dirs (on the volume)
    DIR/sessions/<sid>/merged   the overlay mount: the tool's `/` (`rootDir`)

Containers are named `studios-<sid>` and labelled `studios.session-id`,
`studios.generation` and `studios.agent-id` (the reaper lists this agent's containers by
the last); the handle keeps the container id. They log to a k8s-file log at the session's
log path, which outlives the container.

Networking (`--podman-network`, docs/contract-notes.md "Session networking"): by default each
session gets a bridge network of its own, `studios-<sid>` (netavark, `isolate=true`, no DNS,
labelled like the container), and its tool is published on the host's 127.0.0.1 only, at the
same port number it listens on inside ($CONNECT_TOOL_PORT). So the proxy and the runner's
readiness check still dial 127.0.0.1:<handle.port> (netavark's DNAT refuses while the tool
does not listen), while from inside a session the host's loopback, other sessions' published
ports and other sessions' bridges are unreachable; outbound traffic is NATed. Containers get
no CAP_NET_RAW / CAP_NET_ADMIN: netavark turns route_localnet on for the bridge (for the
127.0.0.1 DNAT), so a container able to write raw frames could reach the host's loopback.
`host` is the earlier behaviour: the host's network, nothing isolated (unsafe).
slirp4netns isolates as well but its port forwarder accepts connections before the tool
listens, which defeats the readiness check; measured in tests/bench/bench_podman_network.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from agent import crash_points
from agent.errors import RuntimeStartError, RuntimeUnavailable
from agent.host_mounts import mounted_source
from agent.runtime.base import (
    ExitStatus,
    LabelledTool,
    Runtime,
    RuntimeHandle,
    RuntimeOptions,
    StartSpec,
    connect_variables,
)

__all__ = ["PodmanClient", "PodmanError", "PodmanRuntime", "parse_ulimit"]

log = logging.getLogger(__name__)

API = "/v4.0.0/libpod"
_POLL_INTERVAL = 0.2
LABEL_SESSION = "studios.session-id"
LABEL_GENERATION = "studios.generation"
LABEL_OWNER = "studios.agent-id"
# `--podman-network`: the first is the default.
NETWORK_MODES = ("bridge", "host")
# Capabilities a session never gets, whatever podman's defaults on the host say.
_DROPPED_CAPS = ["CAP_NET_RAW", "CAP_NET_ADMIN"]
_NETWORK_REF = "network:"
# References of images that only exist where they were built (podman finds the short
# catalogue names, `studios/...`, as `localhost/studios/...`).
_BUILT_HERE = ("localhost/", "studios/")
_K8S_LOG_PREFIX = re.compile(r"^\S+ (stdout|stderr) [FP] ")
# podman 4 answers a container name in use with a 500 (a network name with a 409); the
# cause is what tells the two apart from other failures.
_NAME_IN_USE = "that name is already in use"
_NETWORK_EXISTS = "network already exists"
_MNT_DETACH = 2
_MOUNT_ATTEMPTS = 4
# Image inspections kept (project images, and one per built studio environment).
_IMAGE_CACHE_SIZE = 64


class PodmanError(RuntimeStartError):
    """podman answered with an error, or did not answer at all."""

    def __init__(self, message: str, status: int = 0, cause: str = "") -> None:
        super().__init__(message)
        self.status = status
        # podman's own short reason ("network already exists"), "" when it gave none.
        self.cause = cause


def parse_ulimit(value: str) -> dict[str, Any]:
    """`nofile=1024:1024` (or `nofile=1024`) -> a libpod POSIX rlimit."""
    name, sep, limits = value.partition("=")
    soft, _, hard = limits.partition(":")
    if not sep or not soft.isdigit() or (hard and not hard.isdigit()):
        raise ValueError(f"bad ulimit {value!r}: expected NAME=SOFT[:HARD]")
    return {"type": name.lower(), "soft": int(soft), "hard": int(hard or soft)}


class PodmanClient:
    """A few libpod REST calls over the unix socket; errors carry podman's message."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        timeout: float = 60.0,  # noqa: ASYNC109  (one total limit per call)
        ok: tuple[int, ...] = (200, 201, 204, 304),
    ) -> Any:
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as client:
                async with client.request(
                    method, f"http://podman{API}{path}", params=params, json=body
                ) as resp:
                    text = await resp.text()
                    if resp.status not in ok:
                        message, cause = _podman_message(text, resp.status)
                        raise PodmanError(message, resp.status, cause)
                    if not text:
                        return None
                    try:
                        return json.loads(text)
                    except ValueError:
                        return text
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise PodmanError(
                f"podman does not answer on {self.socket_path} ({exc}); "
                "is `podman system service` running?"
            ) from None
        except TimeoutError:
            message = f"podman did not answer on {self.socket_path} in {timeout:g} s"
            raise PodmanError(message) from None

    async def ping(self) -> bool:
        try:
            await self.request("GET", "/_ping", timeout=5)
            return True
        except PodmanError:
            return False


def _podman_message(text: str, status: int) -> tuple[str, str]:
    """podman's error answer -> (the message for people, podman's cause or "")."""
    with contextlib.suppress(ValueError, AttributeError):
        data = json.loads(text)
        cause = str(data.get("cause") or "")
        msg = data.get("message") or cause
        if msg:
            return f"podman: {msg}", cause
    return f"podman: HTTP {status}: {text.strip()[:500]}", ""


def _describe_exit(state: dict[str, Any]) -> ExitStatus:
    code = int(state.get("ExitCode", 0))
    if state.get("OOMKilled"):
        return ExitStatus(code, f"killed: out of memory (status {code})")
    if code > 128:
        return ExitStatus(code, f"exited with status {code} (signal {code - 128})")
    error = state.get("Error") or ""
    return ExitStatus(code, f"exited with status {code}" + (f": {error}" if error else ""))


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc = libc
    return _libc


def _mount_overlay(layers: list[str], upper: Path, work: Path, merged: Path) -> None:
    """Mount the overlay on `merged` (blocking; a thread's work)."""
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    if mounted_source(merged) is not None:
        return  # an earlier start of this session mounted it: its upper dir is the same
    options = f"lowerdir={':'.join(layers)},upperdir={upper},workdir={work}"
    if len(options) >= 4096:
        # The kernel takes one page of mount options.
        raise RuntimeStartError(
            f"cannot mount the session's overlay root on {merged}: the image's "
            f"{len(layers)} layers make {len(options)} bytes of mount options (at most 4095)"
        )
    for attempt in range(1, _MOUNT_ATTEMPTS + 1):
        if _c().mount(b"overlay", os.fsencode(merged), b"overlay", 0, options.encode()) == 0:
            return
        code = ctypes.get_errno()
        if code != errno.EINVAL or attempt == _MOUNT_ATTEMPTS:
            break
        # Every podman command bind-mounts <graph root>/overlay on itself while it runs
        # and detaches it when it exits; a lower dir looked up through that mount as it
        # goes fails ("overlayfs: failed to clone lowerpath", EINVAL). mount(8) met the
        # same. It is gone at the next try.
        log.info("overlay mount on %s: %s; trying again", merged, os.strerror(code))
        time.sleep(0.02 * attempt)
    raise RuntimeStartError(
        f"cannot mount the session's overlay root on {merged}: {os.strerror(code)}"
    )


def _unmount(merged: Path) -> None:
    """Unmount everything mounted on `merged`; lazily when it is busy (blocking)."""
    target = os.fsencode(merged)
    while mounted_source(merged) is not None:
        if _c().umount2(target, 0) != 0:
            code = ctypes.get_errno()
            if code == errno.EINVAL:
                return  # not a mount point after all (gone between the two calls)
            # Busy (a process still in it): detach now, the kernel frees it when unused.
            if _c().umount2(target, _MNT_DETACH) != 0:
                code = ctypes.get_errno()
                log.warning("cannot unmount %s: %s", merged, os.strerror(code))
            return


class _ImageCache:
    """Image inspections by reference, valid while podman's image store is unchanged.

    containers/storage rewrites `<graph root>/overlay-images/images.json` (a new file,
    renamed over the old one) whenever an image is added, tagged, untagged or removed, so
    its (inode, mtime, size) changes with any change to what a reference names: inode
    numbers are reused and mtimes are clock ticks (4 ms here), but no two rewrites by
    podman come within one tick. One stat() replaces an inspection per start. The store's
    path is learnt from the first inspection (its layers live in
    `<graph root>/overlay/<layer>/diff`); a layout that does not match leaves nothing
    cached: every start inspects, as before.
    """

    def __init__(self) -> None:
        self.store: Path | None = None
        self._entries: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}

    def stamp(self) -> tuple[int, int, int] | None:
        if self.store is None:
            return None
        try:
            st = os.stat(self.store)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def get(self, reference: str) -> dict[str, Any] | None:
        entry = self._entries.get(reference)
        if entry is None:
            return None
        if entry[0] != self.stamp():
            del self._entries[reference]
            return None
        return entry[1]

    def put(
        self, reference: str, before: tuple[int, int, int] | None, image: dict[str, Any]
    ) -> None:
        """Keep `image`, inspected after the store's stamp was `before`.

        The stamp taken before the inspection is the one kept: a store that changed while
        podman answered fails the next check instead of hiding the change.
        """
        if self.store is None:
            self.store = _image_store(image)
            return  # no stamp from before this inspection: the next one is kept
        if before is None:
            return
        self._entries.pop(reference, None)
        self._entries[reference] = (before, image)
        while len(self._entries) > _IMAGE_CACHE_SIZE:
            del self._entries[next(iter(self._entries))]


def _image_store(image: dict[str, Any]) -> Path | None:
    """`<graph root>/overlay-images/images.json` of the store holding `image`, if found."""
    data = (image.get("GraphDriver") or {}).get("Data") or {}
    layer = data.get("UpperDir") or str(data.get("LowerDir", "")).split(":")[0]
    diff = Path(str(layer or "/"))
    if diff.name != "diff" or diff.parent.parent.name != "overlay":
        return None
    store = diff.parent.parent.parent / "overlay-images" / "images.json"
    return store if store.is_file() else None


class PodmanRuntime(Runtime):
    name = "podman"

    @classmethod
    def available(cls, options: RuntimeOptions) -> tuple[bool, str]:
        reasons = [f"podman binary: {shutil.which('podman') or 'not found'}"]
        ok, why = _podman_socket_answers(options.podman_socket)
        reasons.append(
            why if ok else f"{why} (start `podman system service`, scripts/podman-setup)"
        )
        if ok and options.podman_network == "bridge":
            # Per-session isolated bridges are a netavark feature; with CNI every session
            # would share one network, so the runtime is refused rather than weakened.
            backend = _podman_network_backend(options.podman_socket)
            if backend != "netavark":
                ok = False
                reasons.append(
                    f"podman's network backend is {backend or 'unknown'}, not netavark: "
                    "--podman-network bridge isolates sessions with netavark networks "
                    "(install netavark and set [network] network_backend in "
                    "containers.conf, or run with --podman-network host)"
                )
            else:
                reasons.append("network backend netavark (one isolated bridge per session)")
        if os.geteuid() != 0:
            ok = False
            reasons.append("not root: the agent mounts each session's overlay root file system")
        return ok, "; ".join(reasons)

    def __init__(self, options: RuntimeOptions) -> None:
        self.client = PodmanClient(options.podman_socket)
        self.oci_runtime = options.oci_runtime
        self.rlimits = [parse_ulimit(u) for u in options.ulimits]
        if options.podman_network not in NETWORK_MODES:
            raise RuntimeUnavailable(
                f"unknown podman network {options.podman_network!r} "
                f"(known: {', '.join(NETWORK_MODES)})"
            )
        self.network = options.podman_network
        self._images = _ImageCache()

    # ------------------------------------------------------------ layout

    def checkpoint_dir(self, volume_root: Path) -> Path:
        return volume_root / "upper"

    @staticmethod
    def merged_dir(volume_root: Path) -> Path:
        return volume_root.parent / "merged"

    @staticmethod
    def container_name(session_id: str) -> str:
        return f"studios-{session_id}"

    # A session's own bridge network carries the container's name.
    network_name = container_name

    # ------------------------------------------------------------ image and rootfs

    async def image(self, reference: str) -> dict[str, Any]:
        """Inspect `reference` (kept until the image store changes), pulling it first when
        it is not present."""
        cached = self._images.get(reference)
        if cached is not None:
            return cached
        before = self._images.stamp()
        data = await self._inspect_or_pull(reference)
        self._images.put(reference, before, data)
        return data

    async def _inspect_or_pull(self, reference: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = await self.client.request("GET", f"/images/{reference}/json")
            return data
        except PodmanError as exc:
            if exc.status != 404:
                raise
        if reference.startswith(_BUILT_HERE):
            # The project's images (images/) are built on each host, never pulled: a pull
            # would only wait for a registry that does not have them, then fail.
            raise PodmanError(
                f"cannot pull image {reference}: it is built on the host, not pulled; "
                f"build it there with `studio-agent images build {reference}`"
            )
        log.info("pulling image %s", reference)
        answer = await self.client.request(
            "POST", "/images/pull", params={"reference": reference, "quiet": "true"}, timeout=900
        )
        # The pull answers 200 with a stream of JSON objects; an "error" one means failed.
        for line in str(answer if isinstance(answer, str) else json.dumps(answer)).splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                item = json.loads(line)
                if item.get("error"):
                    raise PodmanError(f"cannot pull image {reference}: {item['error']}")
        data = await self.client.request("GET", f"/images/{reference}/json")
        return data

    @staticmethod
    def image_layers(image: dict[str, Any]) -> list[str]:
        driver = image.get("GraphDriver") or {}
        if driver.get("Name") != "overlay":
            raise RuntimeStartError(
                f"image storage driver {driver.get('Name')!r} is not overlay; "
                "the podman runtime needs podman's overlay storage"
            )
        data = driver.get("Data") or {}
        layers = [data["UpperDir"]] if data.get("UpperDir") else []
        layers += [p for p in str(data.get("LowerDir", "")).split(":") if p]
        if not layers:
            raise RuntimeStartError("image has no layers")
        return layers

    async def mount_rootfs(self, volume_root: Path, layers: list[str]) -> Path:
        merged = self.merged_dir(volume_root)
        await asyncio.to_thread(
            _mount_overlay, layers, volume_root / "upper", volume_root / "work", merged
        )
        return merged

    async def unmount_rootfs(self, merged: Path) -> None:
        await asyncio.to_thread(_unmount, merged)

    # ------------------------------------------------------------ the interface

    def _create_body(
        self, spec: StartSpec, image: dict[str, Any], rootfs: Path, env: dict[str, str]
    ) -> dict[str, Any]:
        config = image.get("Config") or {}
        command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
        if not command:
            raise RuntimeStartError(f"image {spec.image} has neither an entrypoint nor a command")
        body: dict[str, Any] = {
            "name": self.container_name(spec.session_id),
            "rootfs": str(rootfs),
            "command": command,
            "env": env,
            "work_dir": config.get("WorkingDir") or "/",
            "labels": {
                LABEL_SESSION: spec.session_id,
                LABEL_GENERATION: str(spec.generation),
                LABEL_OWNER: self.owner,
            },
            "cap_drop": list(_DROPPED_CAPS),
            "stop_signal": 15,
            "stop_timeout": 30,
            "log_configuration": {"driver": "k8s-file", "path": str(spec.log_path)},
        }
        if config.get("User"):
            # The image's user (the project's images: `studio`, uid 1000): with `rootfs`
            # podman applies none of the image's configuration, so the tool would run as root.
            body["user"] = str(config["User"])
        if self.network == "host":
            body["netns"] = {"nsmode": "host"}
        else:
            body["netns"] = {"nsmode": "bridge"}
            body["Networks"] = {self.network_name(spec.session_id): {}}
            body["portmappings"] = [
                {
                    "host_ip": "127.0.0.1",
                    "host_port": spec.port,
                    "container_port": spec.port,
                    "protocol": "tcp",
                }
            ]
        if spec.mounts:
            # rprivate: nothing mounted later on the host side (or in the container)
            # propagates across. The mount point directories runc creates land in the
            # overlay's upper dir; checkpoints skip /workspace/data and mount points.
            body["mounts"] = [
                {
                    "destination": m.target,
                    "source": str(m.source),
                    "type": "bind",
                    "options": ["rbind", "rprivate", "ro" if m.read_only else "rw"],
                }
                for m in spec.mounts
            ]
        if self.oci_runtime:
            body["oci_runtime"] = self.oci_runtime
        if self.rlimits:
            body["r_limits"] = self.rlimits
        limits: dict[str, Any] = {}
        if spec.cpu > 0:
            limits["cpu"] = {"quota": spec.cpu * 100_000, "period": 100_000}
        if spec.memory_mib > 0:
            limits["memory"] = {"limit": spec.memory_mib * 1024 * 1024}
        if limits:
            body["resource_limits"] = limits
        if spec.gpu > 0:
            devices = sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
            if len(devices) < spec.gpu:
                raise RuntimeStartError(
                    f"{spec.gpu} GPU(s) requested, {len(devices)} present on this host"
                )
            extra = [p for p in ("/dev/nvidiactl", "/dev/nvidia-uvm") if os.path.exists(p)]
            body["devices"] = [{"path": p} for p in devices[: spec.gpu] + extra]
        return body

    async def start(self, spec: StartSpec) -> RuntimeHandle:
        name = self.container_name(spec.session_id)
        network = self.network_name(spec.session_id) if self.network == "bridge" else ""
        merged = self.merged_dir(spec.root_dir)

        async def prepare_root() -> dict[str, Any]:
            image = await self.image(spec.image)
            layers = self.image_layers(image)
            await asyncio.to_thread(spec.log_path.parent.mkdir, parents=True, exist_ok=True)
            await self.mount_rootfs(spec.root_dir, layers)
            return image

        try:
            # The network does not depend on the image: both are ready in the time of the
            # slower one. gather() lets both finish before any failure is cleaned up, so
            # the cleanup does not race a network still being created.
            image, made = await asyncio.gather(
                prepare_root(), self._create_network(network, spec), return_exceptions=True
            )
            if isinstance(image, BaseException):
                raise image
            if isinstance(made, BaseException):
                raise made
            env: dict[str, str] = {}
            for item in (image.get("Config") or {}).get("Env") or []:
                key, _, value = str(item).partition("=")
                env[key] = value
            env.update(spec.environment)
            env.update(connect_variables(spec))
            body = self._create_body(spec, image, merged, env)
            cid = await self._create_container(body)
            crash_points.reached("podman:created")
            await self.client.request("POST", f"/containers/{cid}/start")
            # The pid (the handle's sign that a tool exists, and its identity with the
            # create time): start answers without a body.
            state = (await self.client.request("GET", f"/containers/{cid}/json"))["State"]
        except BaseException:
            # By name: whatever this start, or a crashed earlier one, left in the way.
            with contextlib.suppress(Exception):
                await self._remove(name)
            if network:
                with contextlib.suppress(Exception):
                    await self._remove_network(network)
            with contextlib.suppress(Exception):
                await self.unmount_rootfs(merged)
            raise
        pid = int(state.get("Pid") or 0)
        create_time = 0.0
        with contextlib.suppress(psutil.Error, ValueError):
            create_time = psutil.Process(pid).create_time() if pid else 0.0
        return RuntimeHandle(
            session_id=spec.session_id,
            pid=pid,
            create_time=create_time,
            port=spec.port,
            root_dir=str(merged),
            log_path=str(spec.log_path),
            data={
                "container_id": cid,
                "container_name": name,
                # The session's own network ("" on the host's network).
                "network": network,
                "merged": str(merged),
                "upper": str(spec.root_dir / "upper"),
                "volume_root": str(spec.root_dir),
            },
        )

    async def _create_container(self, body: dict[str, Any]) -> str:
        """Create the container; one left by a crashed earlier start of the session (its
        name in use) is removed and the create tried once more. Asking first would cost
        every start a call for what is almost never there."""
        try:
            created = await self.client.request("POST", "/containers/create", body=body)
        except PodmanError as exc:
            if _NAME_IN_USE not in exc.cause:
                raise
            log.info("removing the leftover container %s of an earlier start", body["name"])
            await self._remove(str(body["name"]))
            created = await self.client.request("POST", "/containers/create", body=body)
        return str(created["Id"])

    def _ref(self, handle: RuntimeHandle) -> str:
        return str(
            handle.data.get("container_id")
            or handle.data.get("container_name")
            or self.container_name(handle.session_id)
        )

    async def _state(self, handle: RuntimeHandle) -> dict[str, Any] | None:
        """The container's State, or None when the container does not exist."""
        try:
            data = await self.client.request("GET", f"/containers/{self._ref(handle)}/json")
        except PodmanError as exc:
            if exc.status == 404:
                return None
            raise
        state: dict[str, Any] = data["State"]
        return state

    async def poll(self, handle: RuntimeHandle) -> ExitStatus | None:
        try:
            state = await self._state(handle)
        except PodmanError as exc:
            # podman itself is down: the container may well still run (conmon keeps it);
            # never declare a tool dead because the agent cannot see it.
            log.warning("session %s: cannot poll the container: %s", handle.session_id, exc)
            return None
        if state is None:
            return ExitStatus(None, "container is gone")
        if state.get("Running") or state.get("Status") in ("running", "created", "configured"):
            if state.get("Status") in ("created", "configured") and state.get("FinishedAt", "")[
                :4
            ] not in ("", "0001"):
                return _describe_exit(state)
            return None
        return _describe_exit(state)

    async def wait(self, handle: RuntimeHandle) -> ExitStatus:
        while True:
            status = await self.poll(handle)
            if status is not None:
                await self._cleanup(handle)
                return status
            await asyncio.sleep(_POLL_INTERVAL)

    async def stop(self, handle: RuntimeHandle, grace_seconds: float) -> ExitStatus | None:
        status = await self.poll(handle)
        if status is None:
            # podman sends the stop signal (SIGTERM), then SIGKILL after `timeout`.
            with contextlib.suppress(PodmanError):
                await self.client.request(
                    "POST",
                    f"/containers/{self._ref(handle)}/stop",
                    params={"timeout": str(int(max(0, grace_seconds)))},
                    timeout=grace_seconds + 60,
                    ok=(204, 304, 404),
                )
            status = await self.poll(handle)
        await self._cleanup(handle)
        return status

    async def destroy(self, handle: RuntimeHandle) -> None:
        await self._cleanup(handle)

    async def reap(self, handle: RuntimeHandle) -> None:
        await self._cleanup(handle)

    async def labelled_tools(self) -> list[LabelledTool]:
        if not self.owner:
            return []
        found = await self.client.request(
            "GET",
            "/containers/json",
            params={
                "all": "true",
                "filters": json.dumps({"label": [f"{LABEL_OWNER}={self.owner}"]}),
            },
        )
        tools = []
        sessions_with_container = set()
        for item in found or []:
            labels = item.get("Labels") or {}
            session = labels.get(LABEL_SESSION)
            if not session:
                continue
            try:
                generation = int(labels.get(LABEL_GENERATION) or 0)
            except ValueError:
                generation = 0
            cid = str(item.get("Id") or "")
            sessions_with_container.add(session)
            tools.append(
                LabelledTool(
                    session_id=session,
                    generation=generation,
                    ref=cid,
                    description=f"container {cid[:12]} ({item.get('State') or 'unknown state'})",
                )
            )
        # A network left without its container (an agent killed between the two creates).
        networks = await self.client.request(
            "GET",
            "/networks/json",
            params={"filters": json.dumps({"label": [f"{LABEL_OWNER}={self.owner}"]})},
        )
        for net in networks or []:
            labels = net.get("labels") or {}
            session = labels.get(LABEL_SESSION)
            if not session or session in sessions_with_container:
                continue
            try:
                generation = int(labels.get(LABEL_GENERATION) or 0)
            except ValueError:
                generation = 0
            name = str(net.get("name") or "")
            tools.append(
                LabelledTool(
                    session_id=session,
                    generation=generation,
                    ref=f"{_NETWORK_REF}{name}",
                    description=f"network {name} (no container)",
                )
            )
        return tools

    async def remove_labelled(self, tool: LabelledTool) -> None:
        if tool.ref.startswith(_NETWORK_REF):
            await self._remove_network(tool.ref.removeprefix(_NETWORK_REF))
            return
        await self._remove(tool.ref)
        # Its network goes with it (refused while another container uses it: none does).
        with contextlib.suppress(PodmanError):
            await self._remove_network(self.network_name(tool.session_id))

    async def _create_network(self, name: str, spec: StartSpec) -> None:
        """Create the session's own network ("": none, on the host's network); one left by
        a crashed earlier start (the name taken) is removed with its container first."""
        if not name:
            return
        body = {
            "name": name,
            "driver": "bridge",
            # netavark: no forwarding between this network and any other isolated one.
            "options": {"isolate": "true"},
            # Nothing to resolve among a session's containers; the host's resolvers serve.
            "dns_enabled": False,
            "labels": {
                LABEL_SESSION: spec.session_id,
                LABEL_GENERATION: str(spec.generation),
                LABEL_OWNER: self.owner,
            },
        }
        try:
            await self.client.request("POST", "/networks/create", body=body)
        except PodmanError as exc:
            if exc.status != 409 and _NETWORK_EXISTS not in exc.cause:
                raise
            log.info("removing the leftover network %s of an earlier start", name)
            # Never forced (see _remove_network): its container goes first, by name.
            await self._remove(self.container_name(spec.session_id))
            await self._remove_network(name)
            await self.client.request("POST", "/networks/create", body=body)

    async def _remove_network(self, name: str) -> None:
        await self.client.request(
            "DELETE",
            f"/networks/{name}",
            # Never forced: a forced removal would remove the containers using it.
            timeout=60,
            ok=(200, 204, 404),
        )

    async def _remove(self, ref: str) -> None:
        await self.client.request(
            "DELETE",
            f"/containers/{ref}",
            params={"force": "true", "timeout": "0"},
            timeout=60,
            ok=(200, 204, 404),
        )

    async def _cleanup(self, handle: RuntimeHandle) -> None:
        """Remove the container (by id and by name) and unmount its root file system."""
        ref, name = self._ref(handle), self.container_name(handle.session_id)
        with contextlib.suppress(PodmanError):
            await self._remove(ref)
        if name != ref:
            # Under the name, another container: a later start's, killed before its id was saved.
            with contextlib.suppress(PodmanError):
                await self._remove(name)
        # A handle of a start killed before it returned has no data: try the default name.
        network = str(handle.data.get("network", self.network_name(handle.session_id)))
        if network:
            with contextlib.suppress(PodmanError):
                await self._remove_network(network)
        merged = handle.data.get("merged") or (
            str(self.merged_dir(Path(handle.root_dir))) if handle.root_dir else ""
        )
        if merged:
            await self.unmount_rootfs(Path(merged))

    async def recover(self, handle: RuntimeHandle) -> bool:
        try:
            data = await self.client.request("GET", f"/containers/{self._ref(handle)}/json")
        except PodmanError as exc:
            if exc.status != 404:
                # podman is down: leave the tool to itself, the watcher keeps polling.
                log.warning("session %s: cannot recover yet: %s", handle.session_id, exc)
                return True
            data = None
        labels = ((data or {}).get("Config") or {}).get("Labels") or {}
        if data is not None and labels.get(LABEL_SESSION) == handle.session_id:
            if data["State"].get("Running"):
                return True
        await self._cleanup(handle)
        return False

    async def logs(self, handle: RuntimeHandle, max_lines: int = 50) -> str:
        return await asyncio.to_thread(_tail_k8s_log, Path(handle.log_path), max_lines)


def _tail_k8s_log(path: Path, max_lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return ""
    lines = [_K8S_LOG_PREFIX.sub("", line) for line in data.decode("utf-8", "replace").splitlines()]
    return "\n".join(lines[-max_lines:])


def _podman_socket_answers(socket_path: Path) -> tuple[bool, str]:
    # A blocking ping on purpose: doctor runs it once, outside any event loop's hot path.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(str(socket_path))
            sock.sendall(b"GET /v4.0.0/libpod/_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return False, f"podman socket {socket_path}: {exc.strerror or exc}"
    if b" 200 " not in answer.split(b"\r\n", 1)[0]:
        return False, f"podman socket {socket_path}: unexpected answer {answer[:40]!r}"
    return True, f"podman answers on {socket_path}"


def _podman_network_backend(socket_path: Path) -> str | None:
    """podman's network backend (`netavark` or `cni`) from its info, None if unknown."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(socket_path))
            sock.sendall(b"GET /v4.0.0/libpod/info HTTP/1.0\r\nHost: podman\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        _head, _sep, body = b"".join(chunks).partition(b"\r\n\r\n")
        backend = json.loads(body).get("host", {}).get("networkBackend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if isinstance(backend, str) else None


def create_podman_runtime(options: RuntimeOptions) -> Runtime:
    if not options.podman_socket:
        raise RuntimeUnavailable("the podman runtime needs --podman-socket")
    return PodmanRuntime(options)
