"""Benchmark (JSON): start request -> first HTTP 200 through our podman runtime, beside the
anchors measured in the same run, interleaved run by run (libpod REST create+start of the
same image, and `podman run -d`); and one xfs-loop grow step, idle and under a buffered
write load.

The network isolation is the same work on both sides (issue 18): in `bridge` mode (the
agent's default, `--podman-network bridge`) each start, ours and the anchors', creates a
bridge network of its own (isolate=true, no DNS) and publishes the tool on 127.0.0.1 only,
and each removal removes that network; in `host` mode nobody isolates anything. Every
target runs the image's own command (the tool's port in $CONNECT_TOOL_PORT).

Before the timed runs every target starts twice untimed: podman's caches, and our runtime's
image inspection (kept from the second inspection on, until the image store changes), are
what a host that has started sessions before has. `--steps` adds the median time of each
step of ours (each REST call, the image inspection, the overlay mount) and of the REST
anchor's; the DELETE rows are the removals after each measurement, outside it.

Run as root after scripts/podman-setup:
    .venv/bin/python tests/bench/bench_podman.py [--runs 7] [--modes bridge,host] [--steps]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.runtime import RuntimeOptions, StartSpec, free_tcp_port
from agent.runtime.podman import NETWORK_MODES, PodmanClient, PodmanRuntime
from agent.volumes import GIB
from agent.volumes.xfs import XfsLoopVolume

IMAGE = "localhost/studios/busybox-httpd:1.36-0.1"
SOCKET = Path("/run/podman/podman.sock")
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")
TARGETS = ("studios_podman_runtime", "anchor_libpod_rest_create_start", "anchor_podman_run_d_cli")
# The same network a session gets (agent/runtime/podman.py `_create_network`).
NETWORK_OPTIONS = {"isolate": "true"}

Steps = dict[str, list[float]]


async def _first_200(port: int, t0: float) -> float:
    while True:
        try:
            await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            )
            return time.monotonic() - t0
        except Exception:
            await asyncio.sleep(0.005)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class TimedClient(PodmanClient):
    """A PodmanClient that records how long each call took, by method and resource."""

    def __init__(self, socket_path: Path, steps: Steps | None) -> None:
        super().__init__(socket_path)
        self.steps = steps

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await super().request(method, path, **kw)
        finally:
            if self.steps is not None:
                parts = path.strip("/").split("/")
                what = parts[0] if len(parts) < 3 else f"{parts[0]}/{{}}/{parts[-1]}"
                if len(parts) == 2 and parts[1] in ("create", "json"):
                    what = "/".join(parts)
                self.steps.setdefault(f"{method} {what}", []).append(time.monotonic() - t0)


class TimedRuntime(PodmanRuntime):
    """Our runtime, recording the steps that are not REST calls."""

    steps: Steps | None = None

    async def image(self, reference: str) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            return await super().image(reference)
        finally:
            if self.steps is not None:
                self.steps.setdefault("image (inspection or cache)", []).append(
                    time.monotonic() - t0
                )

    async def mount_rootfs(self, volume_root: Path, layers: list[str]) -> Path:
        t0 = time.monotonic()
        try:
            return await super().mount_rootfs(volume_root, layers)
        finally:
            if self.steps is not None:
                self.steps.setdefault("overlay mount", []).append(time.monotonic() - t0)


class Bench:
    def __init__(self, mode: str, work: Path, steps: bool) -> None:
        self.mode = mode
        self.work = work
        self.steps: dict[str, Steps] | None = {"ours": {}, "anchor_rest": {}} if steps else None
        self.rt = TimedRuntime(
            RuntimeOptions(
                podman_socket=SOCKET, oci_runtime="runc", ulimits=ULIMITS, podman_network=mode
            )
        )
        self.rt.owner = "bench"
        self.rt.client = TimedClient(SOCKET, self.steps["ours"] if self.steps else None)
        self.rt.steps = self.steps["ours"] if self.steps else None
        self.client = TimedClient(SOCKET, self.steps["anchor_rest"] if self.steps else None)
        self.n = 0

    def _name(self) -> str:
        self.n += 1
        return f"bench{os.getpid()}-{self.mode}-{self.n:03d}"

    async def ours(self) -> float:
        name = self._name()
        root = self.work / name / "root"
        root.mkdir(parents=True)
        port = free_tcp_port()
        t0 = time.monotonic()
        h = await self.rt.start(
            StartSpec(name, IMAGE, "httpd", {}, root, root.parent / "log", port)
        )
        elapsed = await _first_200(port, t0)
        await self.rt.destroy(h)
        return elapsed

    async def anchor_rest(self) -> float:
        name, port = self._name(), free_tcp_port()
        body: dict[str, Any] = {
            "name": name,
            "image": IMAGE,
            "env": {"CONNECT_TOOL_PORT": str(port)},
            "oci_runtime": "runc",
            "r_limits": [
                {"type": "nofile", "soft": 1024, "hard": 1024},
                {"type": "nproc", "soft": 1024, "hard": 1024},
            ],
        }
        if self.mode == "host":
            body["netns"] = {"nsmode": "host"}
        else:
            body["netns"] = {"nsmode": "bridge"}
            body["Networks"] = {name: {}}
            body["portmappings"] = [
                {"host_ip": "127.0.0.1", "host_port": port, "container_port": port}
            ]
        network = {
            "name": name,
            "driver": "bridge",
            "options": NETWORK_OPTIONS,
            "dns_enabled": False,
        }
        t0 = time.monotonic()
        if self.mode != "host":
            await self.client.request("POST", "/networks/create", body=network)
        cid = (await self.client.request("POST", "/containers/create", body=body))["Id"]
        await self.client.request("POST", f"/containers/{cid}/start")
        elapsed = await _first_200(port, t0)
        await self.client.request(
            "DELETE", f"/containers/{cid}", params={"force": "true", "timeout": "0"}
        )
        if self.mode != "host":
            await self.client.request("DELETE", f"/networks/{name}")
        return elapsed

    async def anchor_cli(self) -> float:
        name, port = self._name(), free_tcp_port()
        argv = ["podman", "run", "-d", "--name", name, "--runtime", "runc"]
        for u in ULIMITS:
            argv += ["--ulimit", u]
        argv += ["-e", f"CONNECT_TOOL_PORT={port}"]
        if self.mode == "host":
            argv += ["--network", "host"]
        else:
            argv += ["--network", name, "-p", f"127.0.0.1:{port}:{port}"]
        net = ["podman", "network", "create", "--disable-dns", "--opt", "isolate=true", name]
        t0 = time.monotonic()
        if self.mode != "host":
            await asyncio.to_thread(subprocess.run, net, capture_output=True, check=True)
        await asyncio.to_thread(subprocess.run, [*argv, IMAGE], capture_output=True, check=True)
        elapsed = await _first_200(port, t0)
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, check=False)
        if self.mode != "host":
            subprocess.run(["podman", "network", "rm", name], capture_output=True, check=False)
        return elapsed

    async def run(self, runs: int) -> dict[str, Any]:
        targets: dict[str, Callable[[], Awaitable[float]]] = {
            TARGETS[0]: self.ours,
            TARGETS[1]: self.anchor_rest,
            TARGETS[2]: self.anchor_cli,
        }
        for _ in range(2):
            for target in targets.values():
                await target()  # untimed: see the module's docstring
        if self.steps is not None:
            for steps in self.steps.values():
                steps.clear()
        times: dict[str, list[float]] = {t: [] for t in targets}
        load_before = _load()
        for i in range(runs):
            # Each run in another order: no target always follows the same one.
            order = list(targets)[i % len(targets) :] + list(targets)[: i % len(targets)]
            for t in order:
                times[t].append(await targets[t]())
        result: dict[str, Any] = {t: _summary(v) for t, v in times.items()}
        result["load_avg_before_after"] = [load_before, _load()]
        result["ratio_ours_vs_rest_anchor"] = round(
            result[TARGETS[0]]["median_ms"] / result[TARGETS[1]]["median_ms"], 2
        )
        result["ratio_ours_vs_cli_anchor"] = round(
            result[TARGETS[0]]["median_ms"] / result[TARGETS[2]]["median_ms"], 2
        )
        if self.steps is not None:
            result["steps_median_ms"] = {
                who: {k: round(statistics.median(v) * 1000, 1) for k, v in steps.items()}
                for who, steps in self.steps.items()
            }
        return result


async def grow_steps(runs: int, work: Path) -> dict[str, list[float]]:
    vol = XfsLoopVolume()
    res: dict[str, list[float]] = {"idle": [], "buffered_write_load": []}
    for mode in res:
        for i in range(runs):
            path = work / f"g-{mode}-{i}" / "root"
            info = await vol.prepare(path, 4 * GIB)
            stop = threading.Event()

            def writer(stop: threading.Event = stop, path: Path = path) -> None:
                chunk = b"\1" * (4 * 1024 * 1024)
                with open(path / "load", "wb") as f:
                    for _ in range(600):  # ~2.3 GiB
                        if stop.is_set():
                            break
                        f.write(chunk)

            t = threading.Thread(target=writer)
            if mode != "idle":
                t.start()
                await asyncio.sleep(0.3)
            t0 = time.monotonic()
            info = await vol.grow(info, 2 * GIB)
            res[mode].append(time.monotonic() - t0)
            stop.set()
            if mode != "idle":
                t.join()
            await vol.release(info)
    return res


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--modes", default=",".join(NETWORK_MODES), help="network modes, comma-separated"
    )
    parser.add_argument("--steps", action="store_true", help="time each step of the starts")
    parser.add_argument("--no-grow", action="store_true", help="skip the xfs grow steps")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-podman-"))
    try:
        result: dict[str, Any] = {
            "machine_note": "targets interleaved run by run; load averages (1, 5, 15 min)",
            "runs": args.runs,
            "start_to_first_200": {
                mode: await Bench(mode, work, args.steps).run(args.runs)
                for mode in args.modes.split(",")
            },
        }
        if not args.no_grow:
            grow = await grow_steps(max(3, args.runs // 2), work)
            result["xfs_grow_step_direct_io"] = {k: _summary(v) for k, v in grow.items()}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
