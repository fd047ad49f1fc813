"""The `directory` volume kind: a plain directory with the accounting of a real volume.

Used without root or loop devices (laptops, the local runtime). `size_bytes` is a
nominal budget that grows like an XFS volume would; nothing enforces it, but the
numbers let the controller and `studio-agent disk` treat both kinds alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

from agent.errors import VolumeGone
from agent.host_mounts import detach_mounts_under_sync, mount_points_under
from agent.volumes.base import VolumeInfo, VolumeKind

__all__ = ["DirectoryVolume", "directory_usage", "make_session_root", "remove_tree"]

log = logging.getLogger(__name__)


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
    which also keeps a data-link whose store went away from stalling the accounting.

    Iterative (os.walk recurses: a tree ~1,000 levels deep raised RecursionError on
    Python 3.11). What lies deeper than PATH_MAX cannot be listed by path and is left
    out: this kind's size is a nominal budget that nothing enforces."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        root_dev = os.lstat(path).st_dev
    except OSError:
        return 0
    mounts = {p for p, _ in mount_points_under(path)}
    root_real = os.path.realpath(path)
    data_dir = os.path.join(root_real, "workspace", "data")
    # (path as listed, its real path): never entered through a symlink, so a child's
    # real path is its parent's joined with its name.
    stack = [(str(path), root_real)]
    while stack:
        dirpath, real = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = list(it)
        except OSError:
            continue  # removed while we walked, or too deep to name
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                full = os.path.join(real, entry.name)
                if real == data_dir or full in mounts or st.st_dev != root_dev:
                    continue
                stack.append((entry.path, full))
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_blocks * 512
    return total


async def remove_tree(path: str) -> None:
    """`rm -rf` of a session tree: at any depth (shutil.rmtree recurses, and a tree
    ~1,000 levels deep raised RecursionError through its ignore_errors), never
    following a symlink, and never into another file system (a mount that would not
    detach is left, not deleted through)."""
    proc = await asyncio.create_subprocess_exec(
        "rm",
        "-rf",
        "--one-file-system",
        "--",
        path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        log.warning("removing %s left something: %s", path, err.decode(errors="replace").strip())


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
        # Binds into the session (data-links) first, so that the whole tree goes (rm
        # leaves a mount alone, and the directory above it with it).
        await asyncio.to_thread(detach_mounts_under_sync, info.path)
        await remove_tree(info.path)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, "a plain directory with accounting; always available"
