"""Time from `POST /studios` to `running`, and from `PUT .../stop` to `stopped`.

Runs the controller and one agent (local runtime; the built-in python-http template, or
`--template studios/jupyterlab:4.6-0.1` for JupyterLab like the anchor) as real processes and
measures N create→running and stop→stopped cycles; prints JSON. The anchor is
JupyterHub's spawn → JupyterLab answering through its proxy, measured in the same run
(`tests/bench/anchor_jupyterhub.py --setup` installs it outside the project); where it is not
installed the figure from ANCHORS.md (3.18 s, stop 1.07 s) is quoted and labelled as such.

    .venv/bin/python tests/bench/anchor_jupyterhub.py --setup   # once
    .venv/bin/python tests/bench/bench_startup.py [--runs 5] [--template REPOSITORY:TAG]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench import anchor_jupyterhub
from tests.e2e_harness import LocalStack

ANCHORS_MD = {
    "name": "JupyterHub 6.1.1 SimpleLocalProcessSpawner + configurable-http-proxy",
    "start_median_s": 3.18,
    "stop_median_s": 1.07,
    "source": "ANCHORS.md (not re-measured in this run)",
}


DEFAULT_TEMPLATE = "studios/python-http:3.11-0.1"


async def run(runs: int, template: str = DEFAULT_TEMPLATE) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="studios-bench-") as tmp_name:
        tmp = Path(tmp_name)
        async with LocalStack(tmp) as stack:
            api, compute_env_id = stack.api, stack.compute_env_id
            assert api is not None
            starts: list[float] = []
            stops: list[float] = []
            for i in range(runs):
                t0 = time.perf_counter()
                _, body = await api.request(
                    "POST",
                    "/studios",
                    {
                        "name": f"bench-{i}",
                        "computeEnvId": compute_env_id,
                        "dataStudioToolUrl": template,
                    },
                    expect=200,
                )
                sid = body["studio"]["sessionId"]
                await api.wait_status(sid, "running", timeout=120)
                starts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await api.request("PUT", f"/studios/{sid}/stop", expect=200)
                await api.wait_status(sid, "stopped", timeout=120)
                stops.append(time.perf_counter() - t0)
            return {
                "benchmark": f"studio start/stop latency (local runtime, {template})",
                "runs": runs,
                "post_to_running_s": {
                    "median": round(statistics.median(starts), 3),
                    "min": round(min(starts), 3),
                    "max": round(max(starts), 3),
                    "all": [round(s, 3) for s in starts],
                },
                "stop_to_stopped_s": {
                    "median": round(statistics.median(stops), 3),
                    "min": round(min(stops), 3),
                    "max": round(max(stops), 3),
                },
            }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--template", default=DEFAULT_TEMPLATE)
    args = parser.parse_args()
    runs = args.runs
    result = asyncio.run(run(runs, args.template))
    anchor: dict[str, Any] = dict(ANCHORS_MD)
    if anchor_jupyterhub.available():
        anchor = asyncio.run(anchor_jupyterhub.measure_jupyterhub(runs))
    result["anchor"] = anchor
    ours = result["post_to_running_s"]["median"]
    result["start_ratio_to_anchor"] = round(ours / anchor["start_median_s"], 3)
    print(json.dumps(result, indent=2))
