"""The checkpoint store interface.

A store writes a session directory as one checkpoint below a base URI and restores
one into an empty directory. A checkpoint is complete or absent: a reader never sees
half of one. The agent's store is the incremental, content-addressed engine
(`content_store.ContentCheckpointStore`); the first format, an archive (`legacy_archive`),
is only read any more (old `.tar.gz` checkpoint URIs).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BLOCK_BYTES",
    "INODE_BYTES",
    "LATEST",
    "MAX_WARNINGS",
    "CheckpointStore",
    "ProgressFn",
    "RestoreCancelled",
    "SavedCheckpoint",
    "capped_warnings",
    "on_disk_bytes",
]

# progress(done, total), in bytes.
ProgressFn = Callable[[int, int], None]


class RestoreCancelled(Exception):
    """A restore ended early because its `cancel` event was set; what it wrote so far
    stays in the target directory for the caller to delete."""


# Default parent of a save: the session's own latest checkpoint, so every save is incremental.
LATEST = "latest"

# What one file costs a file system beyond its data: XFS's default inode is 512 bytes,
# and data is allocated in 4 KiB blocks.
BLOCK_BYTES = 4096
INODE_BYTES = 512


def on_disk_bytes(size: int) -> int:
    """A file of `size` bytes once written: whole blocks plus its inode."""
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES + INODE_BYTES


# A checkpoint's warnings as reported: a tree of 100,000 sockets would otherwise send one
# line each to the controller and the API.
MAX_WARNINGS = 20


@dataclass(frozen=True)
class SavedCheckpoint:
    # Unique object key below the base URI.
    key: str
    # Full URI of the checkpoint, what `restore` takes.
    uri: str
    size_bytes: int
    saved_at: int
    # What the user should know about this checkpoint: what was left out and why, files
    # that changed while they were read (at most MAX_WARNINGS lines, then a count).
    warnings: tuple[str, ...] = ()


def capped_warnings(lines: list[str]) -> tuple[str, ...]:
    """The first MAX_WARNINGS lines, and how many more there were."""
    if len(lines) <= MAX_WARNINGS:
        return tuple(lines)
    return (*lines[:MAX_WARNINGS], f"and {len(lines) - MAX_WARNINGS} more")


class CheckpointStore(abc.ABC):
    @abc.abstractmethod
    async def save(
        self,
        session_id: str,
        source_dir: Path,
        parent: str | None = LATEST,
        progress: ProgressFn | None = None,
    ) -> SavedCheckpoint:
        """Write everything below `source_dir` as a new checkpoint; raise CheckpointError.

        `parent`: the checkpoint URI to write against (LATEST: the session's latest,
        None: none); a store that writes whole copies has no use for it."""

    @abc.abstractmethod
    async def restored_size(self, uri: str) -> int:
        """Bytes a restore of `uri` takes on a file system (data in whole blocks, plus
        metadata), read without restoring: what the session's volume must hold."""

    @abc.abstractmethod
    async def restore(
        self,
        uri: str,
        target_dir: Path,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[str, ...]:
        """Restore the checkpoint at `uri` into `target_dir`; its warnings (what could
        not be restored as saved, such as an xattr the file system refuses), at most
        MAX_WARNINGS lines and a count.

        `cancel`, once set (from any thread), ends the restore soon with RestoreCancelled
        instead of when everything is written: a cancelled start need not wait for it.

        Never writes outside `target_dir`: raises UnsafeArchive (before writing
        anything) for members with `..`, absolute paths, links out of the tree or
        device nodes."""
