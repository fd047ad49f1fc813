"""The content-addressed engine behind the agent's CheckpointStore interface.

`ContentCheckpointStore` writes every new checkpoint with the engine; it still
restores the skeleton's `.tar.gz` archives (checkpoint URIs of that shape are handed to
`ArchiveCheckpointStore`), so studios saved before the engine existed keep working.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.checkpoints.backend import storage_options_for
from agent.checkpoints.engine import ProgressFn, backup, get_repository, latest_checkpoint, restore
from agent.checkpoints.repo import MANIFESTS, manifest_name, split_checkpoint_uri
from agent.checkpoints.store import (
    LATEST,
    CheckpointStore,
    SavedCheckpoint,
    capped_warnings,
    on_disk_bytes,
)
from agent.errors import CheckpointError

__all__ = [
    "LATEST",
    "ContentCheckpointStore",
    "checkpoint_session",
    "is_archive_uri",
    "storage_options_for",
    "store_refusal",
    "within_store",
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


def _store_root(base_uri: str) -> str:
    """A store's base URI as its checkpoints' URIs begin: a plain path becomes
    ``file://<absolute path>`` (as `ContentCheckpointStore` opens it), no trailing ``/``."""
    if "://" not in base_uri:
        return "file://" + os.path.abspath(base_uri)
    scheme, _, rest = base_uri.partition("://")
    if scheme.lower() == "file":
        rest = posixpath.normpath(rest) if rest.startswith("/") else rest
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def store_refusal(uri: str, base_uri: str, *, session_id: str = "", archives: bool = True) -> str:
    """Why `uri` is not a checkpoint of the store at `base_uri` ("" when it is one).

    A checkpoint lies at ``<base>/manifests/<session>/<key>`` (the engine) or, with
    `archives`, ``<base>/<session>/<name>.tar.gz`` (the first format, only read any
    more); with `session_id`, only that session's. The URI is compared as written,
    never resolved: a ``.`` or ``..`` segment, an empty one, a backslash, a query or a
    control character refuses it, so nothing that names the store by a detour (or
    another scheme, bucket or directory) passes. Both sides use this: the controller
    for the events it records and the restore points it sends, the agent for the
    restores it is told to do (docs/contract-notes.md "Which agent may say what").
    """
    root = _store_root(base_uri)
    if not uri:
        return "no checkpoint URI"
    if any(c in uri for c in "\\?#") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        return "the URI has a backslash, a query or a control character"
    full = uri if "://" in uri else ("file://" + uri if uri.startswith("/") else uri)
    scheme, sep, rest = full.partition("://")
    if not sep:
        return "the URI is neither absolute nor has a scheme"
    full = f"{scheme.lower()}://{rest}"
    if not full.startswith(root + "/"):
        return f"the URI is not below the store {root}"
    parts = full[len(root) + 1 :].split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "the URI has an empty, '.' or '..' segment"
    if len(parts) == 3 and parts[0] == MANIFESTS.rstrip("/"):
        owner = parts[1]
    elif archives and len(parts) == 2 and is_archive_uri(parts[1]):
        owner = parts[0]
    else:
        expected = "<session>/<key>" if not archives else "<session>/<key> or <session>/*.tar.gz"
        return f"the URI is not a checkpoint of the store ({MANIFESTS}{expected})"
    if session_id and owner != session_id:
        return f"the URI is a checkpoint of session {owner}, not of {session_id}"
    return ""


def within_store(uri: str, base_uri: str, *, session_id: str = "", archives: bool = True) -> bool:
    """`uri` is a checkpoint of the store at `base_uri` (of `session_id`): `store_refusal`."""
    return not store_refusal(uri, base_uri, session_id=session_id, archives=archives)


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
        changed = [
            f"{path!r} changed while it was read: saved as read, it may mix old and new content"
            for path in r.inconsistent
        ]
        # The key is the manifest's object name below the base URI.
        return SavedCheckpoint(
            key=manifest_name(session_id, r.key),
            uri=r.uri,
            size_bytes=r.size_bytes,
            saved_at=int(time.time()),
            warnings=capped_warnings(r.warnings + changed),
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

    async def restore(
        self,
        uri: str,
        target_dir: Path,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[str, ...]:
        if is_archive_uri(uri):
            from agent.checkpoints.legacy_archive import ArchiveCheckpointStore

            tmp = self.tmp_dir or Path(tempfile.gettempdir())
            return await ArchiveCheckpointStore(self.base_uri, tmp).restore(
                uri, target_dir, progress, cancel
            )
        r = await restore(
            uri,
            target_dir,
            storage_options=self.storage_options,
            progress=progress,
            cancel=cancel,
        )
        return capped_warnings(r.warnings)
