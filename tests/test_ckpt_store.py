"""The engine behind the agent's CheckpointStore interface."""

from __future__ import annotations

import os
from pathlib import Path

from agent import ckpt_engine as E
from agent.checkpoint import CheckpointStore
from agent.ckpt_store import ContentCheckpointStore


async def test_store_save_is_incremental_and_restores(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/ws/.studios/checkpoints"
    store: CheckpointStore = ContentCheckpointStore(uri)
    src = tmp_path / "upper"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(1 << 20))
    first = await store.save("sess-1", src)
    assert first.uri.startswith(uri) and first.size_bytes > 1 << 20
    (src / "b.txt").write_text("new")
    second = await store.save("sess-1", src)
    # The default parent is the session's latest checkpoint: a.bin is not read again.
    m = E.get_repository(uri).load_manifest("sess-1", second.key)
    assert m.parent == first.uri
    out = tmp_path / "out"
    await store.restore(second.uri, out)
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (out / "b.txt").read_text() == "new"
