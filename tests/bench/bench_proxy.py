"""Throughput and latency through the agent's connect proxy, beside direct, nginx and
configurable-http-proxy (JupyterHub's proxy), measured in the same run with wrk.

The backend is `proxy_backend.py` (aiohttp, 1 KiB and 1 MiB bodies) run as a real studio on
the local runtime; our proxy is reached as a browser would after the studioUrl sign-in (Host
`<sessionId>.localhost`, the session cookie). nginx (Debian's nginx-light, twice: with
its default proxy buffering, and unbuffered as our proxy relays) and
configurable-http-proxy (`tests/bench/anchor_jupyterhub.py --setup`) are skipped, and say so,
where they are not installed. Prints JSON.

    .venv/bin/python tests/bench/bench_proxy.py [--duration 5] [--rounds 3]
        [--relay splice|copy] [--proxy-workers N] [--skip-anchors]

Each size is measured in `--rounds` interleaved rounds (direct, ours, the anchors, then
again), each wrk run `--duration` seconds; a target's ratio to direct is the median of
its rounds' ratios, each taken beside the direct figure of the same round.
CPU per request is reported for wrk, the backend and each proxy (ours: the agent with
its proxy workers; nginx: its master and workers): the two cores are shared by all
three, so a proxy costing as much per request as the backend and wrk together halves the
rate whatever its code.

`--relay` is the agent's `--proxy-relay` (splice: the tools' bytes move with os.splice;
copy: through Python), `--proxy-workers` the agent's (processes sharing the port). The
load averages before and after are part of the JSON: this machine is shared, so a ratio
means something only beside the direct rate and the load of the same run. Each wrk run
also reports the CPU its virtual machine lost to the hypervisor meanwhile (`steal_pct`,
see host_noise.py), which the load average does not show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.anchor_jupyterhub import CHP
from tests.bench.host_noise import StealMeter
from tests.e2e_harness import AgentProcess, LocalStack, RestClient, free_port

BACKEND = Path(__file__).with_name("proxy_backend.py")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, headers: dict[str, str], duration: int, connections: int) -> dict[str, Any]:
    threads = min(2, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url]
    for name, value in headers.items():
        argv[1:1] = ["-H", f"{name}: {value}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": round(rps, 1),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def _runs(proc: psutil.Process, what: str) -> bool:
    with contextlib.suppress(psutil.Error):
        return what in " ".join(proc.cmdline())
    return False


def _with_children(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def _is_proxy_worker(proc: psutil.Process) -> bool:
    return _runs(proc, "agent.proxy.worker")


def _children_cpu_seconds() -> float:
    """CPU of this process's waited-for children: the wrk runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def start_nginx(
    tmp: Path, backend_port: int, buffering: bool = True
) -> tuple[subprocess.Popen[bytes] | None, int]:
    """nginx in front of the backend. With `buffering` (nginx's default) a 1 MiB
    response outgrows its proxy buffers and is spooled through a temporary file while the
    client reads slower than the tool writes; without it, nginx relays as ours does."""
    nginx = shutil.which("nginx")
    if nginx is None:
        return None, 0
    port = free_port()
    where = tmp / ("nginx" if buffering else "nginx-unbuffered")
    where.mkdir()
    conf = where / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 2;
pid {where}/nginx.pid;
error_log {where}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {where};
    proxy_temp_path {where};
    upstream tool {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://tool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering {"on" if buffering else "off"};
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(where), "-g", "daemon off;"],
        stderr=subprocess.DEVNULL,
    )
    return proc, port


