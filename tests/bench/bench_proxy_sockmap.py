"""Is a BPF sockmap (the kernel carrying response bytes socket to socket) a route to the
connect proxy's 1 MiB target? Direct, the agent's proxy (copy relay) and
`sockmap_relay.py` in both its modes, interleaved in rounds of wrk (2 threads, 50
connections) for 1 KiB and 1 MiB bodies from `proxy_backend.py`. Beside each rate, the
whole machine's busy share during the run (host_noise.py), since the sockmap's sends run in
kernel workers that no process's CPU time shows. Prints JSON. Needs root.

    .venv/bin/python tests/bench/bench_proxy_sockmap.py [--duration 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_proxy import wrk
from tests.bench.bench_proxy_relay import KEY, SID, _wait_port
from tests.bench.host_noise import StealMeter
from tests.e2e_harness import free_port

HERE = Path(__file__).parent


def run(duration: int, rounds: int) -> dict[str, Any]:
    from studios_shared.connect_token import sign_connect_token

    backend = free_port()
    ports = {name: free_port() for name in ("proxy-copy", "probe-copy", "probe-sockmap")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen([sys.executable, str(HERE / "proxy_backend.py"), str(backend)])
        )
        _wait_port(backend)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "bench_proxy_relay.py"),
                    "--serve",
                    "copy",
                    str(backend),
                    str(ports["proxy-copy"]),
                    "1",
                    "agent",
                ]
            )
        )
        for mode in ("copy", "sockmap"):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(HERE / "sockmap_relay.py"),
                        mode,
                        str(ports[f"probe-{mode}"]),
                        str(backend),
                    ]
                )
            )
        for port in ports.values():
            _wait_port(port)
        cookie = sign_connect_token(
            KEY, session_id=SID, user_id=1, user_name="bench", ttl_seconds=3600, purpose="cookie"
        )
        targets: dict[str, tuple[str, dict[str, str]]] = {
            "direct": (f"http://127.0.0.1:{backend}", {}),
            "proxy-copy": (
                f"http://127.0.0.1:{ports['proxy-copy']}",
                {
                    "Host": f"{SID}.localhost:{ports['proxy-copy']}",
                    "Cookie": f"studios-connect={cookie}",
                },
            ),
            "probe-copy": (f"http://127.0.0.1:{ports['probe-copy']}", {}),
            "probe-sockmap": (f"http://127.0.0.1:{ports['probe-sockmap']}", {}),
        }
        out: list[dict[str, Any]] = []
        for _ in range(rounds):
            row: dict[str, Any] = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
            for size in ("1k", "1m"):
                figures: dict[str, dict[str, Any]] = {}
                for name, (base, headers) in targets.items():
                    with StealMeter() as meter:
                        result = wrk(f"{base}/{size}", headers, duration, 50)
                    result["machine_busy_pct"] = meter.busy_pct
                    figures[name] = result
                for result in figures.values():
                    result["rps_ratio_to_direct"] = round(
                        result["rps"] / figures["direct"]["rps"], 3
                    )
                row[size] = figures
            out.append(row)
        return {
            "benchmark": "in-kernel response path (BPF sockmap) against the agent's proxy and "
            "direct: wrk -t2 -c50",
            "kernel": os.uname().release,
            "duration_s": duration,
            "rounds": out,
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("bench_proxy_sockmap: loading a BPF program needs root")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.duration, args.rounds), indent=2))
