"""Migrations and databases: the models match the migrations; PostgreSQL works."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from controller.db import Database
from controller.models import Base
from tests.conftest import ControllerHarness


async def test_models_match_migrations(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    try:
        await db.migrate()
        await db.migrate()  # idempotent

        def diff(connection):  # type: ignore[no-untyped-def]
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)

        async with db.engine.connect() as conn:
            differences = await conn.run_sync(diff)
        assert differences == []
    finally:
        await db.close()


async def test_postgresql(tmp_path: Path, postgres_database: str) -> None:
    """Against a real server (`postgres_url` in tests/conftest.py says which)."""
    harness = ControllerHarness(tmp_path / "data", database_url=postgres_database)
    await harness.start()
    try:
        _, body = await harness.request(
            "POST",
            "/studios?autoStart=false",
            {"name": "pg studio", "computeEnvId": harness.compute_env_id},
            expect=200,
        )
        sid = body["studio"]["sessionId"]
        await harness.request(
            "POST",
            "/studios",
            {"name": "pg studio", "computeEnvId": harness.compute_env_id},
            expect=409,
        )
        await harness.restart()
        _, body = await harness.request("GET", f"/studios/{sid}", expect=200)
        assert body["name"] == "pg studio"
        _, body = await harness.request("GET", "/studios?search=PG", expect=200)
        assert body["totalSize"] == 1
    finally:
        await harness.close()


async def test_a_read_does_not_wait_for_a_writer_on_sqlite(tmp_path: Path) -> None:
    """`Database.read` takes no write lock: a list answers while an agent's write
    transaction holds SQLite's lock (a `transaction` would wait up to busy_timeout, 30 s),
    and reads the snapshot from before that write."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    try:
        async with db.transaction() as session:
            await session.execute(text("CREATE TABLE t (a INTEGER)"))
            await session.execute(text("INSERT INTO t VALUES (1)"))
        async with db.transaction() as writer:
            await writer.execute(text("INSERT INTO t VALUES (2)"))

            async def count() -> int:
                async with db.read() as reader:
                    return int((await reader.execute(text("SELECT count(*) FROM t"))).scalar_one())

            assert await asyncio.wait_for(count(), timeout=5) == 1
        assert await count() == 2
        # Writers still exclude each other: a transaction waits for the lock.
        async with db.transaction() as writer:
            await writer.execute(text("INSERT INTO t VALUES (3)"))
            other = asyncio.ensure_future(_insert(db, 4))
            await asyncio.sleep(0.3)
            assert not other.done()
        await asyncio.wait_for(other, timeout=10)
        assert await count() == 4
    finally:
        await db.close()


async def _insert(db: Database, value: int) -> None:
    async with db.transaction() as session:
        await session.execute(text("INSERT INTO t VALUES (:v)"), {"v": value})