def start_chp(backend_port: int) -> tuple[subprocess.Popen[bytes] | None, int]:
    if not CHP.exists():
        return None, 0
    port = free_port()
    proc = subprocess.Popen(
        [
            str(CHP),
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-port",
            str(free_port()),
            "--default-target",
            f"http://127.0.0.1:{backend_port}",
            "--log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
    )
    return proc, port


async def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


async def sign_in(api: RestClient, studio: dict[str, Any]) -> str:
    async with api.http.get(
        studio["studioUrl"],
        headers={"Authorization": f"Bearer {api.token}"},
        allow_redirects=False,
    ) as resp:
        location = resp.headers["Location"]
    async with api.http.get(location, allow_redirects=False) as resp:
        cookie = resp.cookies.get("studios-connect")
        if cookie is None:
            raise RuntimeError(f"the proxy set no session cookie ({resp.status})")
        return cookie.value


async def run(
    duration: int, relay: str, skip_anchors: bool, proxy_workers: int = 1, rounds: int = 3
) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="studios-bench-proxy-") as tmp_name:
        tmp = Path(tmp_name)
        templates = tmp / "templates.json"
        templates.write_text(
            json.dumps(
                {
                    "studios/bench-backend": {
                        "tool": "bench-backend",
                        "command": ["{python}", str(BACKEND), "{port}"],
                    }
                }
            )
        )
        helpers: list[subprocess.Popen[bytes]] = []
        stack = LocalStack(
            tmp,
            # The proxy is measured here, not the volume.
            agent_args=(
                "--local-templates",
                str(templates),
                "--volume-kind",
                "directory",
                "--proxy-relay",
                relay,
                "--proxy-workers",
                str(proxy_workers),
            ),
        )
        try:
            async with stack:
                assert stack.api is not None and stack.agent is not None
                load_before = os.getloadavg()
                result = await _measure(
                    tmp,
                    stack.api,
                    stack.agent,
                    stack.compute_env_id,
                    duration,
                    helpers,
                    skip_anchors,
                    rounds,
                )
                result["relay"] = relay
                result["proxy_workers"] = proxy_workers
                result["load_average_before"] = [round(x, 2) for x in load_before]
                result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
                return result
        finally:
            for proc in helpers:
                proc.terminate()
                proc.wait(timeout=10)
            subprocess.run(["pkill", "-f", str(BACKEND)], check=False)


