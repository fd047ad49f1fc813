"""The connect proxy's relay alone, splice against copy against direct, in rounds.

No controller or agent: the proxy (`agent.proxy.ConnectProxy`, the agent's class) runs
in a process of its own with a session lookup that names `proxy_backend.py`'s port,
and the client carries a cookie signed with the proxy's key, as a browser after the
sign-in does. Each round measures direct, `--proxy-relay copy` and `--proxy-relay
splice` one after the other with wrk (2 threads, 50 connections) for 1 KiB and 1 MiB
bodies, with the load averages before and after: this machine is shared, so a ratio
means something only beside the direct rate of the same round. Prints JSON.

    .venv/bin/python tests/bench/bench_proxy_relay.py [--duration 5] [--rounds 3] [--slices 3]
        [--relays copy,splice] [--workers 1,2] [--loop agent|asyncio]

Within a round each target is measured in `--slices` interleaved wrk runs of
`--duration` seconds (direct, copy, splice, direct, ...) and the median kept.
`--workers 1,2` measures each relay with the proxy in one process and in two sharing the
port (`--proxy-workers 2`: `ProxyWorkers`, one worker process beside the proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_proxy import wrk
from tests.e2e_harness import free_port

BACKEND = Path(__file__).with_name("proxy_backend.py")
KEY = b"b" * 32
SID = "be4c0001"


class _Handle:
    status = "running"
    proxy_secret = ""

    def __init__(self, port: int) -> None:
        self.port = port


async def _serve(relay: str, backend_port: int, port: int, processes: int = 1) -> None:
    from agent.proxy import ConnectProxy
    from agent.proxy.workers import ProxyWorkers

    handle = _Handle(backend_port)
    proxy = ConnectProxy(
        lookup=lambda sid: handle if sid == SID else None,
        key=lambda: KEY,
        splice=relay == "splice",
    )
    await proxy.start("127.0.0.1", port, reuse_port=processes > 1)
    if processes > 1:
        workers = ProxyWorkers(
            proxy,
            count=processes - 1,
            host="127.0.0.1",
            port=port,
            sessions=lambda: [(SID, handle)],
            splice=relay == "splice",
        )
        await workers.start()
    await asyncio.Event().wait()


def _wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout} s") from None
            time.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children (proxy workers) so far."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: float(r["rps"]))
    middle = dict(ordered[len(ordered) // 2])
    middle["rps_slices"] = [r["rps"] for r in runs]
    return middle


def run(
    duration: int,
    rounds: int,
    slices_per_target: int = 1,
    relays: tuple[str, ...] = ("copy", "splice"),
    workers: tuple[int, ...] = (1,),
    loop: str = "agent",
) -> dict[str, Any]:
    from studios_shared.connect_token import sign_connect_token

    backend_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([sys.executable, str(BACKEND), str(backend_port)]))
        backend_pid = procs[-1].pid
        serving: dict[str, int] = {}
        _wait_port(backend_port)
        ports: dict[str, int] = {}
        for relay in relays:
            for processes in workers:
                name = relay if processes == 1 else f"{relay}-{processes}proc"
                ports[name] = free_port()
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            __file__,
                            "--serve",
                            relay,
                            str(backend_port),
                            str(ports[name]),
                            str(processes),
                            loop,
                        ]
                    )
                )
                serving[f"proxy-{name}"] = procs[-1].pid
                _wait_port(ports[name])
                # A worker's listener joins shortly after the proxy's own.
                time.sleep(1.0 if processes > 1 else 0)
        cookie = sign_connect_token(
            KEY, session_id=SID, user_id=1, user_name="bench", ttl_seconds=3600, purpose="cookie"
        )
        targets: dict[str, tuple[str, dict[str, str]]] = {
            "direct": (f"http://127.0.0.1:{backend_port}", {}),
        }
        for relay, port in ports.items():
            targets[f"proxy-{relay}"] = (
                f"http://127.0.0.1:{port}",
                {"Host": f"{SID}.localhost:{port}", "Cookie": f"studios-connect={cookie}"},
            )
        out: list[dict[str, Any]] = []
        for _ in range(rounds):
            round_: dict[str, Any] = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
            for size in ("1k", "1m"):
                # Interleaved slices, the median kept: the load of other runs on this
                # machine comes and goes within seconds, and one long run per target
                # would hand one of them a quiet window and another a busy one.
                slices: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
                for _slice in range(slices_per_target):
                    for name, (base, h) in targets.items():
                        # The serving processes' CPU per request (the backend's for
                        # direct): less noisy than the rate on a shared host.
                        pid = backend_pid if name == "direct" else serving[name]
                        before = _cpu_seconds(pid)
                        figures = wrk(f"{base}/{size}", h, duration, 50)
                        spent = _cpu_seconds(pid) - before
                        figures["cpu_us_per_request"] = round(
                            spent / max(1.0, figures["rps"] * duration) * 1e6, 1
                        )
                        slices[name].append(figures)
                row = {name: _median(runs) for name, runs in slices.items()}
                for figures in row.values():
                    figures["rps_ratio_to_direct"] = round(figures["rps"] / row["direct"]["rps"], 3)
                round_[size] = row
            round_["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            out.append(round_)
        return {
            "benchmark": "proxy relay alone: wrk -t2 -c50, direct and each relay / process count "
            "per round",
            "duration_s": duration,
            "slices_per_target": slices_per_target,
            "loop": loop,
            "cores": os.cpu_count(),
            "rounds": out,
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--serve":
        from agent.proxy.loop import run as run_on_agent_loop

        serving = _serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        # The agent's loop (uvloop where installed), or asyncio's for comparison.
        if sys.argv[6] == "asyncio":
            asyncio.run(serving)
        else:
            run_on_agent_loop(serving)
        raise SystemExit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--slices", type=int, default=3, help="interleaved wrk runs per target and size (median)"
    )
    parser.add_argument("--relays", default="copy,splice", help="comma-separated: copy, splice")
    parser.add_argument(
        "--workers", default="1", help="comma-separated proxy process counts, e.g. 1,2"
    )
    parser.add_argument(
        "--loop",
        default="agent",
        choices=("agent", "asyncio"),
        help="the proxy processes' event loop: the agent's (uvloop where installed) or asyncio's",
    )
    args = parser.parse_args()
    result = run(
        args.duration,
        args.rounds,
        args.slices,
        tuple(args.relays.split(",")),
        tuple(int(w) for w in args.workers.split(",")),
        args.loop,
    )
    print(json.dumps(result, indent=2))
