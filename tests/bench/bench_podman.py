"""Benchmark (JSON): start request -> first HTTP 200 through our podman runtime, beside the
anchor measured in the same run (libpod REST create+start of the same image, host network,
and `podman run -d`); and one xfs-loop grow step, idle and under a buffered write load.

Run as root after scripts/podman-setup:  .venv/bin/python tests/bench/bench_podman.py [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from agent.runtime import RuntimeOptions, StartSpec, free_tcp_port
from agent.runtime.podman import PodmanClient, PodmanRuntime
from agent.volumes import GIB
from agent.volumes.xfs import XfsLoopVolume

IMAGE = "localhost/studios/busybox-httpd:1.36-0.1"
SOCKET = Path("/run/podman/podman.sock")


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


async def ours(runs: int, work: Path) -> list[float]:
    rt = PodmanRuntime(
        RuntimeOptions(
            podman_socket=SOCKET,
            oci_runtime="runc",
            ulimits=("nofile=1024:1024", "nproc=1024:1024"),
        )
    )
    out = []
    for i in range(runs):
        root = work / f"s{i}" / "root"
        root.mkdir(parents=True)
        port = free_tcp_port()
        t0 = time.monotonic()
        h = await rt.start(
            StartSpec(f"bench{i:03d}", IMAGE, "httpd", {}, root, root.parent / "log", port)
        )
        out.append(await _first_200(port, t0))
        await rt.destroy(h)
    return out


async def anchor_rest(runs: int) -> list[float]:
    client = PodmanClient(SOCKET)
    out = []
    for _ in range(runs):
        port = free_tcp_port()
        body = {
            "image": IMAGE,
            "command": ["busybox", "httpd", "-f", "-p", str(port), "-h", "/www"],
            "netns": {"nsmode": "host"},
            "oci_runtime": "runc",
            "r_limits": [
                {"type": "nofile", "soft": 1024, "hard": 1024},
                {"type": "nproc", "soft": 1024, "hard": 1024},
            ],
        }
        t0 = time.monotonic()
        cid = (await client.request("POST", "/containers/create", body=body))["Id"]
        await client.request("POST", f"/containers/{cid}/start")
        out.append(await _first_200(port, t0))
        await client.request(
            "DELETE", f"/containers/{cid}", params={"force": "true", "timeout": "0"}
        )
    return out


async def anchor_cli(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        port = free_tcp_port()
        t0 = time.monotonic()
        cid = subprocess.run(
            [
                "podman",
                "run",
                "-d",
                "--runtime",
                "runc",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                "--network",
                "host",
                IMAGE,
                "busybox",
                "httpd",
                "-f",
                "-p",
                str(port),
                "-h",
                "/www",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        out.append(await _first_200(port, t0))
        subprocess.run(["podman", "rm", "-f", "-t", "0", cid], capture_output=True, check=False)
    return out


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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-podman-"))
    try:
        result = {
            "machine_note": "one measurement at a time; anchor measured in the same run",
            "start_to_first_200": {
                "studios_podman_runtime": _summary(await ours(args.runs, work)),
                "anchor_libpod_rest_create_start": _summary(await anchor_rest(args.runs)),
                "anchor_podman_run_d_cli": _summary(await anchor_cli(args.runs)),
            },
            "xfs_grow_step_direct_io": {
                k: _summary(v) for k, v in (await grow_steps(max(3, args.runs // 2), work)).items()
            },
        }
        r = result["start_to_first_200"]
        r["ratio_ours_vs_rest_anchor"] = round(
            r["studios_podman_runtime"]["median_ms"]
            / r["anchor_libpod_rest_create_start"]["median_ms"],
            2,
        )
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
