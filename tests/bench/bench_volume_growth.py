"""Growth reaction time of a session volume: free space < 1 GiB → the file system has grown.

Runs the controller and an agent (local runtime, `--volume-kind xfs-loop`; needs root) as real
processes, starts a studio, and writes into its root directory at full speed from this process
while polling `statvfs` every 5 ms: it records when free space first drops below 1 GiB and when
the total size next increases. Prints JSON. The anchor is the DESIGN/ANCHORS figure: a full-speed
writer fills 1 GiB of headroom in 0.25-0.5 s, so the reaction must stay well below that.

    .venv/bin/python tests/bench/bench_volume_growth.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e_harness import LocalStack

GIB = 1024**3
CHUNK = b"\0" * (8 * 1024 * 1024)


class _Run(TypedDict, total=False):
    """One run's timings (seconds, GiB, MiB/s), or the write's error."""

    reaction_s: float
    grown_to_gib: float
    write_mib_s: float
    error: str


def _write_until_grown(root: Path, result: _Run) -> None:
    """Write random-ish data until one growth happened; record the timings in `result`."""
    start = os.statvfs(root)
    total0 = start.f_blocks * start.f_frsize
    below_at = 0.0
    stop = threading.Event()

    def watch() -> None:
        nonlocal below_at
        while not stop.is_set():
            st = os.statvfs(root)
            free = st.f_bavail * st.f_frsize
            total = st.f_blocks * st.f_frsize
            now = time.perf_counter()
            if not below_at and free < GIB:
                below_at = now
            if total > total0:
                result["reaction_s"] = now - below_at if below_at else 0.0
                result["grown_to_gib"] = total / GIB
                stop.set()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    written = 0
    with open(root / "fill.bin", "wb", buffering=0) as out:
        while not stop.is_set() and written < 6 * GIB:
            try:
                out.write(CHUNK)
            except OSError as exc:
                result["error"] = str(exc)
                break
            written += len(CHUNK)
    stop.set()
    watcher.join()
    result["write_mib_s"] = written / (1024 * 1024) / (time.perf_counter() - t0)
    (root / "fill.bin").unlink(missing_ok=True)


async def run(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="studios-bench-grow-") as tmp_name:
        tmp = Path(tmp_name)
        samples: list[_Run] = []
        async with LocalStack(tmp, agent_args=("--volume-kind", "xfs-loop")) as stack:
            api, ce, agent = stack.api, stack.compute_env_id, stack.agent
            assert api is not None and agent is not None
            for i in range(runs):
                _, body = await api.request(
                    "POST", "/studios", {"name": f"grow-{i}", "computeEnvId": ce}, expect=200
                )
                sid = body["studio"]["sessionId"]
                await api.wait_status(sid, "running", timeout=120)
                session = next(s for s in agent.cli("sessions")["sessions"] if s["id"] == sid)
                result: _Run = {}
                await asyncio.to_thread(_write_until_grown, Path(session["rootDir"]), result)
                samples.append(result)
                await api.request("PUT", f"/studios/{sid}/stop", expect=200)
                await api.wait_status(sid, {"stopped", "errored"}, timeout=300)
    reactions = [s["reaction_s"] for s in samples if "reaction_s" in s]
    return {
        "benchmark": "xfs-loop session volume: free < 1 GiB -> grown (full-speed writer)",
        "runs": runs,
        "reaction_s": {
            "median": round(statistics.median(reactions), 4) if reactions else None,
            "min": round(min(reactions), 4) if reactions else None,
            "max": round(max(reactions), 4) if reactions else None,
        },
        "samples": [
            {k: round(v, 4) for k, v in s.items() if isinstance(v, float)} for s in samples
        ],
        "errors": [s["error"] for s in samples if "error" in s],
        "anchor": "ANCHORS.md: a full-speed writer fills 1 GiB of headroom in 0.25-0.5 s",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    print(json.dumps(asyncio.run(run(parser.parse_args().runs)), indent=2))
