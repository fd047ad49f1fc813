"""The controller's files are its own (issue 13).

The data directory 0700; the SQLite database and its -wal/-shm files 0600 (they were 0644,
readable by every local user, API token hashes and encrypted credentials included); tokens
and keys 0600. A data directory and database left wider by an older controller are narrowed
at start.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from controller.db import Database, secure_sqlite_file
from tests.conftest import ControllerHarness


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_dir_database_tokens_and_keys_are_owner_only(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    # Something written, so the WAL and its index exist.
    await h.request("POST", "/tokens", {"name": "wal"}, expect=200)
    data = h.data_dir
    assert _mode(data) == 0o700
    for name in ("studios.db", "studios.db-wal", "studios.db-shm"):
        assert (data / name).exists(), name
        assert _mode(data / name) == 0o600, name
    for name in ("admin-token", "agent-token", "connect-key", "credentials-key"):
        assert _mode(data / name) == 0o600, name
    keys = sorted((data / "pki").glob("*.key"))
    assert keys
    for key in keys:
        assert _mode(key) == 0o600, key
    assert _mode(data / "pki") == 0o700


async def test_wider_modes_of_an_older_controller_are_narrowed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    h = ControllerHarness(data)
    await h.start(with_compute_env=False)
    try:
        assert h.controller is not None
        await h.controller.stop()
        os.chmod(data, 0o755)
        for name in ("studios.db", "studios.db-wal", "studios.db-shm"):
            if (data / name).exists():
                os.chmod(data / name, 0o644)
        await h.start(with_compute_env=False)
        await h.request("POST", "/tokens", {"name": "after"}, expect=200)
        assert _mode(data) == 0o700
        for name in ("studios.db", "studios.db-wal", "studios.db-shm"):
            assert _mode(data / name) == 0o600, name
    finally:
        await h.close()


async def test_sqlite_file_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
        try:
            await db.migrate()
        finally:
            await db.close()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "x.db") == 0o600
    for suffix in ("-wal", "-shm"):
        companion = tmp_path / f"x.db{suffix}"
        if companion.exists():
            assert _mode(companion) == 0o600
    # In-memory databases have no file.
    Database("sqlite+aiosqlite:///:memory:")
    secure_sqlite_file(tmp_path / "y.db")
    assert _mode(tmp_path / "y.db") == 0o600
