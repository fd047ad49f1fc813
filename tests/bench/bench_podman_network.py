"""Benchmark (JSON): what a session's own network namespace costs, beside today's host network
measured in the same run (issue 13).

For each candidate, N times (the candidates interleaved, run by run): libpod REST create +
start of the busybox image -> first HTTP 200 on 127.0.0.1:<host port> (the path the agent's
proxy dials), then the container (and its network) removed. Candidates:
  host            netns host: the anchor (what sessions did before issue 13)
  slirp4netns     own netns, user-mode networking, tool published on 127.0.0.1 only
  bridge_shared   the default `podman` bridge network, published on 127.0.0.1 (for reference:
                  sessions on one bridge reach each other, so it isolates nothing)
  bridge_own      a bridge network of its own per session (`isolate=true`, no DNS), created
                  before and removed after each container (its creation counted in the start);
                  what the agent does (`--podman-network bridge`)
Beside the start time: whether a connection to the host port is refused while the tool does
not listen yet (the agent's readiness check relies on it), a 64 MiB download through the host
port (MiB/s), and the helper processes each candidate leaves per session.
With --ours, the same through the agent's PodmanRuntime (overlay rootfs) for each
`--podman-network` setting.

Run as root after scripts/podman-setup:
    .venv/bin/python tests/bench/bench_podman_network.py [--runs 7] [--ours]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from agent.runtime import RuntimeOptions, StartSpec, free_tcp_port
from agent.runtime.podman import NETWORK_MODES, PodmanClient, PodmanRuntime

IMAGE = "localhost/studios/busybox-httpd:1.36-0.1"
SOCKET = Path("/run/podman/podman.sock")
RLIMITS = [
    {"type": "nofile", "soft": 1024, "hard": 1024},
    {"type": "nproc", "soft": 1024, "hard": 1024},
]
CANDIDATES = ("host", "slirp4netns", "bridge_shared", "bridge_own")
BIG_MIB = 64


async def _first_200(port: int, t0: float) -> float:
    def get() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
            resp.read()

    while True:
        try:
            await asyncio.to_thread(get)
            return time.monotonic() - t0
        except Exception:
            await asyncio.sleep(0.005)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def _refused_before_listen(port: int) -> bool:
    """True when a connection to the host port is refused (or reset before any byte) while
    nothing listens in the container: a bare connect then means the tool answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def _download_mib_s(port: int) -> float:
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/big", timeout=60) as resp:
        n = len(resp.read())
    assert n == BIG_MIB * 1024 * 1024, n
    return n / (1024 * 1024) / (time.monotonic() - t0)


def _helpers() -> set[int]:
    names = ("slirp4netns", "rootlessport", "rootlessport-child", "aardvark-dns")
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in names}


async def _network(client: PodmanClient, name: str) -> None:
    body = {"name": name, "driver": "bridge", "options": {"isolate": "true"}, "dns_enabled": False}
    await client.request("POST", "/networks/create", body=body)


def _body(candidate: str, port: int, network: str, command: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": IMAGE,
        "command": command,
        "oci_runtime": "runc",
        "r_limits": RLIMITS,
    }
    mapping = [{"host_ip": "127.0.0.1", "host_port": port, "container_port": port}]
    if candidate == "host":
        body["netns"] = {"nsmode": "host"}
    elif candidate == "slirp4netns":
        body["netns"] = {"nsmode": "slirp4netns"}
        body["portmappings"] = mapping
    else:
        body["netns"] = {"nsmode": "bridge"}
        body["Networks"] = {network: {}}
        body["portmappings"] = mapping
    return body


async def _one(
    client: PodmanClient, candidate: str, i: int, command: list[str] | None = None
) -> tuple[float, str, str, int]:
    port = free_tcp_port()
    network = "podman" if candidate != "bridge_own" else f"studios-bench-{i}"
    cmd = command or ["busybox", "httpd", "-f", "-p", str(port), "-h", "/www"]
    cmd = [c.replace("PORT", str(port)) for c in cmd]
    t0 = time.monotonic()
    if candidate == "bridge_own":
        await _network(client, network)
    cid = (
        await client.request(
            "POST", "/containers/create", body=_body(candidate, port, network, cmd)
        )
    )["Id"]
    await client.request("POST", f"/containers/{cid}/start")
    elapsed = await _first_200(port, t0) if command is None else 0.0
    return elapsed, str(cid), network, port


async def _remove(client: PodmanClient, cid: str, candidate: str, network: str) -> None:
    await client.request("DELETE", f"/containers/{cid}", params={"force": "true", "timeout": "0"})
    if candidate == "bridge_own":
        await client.request("DELETE", f"/networks/{network}", ok=(200, 204, 404))