async def _measure(
    tmp: Path,
    api: RestClient,
    agent: AgentProcess,
    compute_env_id: str,
    duration: int,
    helpers: list[subprocess.Popen[bytes]],
    skip_anchors: bool = False,
    rounds: int = 3,
) -> dict[str, Any]:
    _, body = await api.request(
        "POST",
        "/studios",
        {
            "name": "proxy-bench",
            "computeEnvId": compute_env_id,
            "dataStudioToolUrl": "studios/bench-backend:1-0.1",
        },
        expect=200,
    )
    studio = await api.wait_status(body["studio"]["sessionId"], "running", timeout=120)
    cookie = await sign_in(api, studio)
    session = next(s for s in agent.cli("sessions")["sessions"] if s["id"] == studio["sessionId"])
    backend_port = int(session["toolPort"])
    targets: dict[str, tuple[str, dict[str, str]]] = {
        "direct": (f"http://127.0.0.1:{backend_port}", {}),
        "studios-proxy": (
            f"http://127.0.0.1:{agent.proxy_port}",
            {
                "Host": f"{studio['sessionId']}.localhost:{agent.proxy_port}",
                "Cookie": f"studios-connect={cookie}",
            },
        ),
    }
    # Each anchor's main process: it and its children (nginx's workers) are its cost.
    anchors: dict[str, int] = {}
    nginx, nginx_port = (None, 0) if skip_anchors else start_nginx(tmp, backend_port)
    if nginx is not None:
        helpers.append(nginx)
        await wait_port(nginx_port)
        targets["nginx"] = (f"http://127.0.0.1:{nginx_port}", {})
        anchors["nginx"] = nginx.pid
        unbuffered, port = start_nginx(tmp, backend_port, buffering=False)
        if unbuffered is not None:
            helpers.append(unbuffered)
            await wait_port(port)
            targets["nginx-unbuffered"] = (f"http://127.0.0.1:{port}", {})
            anchors["nginx-unbuffered"] = unbuffered.pid
    chp, chp_port = (None, 0) if skip_anchors else start_chp(backend_port)
    if chp is not None:
        helpers.append(chp)
        await wait_port(chp_port)
        targets["configurable-http-proxy"] = (f"http://127.0.0.1:{chp_port}", {})
        anchors["configurable-http-proxy"] = chp.pid

    # The agent and its proxy workers: their CPU per request is the proxy's cost.
    assert agent.proc is not None
    proxy_procs = [psutil.Process(agent.proc.pid)]
    proxy_procs += [p for p in proxy_procs[0].children(recursive=True) if _is_proxy_worker(p)]
    backend_procs = [p for p in proxy_procs[0].children(recursive=True) if _runs(p, str(BACKEND))]
    # nginx forks its workers after it listens: looked up once they are there.
    await asyncio.sleep(0.5 if anchors else 0)
    proxies = {name: _with_children(pid) for name, pid in anchors.items()}
    proxies["studios-proxy"] = proxy_procs
    results: dict[str, Any] = {}
    for size in ("1k", "1m"):
        rounds_by_target: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        # Interleaved (direct, ours, anchors; again...): this 2-core host's speed drifts
        # by a third within minutes, so each ratio compares figures taken side by side.
        for _ in range(rounds):
            for name, (base, headers) in targets.items():
                # Who spends the two cores: wrk, the backend, and the proxy.
                proxy = proxies.get(name, [])
                before = (
                    _children_cpu_seconds(),
                    _cpu_seconds(backend_procs),
                    _cpu_seconds(proxy),
                )
                with StealMeter() as steal:
                    figures = wrk(f"{base}/{size}", headers, duration, 50)
                figures["steal_pct"] = steal.pct
                requests = max(1.0, figures["rps"] * duration)
                used = (
                    _children_cpu_seconds() - before[0],
                    _cpu_seconds(backend_procs) - before[1],
                    _cpu_seconds(proxy) - before[2],
                )
                figures["wrk_cpu_us_per_request"] = round(1e6 * used[0] / requests, 1)
                figures["backend_cpu_us_per_request"] = round(1e6 * used[1] / requests, 1)
                if proxy:
                    figures["proxy_cpu_us_per_request"] = round(1e6 * used[2] / requests, 1)
                rounds_by_target[name].append(figures)
        row: dict[str, Any] = {}
        direct_rounds = rounds_by_target["direct"]
        for name, (base, headers) in targets.items():
            per_round = rounds_by_target[name]
            ratios = [f["rps"] / d["rps"] for f, d in zip(per_round, direct_rounds, strict=True)]
            # Latencies and errors of the round with the median rate.
            figures = dict(sorted(per_round, key=lambda f: f["rps"])[(len(per_round) - 1) // 2])
            figures["rps"] = round(statistics.median(f["rps"] for f in per_round), 1)
            figures["rps_per_round"] = [f["rps"] for f in per_round]
            figures["rps_ratio_to_direct"] = round(statistics.median(ratios), 3)
            figures["rps_ratio_per_round"] = [round(r, 3) for r in ratios]
            figures["steal_pct_per_round"] = [f["steal_pct"] for f in per_round]
            figures["single_connection_p50_ms"] = wrk(
                f"{base}/{size}", headers, max(2, duration // 3), 1
            )["p50_ms"]
            row[name] = figures
        direct = row["direct"]
        for figures in row.values():
            figures["added_p50_ms_single_connection"] = round(
                figures["single_connection_p50_ms"] - direct["single_connection_p50_ms"],
                3,
            )
        results[size] = row
    return {
        "benchmark": "connect proxy: wrk -t2 -c50 (and -c1 for added latency)",
        "duration_s": duration,
        "rounds": rounds,
        "missing_anchors": [
            name
            for name, proc in (("nginx", nginx), ("configurable-http-proxy", chp))
            if proc is None
        ],
        "results": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size")
    parser.add_argument("--relay", choices=("splice", "copy"), default="copy")
    parser.add_argument("--proxy-workers", type=int, default=1)
    parser.add_argument("--skip-anchors", action="store_true", help="only direct and ours")
    args = parser.parse_args()
    result = asyncio.run(
        run(args.duration, args.relay, args.skip_anchors, args.proxy_workers, args.rounds)
    )
    print(json.dumps(result, indent=2))
