"""Migrations and databases: the models match the migrations; PostgreSQL works."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

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
