"""FUSE mount helpers shared by the data-link backends: what to mount, the backend
interface, and the host's mount table (`/proc/self/mountinfo`).

A backend only builds the helper's command line and environment; starting it, waiting
for the mount and unmounting it are the same for every FUSE helper and live here.
Unmounting never blocks the agent: a FUSE daemon whose store went away can hang any
call into the mount, so `fusermount -u` runs with a timeout and a lazy `umount -l`
detaches what is left.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MountBackend",
    "MountTarget",
    "detach_mounts_under_sync",
    "is_mount_point",
    "mount_points_under",
    "mounted_source",
    "parse_resource_ref",
    "unmount",
]

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class MountTarget:
    """One S3 location to mount: the bucket and the prefix inside it (no slashes at
    either end; "" for the whole bucket), the store and the keys."""

    bucket: str
    prefix: str
    endpoint: str
    region: str
    # Kept out of the repr: a logged or raised target must not carry the keys.
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    read_only: bool

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_resource_ref(ref: str) -> tuple[str, str]:
    """`s3://bucket[/sub/dir]` -> (bucket, "sub/dir"); ValueError for anything else,
    including `.`/`..` components, which could widen what the mount exposes."""
    if not ref.startswith("s3://"):
        raise ValueError(f"unsupported resource {ref!r}: only s3://bucket[/prefix] is mounted")
    bucket, _, prefix = ref[len("s3://") :].partition("/")
    parts = [p for p in prefix.split("/") if p]
    if not bucket or any(p in (".", "..") for p in parts) or "\\" in bucket:
        raise ValueError(f"bad resource {ref!r}")
    return bucket, "/".join(parts)


class MountBackend(abc.ABC):
    """A FUSE helper that mounts an S3 prefix and daemonizes once the mount is up."""

    name: str
    binary: str

    @abc.abstractmethod
    def command(
        self, target: MountTarget, mountpoint: Path, private_dir: Path
    ) -> tuple[list[str], dict[str, str]]:
        """argv and the complete environment for the helper. Secrets go in the
        environment (readable by root only in /proc) or in files below `private_dir`
        (mode 0700, removed at unmount), never on the command line."""

    def available(self) -> tuple[bool, str]:
        from shutil import which

        path = which(self.binary)
        if path is None:
            return False, f"{self.binary} not installed (apt-get install {self.binary})"
        return True, f"{self.binary} at {path}"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, file system type, source) of every mount this process can see, in
    mount order (a later mount on the same point is on top)."""
    try:
        text = MOUNTINFO.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        after = right.split()
        if not sep or len(fields) < 5 or len(after) < 2:
            continue
        out.append((_unescape(fields[4]), after[0], _unescape(after[1])))
    return out


def _mount_table() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount this process can see."""
    return [(point, fstype) for point, fstype, _ in _mounts()]


def mounted_source(path: Path | str) -> str | None:
    """The source (device) mounted at `path` (the one on top), or None when nothing is."""
    target = os.path.realpath(path)
    found = None
    for point, _, source in _mounts():
        if point == target:
            found = source
    return found


def mount_points_under(directory: Path | str) -> list[tuple[str, str]]:
    """Mounts strictly below `directory` (deepest first, the order to unmount them)."""
    base = os.path.realpath(directory).rstrip("/") + "/"
    found = [(p, t) for p, t in _mount_table() if p.startswith(base)]
    # Deepest first; a path mounted twice appears twice (both need unmounting).
    return sorted(found, key=lambda m: m[0].count("/"), reverse=True)


def is_mount_point(path: Path | str) -> bool:
    real = os.path.realpath(path)
    return any(p == real for p, _ in _mount_table())


def _run_with_timeout(argv: list[str], timeout: float) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        return 127, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return -1, f"{argv[0]} did not finish in {timeout:g} s"
    return proc.returncode, (proc.stderr or proc.stdout).strip()


def unmount_sync(path: Path | str, timeout: float = 10.0) -> str:
    """Unmount `path` (every mount stacked on it); never hangs. Returns "" or what
    the clean unmount said before the lazy one took over (for the log)."""
    path = os.path.realpath(path)
    note = ""
    for _ in range(8):
        if not is_mount_point(path):
            return note
        # fusermount -u for FUSE mounts (it also ends the helper); umount for binds.
        code, err = _run_with_timeout(["fusermount", "-u", "-q", path], timeout)
        if code != 0:
            code, err2 = _run_with_timeout(["umount", path], timeout)
            if code != 0:
                note = err or err2
                # Busy, or the helper hangs on a store that went away: detach now; the
                # kernel ends the mount once the last user lets go.
                _run_with_timeout(["umount", "-l", path], timeout)
    return note


async def unmount(path: Path | str, limit_seconds: float = 10.0) -> str:
    return await asyncio.to_thread(unmount_sync, path, limit_seconds)


def detach_mounts_under_sync(directory: Path | str, timeout: float = 10.0) -> None:
    """Unmount everything below `directory` before it is deleted: a recursive delete
    that walks into a mounted bucket would delete the bucket's objects."""
    for mount_point, _ in mount_points_under(directory):
        with contextlib.suppress(OSError):
            unmount_sync(mount_point, timeout)
