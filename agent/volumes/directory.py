"""The `directory` volume kind: a plain directory with the accounting of a real volume.

Used without root or loop devices (laptops, the local runtime). `size_bytes` is a
nominal budget that grows like an XFS volume would; nothing enforces it, but the
numbers let the controller and `studio-agent disk` treat both kinds alike.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from agent.errors import VolumeGone
from agent.host_mounts import detach_mounts_under_sync, mount_points_under
from agent.volumes.base import VolumeInfo, VolumeKind

__all__ = ["DirectoryVolume", "directory_usage", "make_session_root"]


def make_session_root(path: Path) -> None:
    """`path` (the session root) and its parent (the session directory) made and closed
    to everyone but the agent: 0700 both, whatever the umask or an earlier run left. The
    runtime opens them to the session's user when it hands the tree over."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    os.chmod(path, 0o700)


def directory_usage(path: Path) -> int:
    """Bytes allocated below `path` (like `du -x`; hard links counted once). Mounts in
    the session (data-links, file-system mounts) are not its disk: never walked into,
    which also keeps a data-link whose store went away from stalling the accounting."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        root_dev = os.lstat(path).st_dev
    except OSError:
        return 0
    mounts = {p for p, _ in mount_points_under(path)}
    data_dir = os.path.join(os.path.realpath(path), "workspace", "data")
    for dirpath, dirnames, filenames in os.walk(path):
        real = os.path.realpath(dirpath)
        if real == data_dir:
            dirnames[:] = []
        kept = []
        for d in dirnames:
            full = os.path.join(real, d)
            if full in mounts:
                continue
            try:
                if os.lstat(full).st_dev != root_dev:
                    continue
            except OSError:
                continue
            kept.append(d)
        dirnames[:] = kept
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue  # removed while we walked
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_blocks * 512
    return total


class DirectoryVolume(VolumeKind):
    kind = "directory"

    async def prepare(self, path: Path, size_bytes: int) -> VolumeInfo:
        await asyncio.to_thread(make_session_root, path)
        return VolumeInfo(kind=self.kind, path=str(path), size_bytes=size_bytes)

    async def attach(self, info: VolumeInfo) -> VolumeInfo:
        if not self.is_attached(info):
            raise VolumeGone(f"the session directory {info.path} is gone")
        return info

    def is_attached(self, info: VolumeInfo) -> bool:
        return os.path.isdir(info.path)

    async def grow(self, info: VolumeInfo, by_bytes: int) -> VolumeInfo:
        info.size_bytes += by_bytes
        return info

    async def usage(self, info: VolumeInfo) -> VolumeInfo:
        info.used_bytes = await asyncio.to_thread(directory_usage, Path(info.path))
        return info

    async def release(self, info: VolumeInfo) -> None:
        # Binds into the session (data-links) first: rmtree would delete through them.
        await asyncio.to_thread(detach_mounts_under_sync, info.path)
        await asyncio.to_thread(shutil.rmtree, info.path, True)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, "a plain directory with accounting; always available"
