"""A restore ends soon after its cancel event is set (issue 16: a start cancelled
mid-restore need not wait for the whole checkpoint). Real file store, many small packs, so
the restore has many ranges to stop between. `CancelAfterLoads`, a test-only wrapper
around the store's real backend, sets the event from a restore worker thread once a few
ranges were downloaded: a point inside the restore that a timer could not hit reliably
(the whole restore takes milliseconds). The process-level test (a real agent, a slowed S3
store): tests/e2e/test_cancel_mid_restore.py.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.checkpoints import engine as E
from agent.checkpoints.backend import Backend
from agent.checkpoints.repo import split_checkpoint_uri
from agent.checkpoints.store import RestoreCancelled
from tests.agent.checkpoints.test_engine import snapshot_tree

FILES = 64
FILE_BYTES = 512 * 1024


def _checkpoint(tmp_path: Path) -> tuple[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(FILES):
        (src / f"f{i:03d}.bin").write_bytes(os.urandom(FILE_BYTES))
    # Packs of two files: many ranges to download, each pack's data from offset 0 and its
    # table (read first, for every pack) from well after it.
    result = E.backup_sync(f"file://{tmp_path}/store", "s1", src, pack_size=2 * FILE_BYTES)
    return result.uri, src


class CancelAfterLoads:
    """Test only: the store's backend, counting the reads of packs' data (from offset 0;
    a pack's table is read from its end) and setting `cancel` at the `after`-th one."""

    def __init__(self, inner: Backend, cancel: threading.Event, after: int) -> None:
        self.inner, self.cancel, self.after = inner, cancel, after
        self.ranged = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.load(name, offset, length)
        if name.startswith("data/") and offset == 0 and length is not None:
            with self._lock:
                self.ranged += 1
                if self.ranged == self.after:
                    self.cancel.set()
        return data


def test_cancel_set_midway_ends_the_restore_early(tmp_path: Path) -> None:
    uri, src = _checkpoint(tmp_path)
    base, _, _ = split_checkpoint_uri(uri)
    repo = E.get_repository(base, create=False)
    cancel = threading.Event()
    counting = CancelAfterLoads(repo.backend, cancel, after=4)
    real, repo.backend = repo.backend, counting  # type: ignore[assignment]
    try:
        with pytest.raises(RestoreCancelled, match=r"cancelled after \d+ of \d+ bytes") as e:
            E.restore_sync(uri, tmp_path / "out", threads=2, cancel=cancel)
    finally:
        repo.backend = real
    done, total = (int(w) for w in str(e.value).split()[3:6:2])
    assert total == FILES * FILE_BYTES
    # Stopped with most of the checkpoint unwritten: only the ranges in flight finished.
    assert 0 < done < total // 2, str(e.value)
    # At most the other thread's range was asked after the cancel.
    assert counting.ranged <= 4 + 1, counting.ranged
    # Nothing is taken back: the caller deletes the partial tree (with the volume).
    assert (tmp_path / "out").exists()

    # The checkpoint is untouched: a restore without a cancel gets all of it.
    E.restore_sync(uri, tmp_path / "again")
    assert snapshot_tree(tmp_path / "again") == snapshot_tree(src)


def test_cancel_set_before_writes_nothing(tmp_path: Path) -> None:
    uri, _ = _checkpoint(tmp_path)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RestoreCancelled, match=f"after 0 of {FILES * FILE_BYTES} bytes"):
        E.restore_sync(uri, tmp_path / "out", cancel=cancel)
    assert list((tmp_path / "out").iterdir()) == []
