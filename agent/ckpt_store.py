"""The content-addressed checkpoint engine behind the agent's CheckpointStore interface."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from agent.checkpoint import CheckpointStore, SavedCheckpoint
from agent.ckpt_engine import ProgressFn, backup, latest_checkpoint, restore

__all__ = ["LATEST", "ContentCheckpointStore"]

# Default parent: the session's own latest checkpoint, so every save is incremental.
LATEST = "latest"


class ContentCheckpointStore(CheckpointStore):
    def __init__(self, base_uri: str, storage_options: dict[str, Any] | None = None):
        self.base_uri = base_uri.rstrip("/")
        self.storage_options = storage_options

    async def save(
        self,
        session_id: str,
        source_dir: Path,
        parent: str | None = LATEST,
        progress: ProgressFn | None = None,
    ) -> SavedCheckpoint:
        if parent == LATEST:
            parent = await asyncio.to_thread(
                latest_checkpoint,
                self.base_uri,
                session_id,
                storage_options=self.storage_options,
            )
        r = await backup(
            self.base_uri,
            session_id,
            source_dir,
            parent,
            storage_options=self.storage_options,
            progress=progress,
        )
        return SavedCheckpoint(
            key=r.key, uri=r.uri, size_bytes=r.size_bytes, saved_at=int(time.time())
        )

    async def restore(self, uri: str, target_dir: Path, progress: ProgressFn | None = None) -> None:
        await restore(uri, target_dir, storage_options=self.storage_options, progress=progress)
