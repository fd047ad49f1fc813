"""Latency of `GET /studios` with 10,000 studios in the database.

Runs the controller in-process (SQLite in a temporary directory, as
`studio-controller serve` would), inserts the studios directly through the ORM
(in one transaction, for speed), then measures N requests of: the default page,
a free-text search, a keyword search (`status:`) and a deep page. Prints JSON
with p50/p99 in milliseconds.

    python tests/bench/bench_list_studios.py [--studios 10000] [--requests 200]
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

from controller.models import Studio, utcnow
from tests.conftest import ControllerHarness

QUERIES = {
    "default page": "/studios",
    "search (free text)": "/studios?search=studio-42",
    "search (status: + text)": "/studios?search=status:running%20studio",
    "deep page (offset 9000, max 50)": "/studios?offset=9000&max=50",
}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def _insert(h: ControllerHarness, count: int) -> None:
    assert h.controller is not None and h.controller.db is not None
    now = utcnow()
    async with h.controller.db.transaction() as session:
        for n in range(count):
            session.add(
                Studio(
                    session_id=f"{n:08x}",
                    workspace_id=1,
                    user_id=1,
                    name=f"studio-{n}",
                    template_repository="studios/python-http:3.11-0.1",
                    tool="python-http",
                    custom_image=False,
                    compute_env_id=h.compute_env_id,
                    configuration={"cpu": 1},
                    is_private=False,
                    allowed_user_ids=[],
                    status="running" if n % 10 == 0 else "stopped",
                    desired_status="stopped",
                    generation=0,
                    progress=[],
                    volume={},
                    date_created=now,
                    last_updated=now,
                    status_updated_at=now,
                )
            )


async def run(studios: int, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="studios-bench-") as tmp:
        h = ControllerHarness(Path(tmp) / "data")
        await h.start()
        try:
            started = time.perf_counter()
            await _insert(h, studios)
            insert_s = time.perf_counter() - started
            results: dict[str, Any] = {}
            for label, path in QUERIES.items():
                # Once through the harness (which checks the answer against
                # openapi.yaml), then timed with a plain client.
                _, body = await h.request("GET", path, expect=200)
                assert h.http is not None
                headers = {"Authorization": f"Bearer {h.admin_token}"}
                samples = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    async with h.http.get(h.url + path, headers=headers) as resp:
                        await resp.read()
                        assert resp.status == 200
                    samples.append((time.perf_counter() - t0) * 1000)
                results[label] = {
                    "path": path,
                    "totalSize": body["totalSize"],
                    "returned": len(body["studios"]),
                    "p50_ms": round(statistics.median(samples), 2),
                    "p99_ms": round(_percentile(samples, 0.99), 2),
                    "max_ms": round(max(samples), 2),
                }
            return {
                "benchmark": "GET /studios latency",
                "database": "sqlite (aiosqlite), in-process controller, loopback HTTP",
                "studios": studios,
                "requests_per_query": requests,
                "insert_seconds": round(insert_s, 2),
                "results": results,
            }
        finally:
            await h.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studios", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.studios, args.requests)), indent=2))


if __name__ == "__main__":
    main()
