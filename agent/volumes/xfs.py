"""The `xfs-loop` volume kind: a sparse file, a loop device, XFS, mounted; grown online.

Layout for a volume mounted at `DIR/sessions/<sid>/root`: the backing file is
`DIR/sessions/<sid>/root.xfs` (sparse, so a 2 GiB volume costs only what is written).
The loop device runs with `--direct-io=on`: under a buffered write load one grow step
takes 300-600 ms without it and 16-18 ms with it (ANCHORS.md), which is what lets a
0.5 s poll win the race against a full-speed writer.

Every operation is derived from the mount path alone (backing file by name, loop
device by `losetup --list`, mount by /proc/self/mountinfo), so `attach` re-attaches a
volume after an agent or host restart and `release` cleans up whatever a crash left.
Only `prepare` (a start) ever creates a file system; `attach` never does, so a volume
deleted behind the agent's back is an error, never an empty volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from agent import crash_points
from agent.errors import VolumeError, VolumeGone
from agent.host_mounts import detach_mounts_under_sync, mounted_source
from agent.volumes.base import VolumeInfo, VolumeKind
from agent.volumes.directory import make_session_root

__all__ = ["XfsLoopVolume", "backing_file", "loop_devices_for", "mounted_source", "xfs_usage"]

_TOOLS = ("losetup", "mkfs.xfs", "xfs_growfs", "mount", "umount")
# allocsize: a fixed 1 MiB of speculative preallocation instead of XFS's dynamic one,
# which reserves gigabytes past the end of a large file being written (and of one just
# restored) for minutes: a 3 GiB file then held 4.1 GiB, so the free space a session is
# promised, and the growth trigger, would be wrong by that much.
_MOUNT_OPTIONS = "noatime,allocsize=1m"


def backing_file(path: Path) -> Path:
    return path.with_name(path.name + ".xfs")


async def _run(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()
        raise VolumeError(f"{' '.join(argv)} failed (status {proc.returncode}): {text}")
    return out.decode(errors="replace")


async def loop_devices_for(image: Path) -> list[str]:
    """Loop devices backed by `image` (also when the file was deleted behind our back)."""
    out = await _run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE", check=False)
    found = []
    target = str(image)
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        back = back.strip()
        if back == target or back == f"{target} (deleted)":
            found.append(name)
    return found


def xfs_usage(path: Path) -> tuple[int, int]:
    """(size, used) of the file system mounted at `path`, from statvfs."""
    st = os.statvfs(path)
    size = st.f_blocks * st.f_frsize
    return size, size - st.f_bfree * st.f_frsize


class XfsLoopVolume(VolumeKind):
    kind = "xfs-loop"
    # How often the per-session disk watcher polls: statvfs is cheap, and with a
    # direct-I/O loop device 0.5 s never lost the race in the measurements; 0.1 s
    # leaves room for a slower grow under load.
    poll_seconds = 0.1

    async def prepare(self, path: Path, size_bytes: int) -> VolumeInfo:
        image = backing_file(path)
        if mounted_source(path) is not None or image.exists():
            # A start releases leftovers first; whatever is still here is someone's data.
            raise VolumeError(f"cannot create a volume at {path}: one is already there")
        try:
            await asyncio.to_thread(make_session_root, path)
            await asyncio.to_thread(_create_sparse, image, size_bytes)
            device = await self._format(image)
            await _run("mount", "-t", "xfs", "-o", _MOUNT_OPTIONS, device, str(path))
            # The new file system's root (root:root 0755 from mkfs), closed like the
            # directory it covers.
            await asyncio.to_thread(os.chmod, path, 0o700)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.release(VolumeInfo(self.kind, str(path), size_bytes))
            raise
        return await self.usage(VolumeInfo(self.kind, str(path), size_bytes))

    async def _format(self, image: Path) -> str:
        """Attach `image` to a free loop device and make the file system on it.

        A device that a lazily unmounted file system of a crashed session still holds
        looks free to `losetup --find` on some kernels and then refuses mkfs with EBUSY:
        give it back and take another, a few times."""
        error: VolumeError | None = None
        for _ in range(3):
            device = (
                await _run(
                    "losetup", "--direct-io=on", "--find", "--show", "--nooverlap", str(image)
                )
            ).strip()
            try:
                await _run("mkfs.xfs", "-q", "-f", device)
                return device
            except VolumeError as exc:
                error = exc
                await _run("losetup", "-d", device, check=False)
                if "busy" not in str(exc).lower():
                    raise
        assert error is not None
        raise error

    async def attach(self, info: VolumeInfo) -> VolumeInfo:
        path = Path(info.path)
        if mounted_source(path) is not None:
            return await self.usage(info)
        image = backing_file(path)
        if not image.exists():
            raise VolumeGone(
                f"the volume file {image} is gone (its data cannot be recovered on this host)"
            )
        devices = await loop_devices_for(image)
        device = (
            devices[0]
            if devices
            else (await _run("losetup", "--direct-io=on", "--find", "--show", str(image))).strip()
        )
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        await _run("mount", "-t", "xfs", "-o", _MOUNT_OPTIONS, device, str(path))
        return await self.usage(info)

    def is_attached(self, info: VolumeInfo) -> bool:
        return mounted_source(Path(info.path)) is not None

    async def grow(self, info: VolumeInfo, by_bytes: int) -> VolumeInfo:
        path = Path(info.path)
        image = backing_file(path)
        devices = await loop_devices_for(image)
        if not devices:
            raise VolumeError(f"no loop device for {image}")
        try:
            new_size = os.stat(image).st_size + by_bytes
            # Open without O_CREAT: a deleted backing file must not be replaced by an
            # empty one (the loop device still holds the old inode).
            fd = os.open(image, os.O_WRONLY)
        except FileNotFoundError:
            raise VolumeError(
                f"the volume file {image} was deleted behind the agent's back; "
                "the volume cannot grow (its data stays readable until the session stops)"
            ) from None
        try:
            os.ftruncate(fd, new_size)
        finally:
            os.close(fd)
        await _run("losetup", "-c", devices[0])
        await _run("xfs_growfs", "-d", str(path))
        return await self.usage(info)

    async def usage(self, info: VolumeInfo) -> VolumeInfo:
        path = Path(info.path)
        if mounted_source(path) is None:
            return info
        size, used = await asyncio.to_thread(xfs_usage, path)
        info.size_bytes = max(info.size_bytes, _file_size(backing_file(path)), size)
        info.used_bytes = used
        return info

    def free_bytes(self, info: VolumeInfo) -> int | None:
        """Free bytes right now (statvfs, no thread hop: this runs every 0.1 s)."""
        try:
            st = os.statvfs(info.path)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    async def release(self, info: VolumeInfo) -> None:
        path = Path(info.path)
        image = backing_file(path)
        # Binds into the session (data-links) first: never delete through one.
        await asyncio.to_thread(detach_mounts_under_sync, path)
        if mounted_source(path) is not None:
            try:
                await _run("umount", str(path))
            except VolumeError:
                # Still busy (an overlay on top of it, a shell in it): detach lazily so
                # the device is freed as soon as the last user goes.
                await _run("umount", "-l", str(path))
            crash_points.reached("release:unmounted")
        for device in await loop_devices_for(image):
            await _run("losetup", "-d", device, check=False)
        await asyncio.to_thread(image.unlink, missing_ok=True)
        await asyncio.to_thread(shutil.rmtree, path, True)

    async def sweep(self, under: Path, live: set[str]) -> list[str]:
        out = await _run(
            "losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE", check=False
        )
        prefix = str(under) + "/"  # the state dir is absolute (StateDir)
        swept = []
        for line in out.splitlines():
            device, _, back = line.strip().partition(" ")
            back = back.strip().removesuffix(" (deleted)")
            if not back.startswith(prefix) or not back.endswith(".xfs"):
                continue
            path = back.removesuffix(".xfs")
            if path in live:
                continue
            if mounted_source(Path(path)) == device:
                await _run("umount", "-l", path, check=False)
            await _run("losetup", "-d", device, check=False)
            swept.append(f"loop device {device} of {back}")
        return swept

    @classmethod
    def available(cls) -> tuple[bool, str]:
        missing = []
        if os.geteuid() != 0:
            missing.append("not root")
        for tool in _TOOLS:
            if shutil.which(tool) is None:
                missing.append(f"{tool} not found")
        if not Path("/dev/loop-control").exists():
            missing.append("/dev/loop-control missing (no loop devices)")
        try:
            with open("/proc/filesystems") as f:
                if "xfs" not in f.read():
                    # Usually loaded on first mount; only a hint.
                    missing.append("xfs not in /proc/filesystems (module not loaded yet?)")
        except OSError:
            pass
        if missing and not (len(missing) == 1 and missing[0].startswith("xfs not in")):
            return False, "; ".join(missing)
        return True, "root, loop devices, mkfs.xfs and xfs_growfs present" + (
            f" ({missing[0]})" if missing else ""
        )


def _create_sparse(image: Path, size_bytes: int) -> None:
    with open(image, "xb") as f:
        f.truncate(size_bytes)


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
