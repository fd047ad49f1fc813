"""Latency of `GET /studios` with 10,000 studios in the database.

Runs the controller in-process (SQLite in a temporary directory, as
`studio-controller serve` would, or the PostgreSQL database `--database-url` names,
which must be empty), inserts the studios directly through the ORM (in one transaction,
for speed), then measures N requests of: the default page, a free-text search, a
keyword search (`status:`), a deep page, and, as the floor every authenticated request
pays (authentication, routing, HTTP on loopback), `GET /studios/templates?max=1`, which
reads nothing else from the database. Prints JSON with p50/p99 in milliseconds and the
controller process's CPU time per request.

    python tests/bench/bench_list_studios.py [--studios 10000] [--requests 200]
        [--database-url postgresql+asyncpg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    "floor: authenticated GET /studios/templates?max=1": "/studios/templates?max=1",
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


async def run(studios: int, requests: int, database_url: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="studios-bench-") as tmp:
        h = ControllerHarness(Path(tmp) / "data", database_url=database_url)
        await h.start()
        try:
            started = time.perf_counter()
            await _insert(h, studios)
            insert_s = time.perf_counter() - started
            if database_url:
                # What autovacuum does within a minute or so of the insert: planner
                # statistics and the visibility map (index-only scans), without which the
                # planner sorts the whole table for a page.
                assert h.controller is not None and h.controller.db is not None
                async with h.controller.db.engine.connect() as conn:
                    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    await conn.exec_driver_sql("VACUUM ANALYZE studios")
            results: dict[str, Any] = {}
            for label, path in QUERIES.items():
                # Once through the harness (which checks the answer against
                # openapi.yaml), then timed with a plain client.
                _, body = await h.request("GET", path, expect=200)
                assert h.http is not None
                headers = {"Authorization": f"Bearer {h.admin_token}"}
                samples = []
                # Client and server share this process: its CPU time per request is
                # theirs together (the client's share is the same for every path).
                cpu0 = time.process_time()
                for _ in range(requests):
                    t0 = time.perf_counter()
                    async with h.http.get(h.url + path, headers=headers) as resp:
                        await resp.read()
                        assert resp.status == 200
                    samples.append((time.perf_counter() - t0) * 1000)
                cpu_ms = (time.process_time() - cpu0) * 1000 / requests
                results[label] = {
                    "path": path,
                    "totalSize": body.get("totalSize"),
                    "returned": len(body.get("studios", body.get("templates", []))),
                    "cpu_ms_per_request": round(cpu_ms, 2),
                    "p50_ms": round(statistics.median(samples), 2),
                    "p99_ms": round(_percentile(samples, 0.99), 2),
                    "max_ms": round(max(samples), 2),
                }
            return {
                "benchmark": "GET /studios latency",
                "database": ("postgresql (asyncpg)" if database_url else "sqlite (aiosqlite)")
                + ", in-process controller, loopback HTTP",
                "load_average": [round(x, 2) for x in os.getloadavg()],
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
    parser.add_argument("--database-url", help="an empty PostgreSQL database (default: SQLite)")
    args = parser.parse_args()
    result = asyncio.run(run(args.studios, args.requests, args.database_url))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