async def start_runs(client: PodmanClient, runs: int) -> dict[str, dict[str, Any]]:
    """Start and removal times, the candidates interleaved run by run (a shared machine's
    load drifts; interleaving spreads it over all of them alike)."""
    out: dict[str, dict[str, Any]] = {
        c: {"starts": [], "removes": [], "helpers": 0} for c in CANDIDATES
    }
    for i in range(runs):
        for candidate in CANDIDATES:
            before = _helpers()
            elapsed, cid, network, _ = await _one(client, candidate, i)
            out[candidate]["starts"].append(elapsed)
            out[candidate]["helpers"] = len(_helpers() - before)
            t0 = time.monotonic()
            await _remove(client, cid, candidate, network)
            out[candidate]["removes"].append(time.monotonic() - t0)
    return {
        c: {
            "create_start_to_first_200": _summary(r["starts"]),
            "remove": _summary(r["removes"]),
            "helper_processes_per_session": r["helpers"],
        }
        for c, r in out.items()
    }


async def candidate_checks(client: PodmanClient, candidate: str, runs: int) -> dict[str, Any]:
    # The tool starts listening 1 s after its start: is the host port refused meanwhile?
    late = ["sh", "-c", "sleep 1; exec busybox httpd -f -p PORT -h /www"]
    _, cid, network, port = await _one(client, candidate, runs, late)
    refused = await asyncio.to_thread(_refused_before_listen, port)
    await _remove(client, cid, candidate, network)
    # Throughput through the host port: one 64 MiB file, three downloads, the median.
    big = [
        "sh",
        "-c",
        f"mkdir -p /tmp/w && dd if=/dev/zero of=/tmp/w/big bs=1M count={BIG_MIB} 2>/dev/null"
        " && echo ok > /tmp/w/index.html && exec busybox httpd -f -p PORT -h /tmp/w",
    ]
    _, cid, network, port = await _one(client, candidate, runs + 1, big)
    await _first_200(port, time.monotonic())
    speeds = [await asyncio.to_thread(_download_mib_s, port) for _ in range(3)]
    await _remove(client, cid, candidate, network)
    return {
        "host_port_refused_before_tool_listens": refused,
        "download_64mib_mib_per_s": round(statistics.median(speeds)),
    }


async def ours(runs: int, work: Path) -> dict[str, dict[str, float]]:
    """Through the agent's PodmanRuntime (overlay rootfs, and for `bridge` the session's
    network created and removed), each `--podman-network` setting, interleaved."""
    times: dict[str, list[float]] = {n: [] for n in NETWORK_MODES}
    for i in range(runs):
        for network in NETWORK_MODES:
            times[network].append(await _ours_once(network, i, work))
    return {n: _summary(v) for n, v in times.items()}


async def _ours_once(network: str, i: int, work: Path) -> float:
    rt = PodmanRuntime(
        RuntimeOptions(
            podman_socket=SOCKET,
            oci_runtime="runc",
            ulimits=("nofile=1024:1024", "nproc=1024:1024"),
            podman_network=network,
        )
    )
    rt.owner = "bench"
    root = work / f"{network}{i}" / "root"
    root.mkdir(parents=True)
    port = free_tcp_port()
    t0 = time.monotonic()
    spec = StartSpec(f"bench{i:03d}", IMAGE, "httpd", {}, root, root.parent / "log", port)
    h = await rt.start(spec)
    elapsed = await _first_200(h.port, t0)
    await rt.destroy(h)
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ours", action="store_true", help="also through PodmanRuntime")
    args = parser.parse_args()
    client = PodmanClient(SOCKET)
    result: dict[str, Any] = {
        "machine_note": "one measurement at a time; host network (the anchor) in the same run",
        "runs": args.runs,
        "candidates": await start_runs(client, args.runs),
    }
    for candidate in CANDIDATES:
        result["candidates"][candidate].update(await candidate_checks(client, candidate, args.runs))
    anchor = result["candidates"]["host"]["create_start_to_first_200"]["median_ms"]
    result["start_ratio_vs_host"] = {
        c: round(r["create_start_to_first_200"]["median_ms"] / anchor, 2)
        for c, r in result["candidates"].items()
    }
    if args.ours:
        work = Path(tempfile.mkdtemp(prefix="bench-podman-net-"))
        try:
            result["studios_podman_runtime"] = await ours(args.runs, work)
            r = result["studios_podman_runtime"]
            result["studios_bridge_vs_host"] = round(
                r["bridge"]["median_ms"] / r["host"]["median_ms"], 2
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
