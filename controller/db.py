"""Database access: the async engine, transactions and migrations.

SQLite (aiosqlite) is the default and PostgreSQL (asyncpg) is supported. For
SQLite every transaction starts with ``BEGIN IMMEDIATE``: writers are
serialised up front instead of failing with "database is locked" when two
read-then-write transactions race; one that only reads (`Database.read`) begins
DEFERRED and takes no write lock; WAL mode keeps readers of other processes
(`studio-controller user add`) unblocked. SQLite's `lower()` is replaced by
Python's, so case-insensitive search folds non-ASCII letters as PostgreSQL does.

A SQLite database file is the owner's alone (0600): created so before SQLite
opens it, and narrowed if an older controller left it wider. SQLite gives its
-wal, -shm and -journal files the database file's mode, and those already
there are narrowed too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

__all__ = ["DATABASE_FILE_MODE", "Database", "alembic_config", "escape_like", "secure_sqlite_file"]

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
DATABASE_FILE_MODE = 0o600
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """The Alembic configuration of the packaged migrations."""
    cfg = Config(str(_PACKAGE_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(_PACKAGE_DIR / "migrations"))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# An execution option naming a transaction that only reads (`Database.read`).
_READ_ONLY = "studios_read_only"


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves (and make DDL transactional).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
        dbapi_connection.create_function("lower", 1, _lower, deterministic=True)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("BEGIN DEFERRED")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def secure_sqlite_file(path: Path) -> None:
    """`path` (a SQLite database) and its companion files exist only with mode 0600."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, DATABASE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != DATABASE_FILE_MODE:
            os.fchmod(fd, DATABASE_FILE_MODE)
    finally:
        os.close(fd)
    for suffix in _SQLITE_COMPANIONS:
        companion = path.with_name(path.name + suffix)
        try:
            if companion.stat().st_mode & 0o777 != DATABASE_FILE_MODE:
                os.chmod(companion, DATABASE_FILE_MODE)
        except FileNotFoundError:
            pass


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            path = _sqlite_file(url)
            if path is not None:
                secure_sqlite_file(path)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _install_sqlite_hooks(self.engine)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (``alembic upgrade head``)."""

        def _upgrade(connection: Connection) -> None:
            command.upgrade(alembic_config(connection), "head")

        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade)
        log.info("database schema is up to date (%s)", self.engine.url.render_as_string())

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One session in one transaction: committed on success, rolled back on error."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """One session in a transaction that only reads.

        On SQLite it begins DEFERRED: it takes no write lock, so a list or a lookup
        neither waits behind the agents' writes nor holds them up, and under WAL it
        reads one snapshot. Nothing enforces the "only": a write in it would take the
        lock late and may fail with "database is locked", so anything that may write
        uses `transaction`. (`PRAGMA query_only` would enforce it, for two more round
        trips through aiosqlite's thread per request: about 3 ms of a 25 ms list.) On
        PostgreSQL it is `transaction`."""
        async with self._sessions() as session, session.begin():
            await session.connection(execution_options={_READ_ONLY: True})
            yield session

    async def close(self) -> None:
        await self.engine.dispose()


def escape_like(text: str) -> str:
    """`text` matched literally by a LIKE pattern written with ``escape="\\"``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
