"""The content-addressed engine behind the agent's CheckpointStore interface.

`ContentCheckpointStore` writes every new checkpoint with the engine; it still
restores the skeleton's `.tar.gz` archives (checkpoint URIs of that shape are handed to
`ArchiveCheckpointStore`), so studios saved before the engine existed keep working.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.checkpoints.backend import storage_options_for
from agent.checkpoints.engine import ProgressFn, backup, get_repository, latest_checkpoint, restore
from agent.checkpoints.repo import manifest_name, split_checkpoint_uri
from agent.checkpoints.store import LATEST, CheckpointStore, SavedCheckpoint, on_disk_bytes
from agent.errors import CheckpointError

__all__ = [
    "LATEST",
    "ContentCheckpointStore",
    "checkpoint_session",
    "is_archive_uri",
    "storage_options_for",
]


def checkpoint_session(uri: str) -> str:
    """The session id a checkpoint URI of either format belongs to ("" when it cannot tell)."""
    if is_archive_uri(uri):
        parts = uri.rstrip("/").split("/")
        return parts[-2] if len(parts) >= 2 else ""
    try:
        return split_checkpoint_uri(uri)[1]
    except CheckpointError:
        return ""


def is_archive_uri(uri: str) -> bool:
    """A checkpoint of the first (tar.gz archive) format."""
    return uri.endswith(".tar.gz")


class ContentCheckpointStore(CheckpointStore):
    def __init__(
        self,
        base_uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        tmp_dir: Path | None = None,
    ):
        if "://" not in base_uri:
            base_uri = "file://" + os.path.abspath(base_uri)
        self.base_uri = base_uri.rstrip("/")
        self.storage_options = storage_options
        self.tmp_dir = tmp_dir

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
        elif parent and is_archive_uri(parent):
            parent = None
        r = await backup(
            self.base_uri,
            session_id,
            source_dir,
            parent,
            storage_options=self.storage_options,
            progress=progress,
        )
        # The key is the manifest's object name below the base URI.
        return SavedCheckpoint(
            key=manifest_name(session_id, r.key),
            uri=r.uri,
            size_bytes=r.size_bytes,
            saved_at=int(time.time()),
        )

    async def restored_size(self, uri: str) -> int:
        if is_archive_uri(uri):
            from agent.checkpoints.legacy_archive import ArchiveCheckpointStore

            tmp = self.tmp_dir or Path(tempfile.gettempdir())
            return await ArchiveCheckpointStore(self.base_uri, tmp).restored_size(uri)
        return await asyncio.to_thread(self._restored_size_sync, uri)

    def _restored_size_sync(self, uri: str) -> int:
        base, session, key = split_checkpoint_uri(uri)
        repo = get_repository(base, self.storage_options, create=False)
        try:
            manifest = repo.load_manifest(session, key)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {uri}") from None
        # Hard links share their target's blocks; only files carry data.
        return sum(on_disk_bytes(e.size if e.type == "file" else 0) for e in manifest.entries)

    async def restore(self, uri: str, target_dir: Path, progress: ProgressFn | None = None) -> None:
        if is_archive_uri(uri):
            from agent.checkpoints.legacy_archive import ArchiveCheckpointStore

            tmp = self.tmp_dir or Path(tempfile.gettempdir())
            await ArchiveCheckpointStore(self.base_uri, tmp).restore(uri, target_dir, progress)
            return
        await restore(uri, target_dir, storage_options=self.storage_options, progress=progress)
