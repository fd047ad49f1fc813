"""First checkpoint format: one tar.gz of the session directory, through fsspec.

Objects are named `<sessionId>/<UTC timestamp>-<random>.tar.gz` below the base URI,
written under a temporary `.partial` name and then moved into place, so a name
without `.partial` is always a complete checkpoint (on object stores the move is a
copy + delete: the final name appears only once the copy is whole).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import secrets
import tarfile
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem

from agent.checkpoints.store import (
    LATEST,
    CheckpointStore,
    ProgressFn,
    RestoreCancelled,
    SavedCheckpoint,
    on_disk_bytes,
)
from agent.errors import CheckpointError, UnsafeArchive

__all__ = ["ArchiveCheckpointStore", "check_archive_members", "open_fs"]


def open_fs(uri: str) -> tuple[AbstractFileSystem, str]:
    """A file system and the path inside it; a plain path is a local file path."""
    if "://" not in uri:
        uri = "file://" + os.path.abspath(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _full_uri(fs: AbstractFileSystem, path: str) -> str:
    uri: str = fs.unstrip_protocol(path)
    return uri


def check_archive_members(members: list[tarfile.TarInfo]) -> None:
    """Refuse any member that could write outside the target directory."""
    for m in members:
        name = m.name
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or os.path.isabs(name):
            raise UnsafeArchive(f"absolute path in checkpoint: {name!r}")
        if ".." in parts:
            raise UnsafeArchive(f"path with '..' in checkpoint: {name!r}")
        if m.isdev():
            raise UnsafeArchive(f"device node in checkpoint: {name!r}")
        if m.issym():
            target = m.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise UnsafeArchive(
                    f"symlink out of the tree in checkpoint: {name!r} -> {target!r}"
                )
        if m.islnk():
            target = posixpath.normpath(m.linkname)
            if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
                raise UnsafeArchive(
                    f"hard link out of the tree in checkpoint: {name!r} -> {m.linkname!r}"
                )


def _write_archive(source_dir: Path, target: Path) -> None:
    with tarfile.open(target, "w:gz", compresslevel=6) as tar:
        for entry in sorted(os.listdir(source_dir)):
            tar.add(source_dir / entry, arcname=entry, recursive=True)


def _extract_archive(archive: Path, target_dir: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        check_archive_members(members)
        target_dir.mkdir(parents=True, exist_ok=True)
        # The data filter is a second line of defence behind our own check.
        tar.extractall(target_dir, members=members, filter="data")


class ArchiveCheckpointStore(CheckpointStore):
    def __init__(self, base_uri: str, tmp_dir: Path) -> None:
        self.base_uri = base_uri
        self.tmp_dir = tmp_dir
        self.fs, self.base_path = open_fs(base_uri)

    def new_key(self, session_id: str) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        return f"{session_id}/{stamp}-{secrets.token_hex(4)}.tar.gz"

    def _save_sync(self, session_id: str, source_dir: Path) -> SavedCheckpoint:
        if not source_dir.is_dir():
            raise CheckpointError(f"session directory {source_dir} does not exist")
        key = self.new_key(session_id)
        final = posixpath.join(self.base_path, key)
        partial = final + ".partial"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(suffix=".tar.gz", dir=self.tmp_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _write_archive(source_dir, tmp)
            size = tmp.stat().st_size
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            self.fs.put_file(str(tmp), partial)
            self.fs.mv(partial, final)
        except (OSError, tarfile.TarError) as exc:
            try:
                if self.fs.exists(partial):
                    self.fs.rm(partial)
            except OSError:
                pass
            raise CheckpointError(f"cannot write checkpoint {key}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return SavedCheckpoint(
            key=key, uri=_full_uri(self.fs, final), size_bytes=size, saved_at=int(time.time())
        )

    async def save(
        self,
        session_id: str,
        source_dir: Path,
        parent: str | None = LATEST,
        progress: ProgressFn | None = None,
    ) -> SavedCheckpoint:
        # An archive is a whole copy: it has no parent, and its progress is all or nothing.
        saved = await asyncio.to_thread(self._save_sync, session_id, source_dir)
        if progress is not None:
            progress(1, 1)
        return saved

    def _restore_sync(self, uri: str, target_dir: Path) -> None:
        fs, path = open_fs(uri)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(suffix=".tar.gz", dir=self.tmp_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                fs.get_file(path, str(tmp))
            except (OSError, FileNotFoundError) as exc:
                raise CheckpointError(f"cannot read checkpoint {uri}: {exc}") from exc
            try:
                _extract_archive(tmp, target_dir)
            except UnsafeArchive:
                raise
            except (OSError, tarfile.TarError) as exc:
                raise CheckpointError(f"cannot restore checkpoint {uri}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    async def restore(
        self,
        uri: str,
        target_dir: Path,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[str, ...]:
        # Only before it begins: the old archives are read once, at upgrade, and small.
        if cancel is not None and cancel.is_set():
            raise RestoreCancelled(f"restore of {uri} cancelled before it began")
        await asyncio.to_thread(self._restore_sync, uri, target_dir)
        if progress is not None:
            progress(1, 1)
        return ()

    def _restored_size_sync(self, uri: str) -> int:
        fs, path = open_fs(uri)
        try:
            with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
                return sum(on_disk_bytes(m.size if m.isreg() else 0) for m in tar)
        except (OSError, tarfile.TarError) as exc:
            raise CheckpointError(f"cannot read checkpoint {uri}: {exc}") from exc

    async def restored_size(self, uri: str) -> int:
        return await asyncio.to_thread(self._restored_size_sync, uri)
