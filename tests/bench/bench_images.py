"""Benchmark (JSON): the project's studio images (issue 15).

- create -> JupyterLab answering through the proxy: a real agent (podman runtime, xfs-loop
  volume, fake controller) is told to run `studios/jupyterlab:4.6-0.1`; the time from the
  desired state's push to the first 200 of `/api/status` through the agent's connect proxy;
- the anchor in the same run: a bare `podman run -d` of the same image, to the first 200 of
  `/api/status` on its published port (with the secret and user headers the proxy sends);
- image sizes, and build times: warm (`images build` with nothing changed) always, cold
  (`--cold`: both images rebuilt, base by mmdebstrap, JupyterLab without a layer cache:
  its parent is new) on request.

Run as root after scripts/podman-setup:
    .venv/bin/python tests/bench/bench_images.py [--runs 3] [--cold]

Measured (2026-12-01, 2 cores shared with other test runs, load ~4): create -> JupyterLab
through the proxy median 5.3 s (4.3-6.3), bare `podman run` -> /api/status 5.2 s
(5.1-5.7): JupyterLab's own start dominates; the agent's volume, overlay, network and proxy
add nothing measurable. Images: base 178 MB, jupyterlab 397 MB (base included). Builds:
cold 210 s for both (base 121 s: mmdebstrap ~110 s + import; jupyterlab 87 s: pip), warm
0.2 s (nothing built).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script: the repository's `tests` package (the fake controller) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.images.builder import build_images, inspect_image
from agent.images.definitions import default_definitions_dir, load_definitions
from agent.runtime import free_tcp_port
from studios_shared.connect_token import sign_connect_token
from tests.agent_fixtures import make_agent_config
from tests.fake_controller import FakeController, desired

TEMPLATE = "studios/jupyterlab:4.6-0.1"
IMAGE = "localhost/studios/jupyterlab:4.6-0.1"
SOCKET = Path("/run/podman/podman.sock")


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
    }


async def _first_200(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], t0: float
) -> float:
    while time.monotonic() - t0 < 180:
        try:
            async with http.get(url, headers=headers) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 in 180 s")


async def through_the_proxy(runs: int, work: Path) -> list[float]:
    controller = FakeController()
    await controller.start()
    config = make_agent_config(
        work,
        controller,
        runtime="podman",
        volume_kind="xfs-loop",
        podman_socket=SOCKET,
        podman_runtime="runc",
        container_ulimits=("nofile=1024:1024", "nproc=1024:1024"),
        start_timeout_seconds=150.0,
    )
    agent = Agent(config)
    await agent.start()
    out = []
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as http:
            for i in range(runs):
                sid = f"be0c{i:04x}"
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
                d = desired(sid, image=TEMPLATE)
                d.spec.tool = "jupyter"
                t0 = time.monotonic()
                controller.push(d)
                url = f"http://127.0.0.1:{agent.proxy_port}/api/status"
                out.append(await _first_200(http, url, headers, t0))
                controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED))
                await controller.wait_status(sid, pb.SESSION_STATUS_STOPPED, timeout=120)
    finally:
        await agent.close()
        await controller.stop()
    return out


async def bare_podman_run(runs: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as http:
        for _ in range(runs):
            port = free_tcp_port()
            headers = {"X-Studios-Proxy-Secret": "bench", "X-Studios-User": "alice"}
            t0 = time.monotonic()
            argv = ["podman", "run", "-d", "--rm", "-e", f"CONNECT_TOOL_PORT={port}"]
            argv += ["-e", "CONNECT_PROXY_SECRET=bench", "-p", f"127.0.0.1:{port}:{port}", IMAGE]
            started = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=True,
            )
            try:
                url = f"http://127.0.0.1:{port}/api/status"
                out.append(await _first_200(http, url, headers, t0))
            finally:
                subprocess.run(
                    ["podman", "rm", "-f", "-t", "0", started.stdout.strip()],
                    capture_output=True,
                    check=False,
                )
    return out


def builds(cold: bool) -> dict[str, object]:
    definitions = load_definitions(default_definitions_dir())
    names = list(definitions)
    result: dict[str, object] = {}
    if cold:
        t0 = time.monotonic()
        done = build_images(definitions, names, force=names)
        result["cold_total_s"] = round(time.monotonic() - t0, 1)
        result["cold_per_image_s"] = {r.name: r.seconds for r in done}
    t0 = time.monotonic()
    done = build_images(definitions, names)
    result["warm_total_s"] = round(time.monotonic() - t0, 2)
    result["warm_statuses"] = {r.name: r.status for r in done}
    result["sizes_mb"] = {
        d.name: round(int((inspect_image(d.reference) or {}).get("Size") or 0) / 1e6, 1)
        for d in definitions.values()
    }
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also rebuild every image")
    args = parser.parse_args()
    report: dict[str, object] = {"builds": builds(args.cold)}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        ours = await through_the_proxy(args.runs, Path(tmp))
    anchor = await bare_podman_run(args.runs)
    report["create_to_jupyterlab_through_proxy"] = _summary(ours)
    report["anchor_bare_podman_run_to_api_status"] = _summary(anchor)
    report["runs"] = args.runs
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
