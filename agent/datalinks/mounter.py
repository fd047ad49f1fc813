"""Data-links: S3 buckets (or prefixes of them) FUSE-mounted for a session.

Each data-link of a session is mounted on the host at
`DIR/sessions/<sid>/datalinks/<mount_name>` before the tool starts; the runtime then
binds it at `/workspace/data/<mount_name>` in the session. Per mount:

- a pre-flight listing with the data-link's own keys, so wrong credentials, a missing
  bucket or an unreachable endpoint give a message naming the data-link and the
  endpoint instead of a mount that fails on first use;
- the FUSE helper (`mount_s3fs` by default, `mount_rclone` where s3fs is missing)
  pointed at `bucket/prefix`, so nothing outside the prefix has a name in the mount;
  `ro` for read-only data-links; `allow_other` so the container's users reach it; keys
  only in the helper's environment;
- a wait for the mount to appear in `/proc/self/mountinfo`, with a timeout.

A data-link that cannot be mounted fails the start when it is `required`, else the
session starts without it and its status says why. Unmounting (stop, delete, and at
agent start for sessions no longer running) never hangs: `mount_base.unmount`.
Credentials are never persisted: the handle keeps `sessions.handle.DataLinkSpec`, without them.

Why s3fs-fuse (tests/bench/bench_datalink_mount.py, 256 MiB against SeaweedFS, three
runs on a shared machine): it is the only candidate that both has a file complete in the
bucket when `close` returns and allows rewriting a file in place. Sequential write
58-84 MiB/s and read 121-415 MiB/s, beside 64-103 / 268-424 MiB/s of direct s3fs
(Python) access in the same runs. `rclone mount --vfs-cache-mode off` writes as fast
(50-93 MiB/s) but refuses in-place rewrites (EPERM); with `--vfs-cache-mode writes` the
upload happens after `close` (the object complete 5.7-6.4 s later, 37-67 MiB/s end to
end), so a stop right after a write races the upload. The fsspec mount (mfusepy over
s3fs) cannot write at all (ESPIPE: its files do not seek). All three give EROFS on `ro`
and confine a prefix. The price: with the store gone, an s3fs read fails after ~16 s
where rclone fails in 0.6 s; unmounting is immediate for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from agent.errors import AgentError
from agent.host_mounts import (
    MountBackend,
    MountTarget,
    is_mount_point,
    mount_points_under,
    parse_resource_ref,
    unmount,
)

__all__ = [
    "DATA_DIR",
    "DataLinkError",
    "DataLinkMounter",
    "MountStatus",
    "backend_named",
    "backends",
    "data_links_json",
    "fuse_usable",
    "state_of",
]

log = logging.getLogger(__name__)

# Where data-links appear inside a session; checkpoints never read below it.
DATA_DIR = "/workspace/data"
MOUNTS_DIRNAME = "datalinks"
PRIVATE_DIRNAME = "datalinks-private"
_MOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

STATE_MOUNTED = "mounted"
STATE_READ_ONLY = "read-only"
STATE_FAILED = "failed"
STATE_UNMOUNTED = "unmounted"
# The states as DataLinkMountStatus.mount_state (the wire has no strings for them).
_STATE_TO_PB = {
    STATE_MOUNTED: pb.DATA_LINK_MOUNT_STATE_MOUNTED,
    STATE_READ_ONLY: pb.DATA_LINK_MOUNT_STATE_READ_ONLY,
    STATE_FAILED: pb.DATA_LINK_MOUNT_STATE_FAILED,
    STATE_UNMOUNTED: pb.DATA_LINK_MOUNT_STATE_UNMOUNTED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


def state_of(status: pb.DataLinkMountStatus) -> str:
    """The state a DataLinkMountStatus carries, as a STATE_* string ("" when unset)."""
    return _STATE_FROM_PB.get(status.mount_state, "")


class DataLinkError(AgentError):
    """A required data-link could not be mounted (the message names it and the store)."""

    def __init__(self, message: str, statuses: list[MountStatus] | None = None) -> None:
        super().__init__(message)
        # Every data-link's status at the failure (for SessionObserved.data_links).
        self.statuses = statuses or []


@dataclass
class MountStatus:
    data_link_id: str
    mount_name: str
    state: str
    message: str = ""
    # Host path of the FUSE mount ("" when it is not mounted).
    host_path: str = ""
    read_only: bool = False

    def to_pb(self) -> pb.DataLinkMountStatus:
        return pb.DataLinkMountStatus(
            data_link_id=self.data_link_id,
            mount_name=self.mount_name,
            mount_state=_STATE_TO_PB.get(self.state, pb.DATA_LINK_MOUNT_STATE_UNSPECIFIED),
            message=self.message,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountStatus:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def data_links_json(statuses: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Handle statuses for `studio-agent sessions --json` (no keys are ever in them)."""
    return [
        {
            "id": s.get("data_link_id", ""),
            "mountName": s.get("mount_name", ""),
            "state": s.get("state", ""),
            "message": s.get("message", ""),
            "hostPath": s.get("host_path", ""),
            "readOnly": bool(s.get("read_only")),
        }
        for s in statuses
    ]


def backends() -> dict[str, MountBackend]:
    from agent.datalinks.rclone import RcloneBackend
    from agent.datalinks.s3fs import S3fsBackend

    # Order = preference (measured: see the module docstring).
    return {"s3fs": S3fsBackend(), "rclone": RcloneBackend()}


def backend_named(name: str) -> MountBackend | None:
    """`auto` = the first installed backend in order of preference; None if none is."""
    table = backends()
    if name != "auto":
        if name not in table:
            known = ", ".join(table)
            raise AgentError(f"unknown data-link mounter {name!r} (known: auto, {known})")
        return table[name]
    for backend in table.values():
        if backend.available()[0]:
            return backend
    return None


def fuse_usable() -> tuple[bool, str]:
    """Whether this host can FUSE-mount for sessions (for `doctor`)."""
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse is missing (modprobe fuse, or give the container the device)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return False, "/dev/fuse is not readable and writable by the agent"
    if shutil.which("fusermount") is None and shutil.which("fusermount3") is None:
        return False, "fusermount is missing (apt-get install fuse3)"
    if os.geteuid() != 0:
        return False, "not root: allow_other mounts for the container's users need root"
    return True, "/dev/fuse and fusermount present, running as root"


def _preflight_sync(target: MountTarget, timeout: float) -> None:
    """List at most one key under the prefix with the data-link's own keys."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=target.access_key_id or None,
        secret=target.secret_access_key or None,
        anon=not target.access_key_id,
        client_kwargs={
            k: v
            for k, v in (("endpoint_url", target.endpoint), ("region_name", target.region))
            if v
        },
        config_kwargs={
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"max_attempts": 1},
        },
        skip_instance_cache=True,
    )
    prefix = target.prefix + "/" if target.prefix else ""
    fs.call_s3("list_objects_v2", Bucket=target.bucket, Prefix=prefix, MaxKeys=1)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, PermissionError):
        return f"access denied (wrong credentials?): {text}"
    if isinstance(exc, FileNotFoundError):
        return f"bucket not found: {text}"
    if "Could not connect" in text or "Connect timeout" in text or "Connection refused" in text:
        return f"endpoint unreachable: {text}"
    return text


class DataLinkMounter:
    def __init__(
        self,
        backend: MountBackend | None,
        *,
        ready_timeout: float = 30.0,
        preflight_timeout: float = 10.0,
        unmount_timeout: float = 10.0,
    ) -> None:
        self.backend = backend
        self.ready_timeout = ready_timeout
        self.preflight_timeout = preflight_timeout
        self.unmount_timeout = unmount_timeout
        # Host paths with a health probe in flight (see `check`).
        self._probing: set[str] = set()

    @staticmethod
    def mounts_dir(session_dir: Path) -> Path:
        return session_dir / MOUNTS_DIRNAME

    @staticmethod
    def private_root(session_dir: Path) -> Path:
        return session_dir / PRIVATE_DIRNAME

    # ------------------------------------------------------------ mounting

    async def mount_all(
        self, session_dir: Path, links: Sequence[pb.DataLinkMount]
    ) -> list[MountStatus]:
        """Mount every data-link; a required one that fails raises DataLinkError after
        the others are unmounted again (never a half-mounted start)."""
        statuses: list[MountStatus] = []
        for i, link in enumerate(links):
            if any(s.mount_name == link.mount_name for s in statuses):
                # Never mount over another data-link of the same session.
                status = MountStatus(
                    link.data_link_id,
                    link.mount_name,
                    STATE_FAILED,
                    f"data-link {link.data_link_id!r}: mount name {link.mount_name!r} is "
                    "already used by another data-link of this session",
                )
            else:
                status = await self.mount_one(session_dir, link)
            statuses.append(status)
            if status.state == STATE_FAILED and link.required:
                await self.unmount_all(session_dir, statuses)
                # One status per data-link of the spec, the ones never tried included.
                why = f"not mounted: data-link {link.data_link_id or link.mount_name} failed"
                statuses += [
                    MountStatus(x.data_link_id, x.mount_name, STATE_UNMOUNTED, why)
                    for x in links[i + 1 :]
                ]
                raise DataLinkError(status.message, statuses)
        return statuses

    async def mount_one(self, session_dir: Path, link: pb.DataLinkMount) -> MountStatus:
        name = link.mount_name
        status = MountStatus(link.data_link_id, name, STATE_FAILED, read_only=link.read_only)
        what = f"data-link {link.data_link_id or name!r} ({name}, {link.resource_ref})"
        where = f" at {link.endpoint}" if link.endpoint else ""
        if not _MOUNT_NAME.match(name) or name in (".", ".."):
            status.message = f"{what}: bad mount name {name!r}"
            return status
        try:
            bucket, prefix = parse_resource_ref(link.resource_ref)
        except ValueError as exc:
            status.message = f"{what}: {exc}"
            return status
        if self.backend is None:
            status.message = f"{what}: no FUSE mount tool installed (apt-get install s3fs)"
            return status
        target = MountTarget(
            bucket=bucket,
            prefix=prefix,
            endpoint=link.endpoint,
            region=link.region,
            access_key_id=link.access_key_id,
            secret_access_key=link.secret_access_key,
            read_only=link.read_only,
        )
        try:
            await asyncio.wait_for(
                asyncio.to_thread(_preflight_sync, target, self.preflight_timeout),
                timeout=self.preflight_timeout * 3,
            )
        except TimeoutError:
            status.message = f"{what}: endpoint{where} did not answer in time"
            return status
        except Exception as exc:
            status.message = f"{what}: cannot list {target.location}{where}: {_describe(exc)}"
            return status
        mountpoint = self.mounts_dir(session_dir) / name
        private = self.private_root(session_dir) / name
        try:
            await self._mount(target, mountpoint, private)
        except (DataLinkError, OSError) as exc:
            status.message = f"{what}: mounting {target.location}{where} failed: {exc}"
            await self._cleanup_one(mountpoint, private)
            return status
        status.state = STATE_READ_ONLY if link.read_only else STATE_MOUNTED
        status.host_path = str(mountpoint)
        log.info("%s mounted at %s (%s)", what, mountpoint, self.backend.name)
        return status

    async def _mount(self, target: MountTarget, mountpoint: Path, private: Path) -> None:
        assert self.backend is not None
        if is_mount_point(mountpoint):
            # A leftover of a crashed start of this session: never stack a second mount.
            await unmount(mountpoint, self.unmount_timeout)
        await asyncio.to_thread(_prepare_dirs, mountpoint, private)
        argv, env = self.backend.command(target, mountpoint, private)
        helper_log = private / "helper.log"
        # Output to a file, never a pipe: the daemonized helper would hold it open.
        out = await asyncio.to_thread(
            os.open, helper_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                # Its own session: the daemonized helper outlives an agent restart.
                start_new_session=True,
            )
        finally:
            os.close(out)
        try:
            await asyncio.wait_for(proc.wait(), timeout=self.ready_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise DataLinkError(f"{argv[0]} did not finish in {self.ready_timeout:g} s") from None
        if proc.returncode != 0:
            text = (await asyncio.to_thread(helper_log.read_text, errors="replace")).splitlines()
            raise DataLinkError(
                f"{argv[0]} exited with {proc.returncode}: {' '.join(text[-3:]) or 'no output'}"
            )
        # The helper forks; the mount is usable once the kernel lists it.
        deadline = asyncio.get_running_loop().time() + self.ready_timeout
        while not is_mount_point(mountpoint):
            if asyncio.get_running_loop().time() >= deadline:
                raise DataLinkError(f"not mounted after {self.ready_timeout:g} s")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------ health

    async def check(self, statuses: list[MountStatus]) -> bool:
        """Mark mounts whose helper ended (or that someone unmounted) as failed; True
        when a status changed. A probe stuck on a hung helper is not started again
        while it hangs (it runs in a thread that cannot be cancelled)."""
        changed = False
        for status in statuses:
            path = status.host_path
            if status.state not in (STATE_MOUNTED, STATE_READ_ONLY) or path in self._probing:
                continue
            self._probing.add(path)
            probe = asyncio.ensure_future(asyncio.to_thread(_probe_sync, path))

            def _probed(_f: asyncio.Future[str], p: str = path) -> None:
                self._probing.discard(p)

            probe.add_done_callback(_probed)
            try:
                why = await asyncio.wait_for(asyncio.shield(probe), timeout=5.0)
            except TimeoutError:
                continue  # slow, not dead: the store may be away; reads say so themselves
            if why:
                status.state = STATE_FAILED
                status.message = (
                    f"data-link {status.data_link_id or status.mount_name!r} "
                    f"({status.mount_name}): {why}; stop and start the session to mount it again"
                )
                log.warning("%s", status.message)
                changed = True
        return changed

    # ------------------------------------------------------------ unmounting

    async def unmount_all(
        self, session_dir: Path, statuses: Iterable[MountStatus] = ()
    ) -> list[MountStatus]:
        """Unmount every data-link of the session (what `statuses` lists and whatever
        else is mounted in its mounts dir) and delete the private dirs; idempotent."""
        out = []
        for status in statuses:
            if status.state in (STATE_MOUNTED, STATE_READ_ONLY):
                status.state, status.host_path = STATE_UNMOUNTED, ""
            out.append(status)
        mounts = self.mounts_dir(session_dir)
        for mount_point, _ in await asyncio.to_thread(mount_points_under, mounts):
            note = await unmount(mount_point, self.unmount_timeout)
            if note:
                log.warning("unmounting %s needed a lazy unmount: %s", mount_point, note)
        await asyncio.to_thread(_remove_unmounted, mounts)
        await asyncio.to_thread(_remove_unmounted, self.private_root(session_dir))
        return out

    async def _cleanup_one(self, mountpoint: Path, private: Path) -> None:
        if is_mount_point(mountpoint):
            await unmount(mountpoint, self.unmount_timeout)
        await asyncio.to_thread(_remove_unmounted, private)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(mountpoint.rmdir)

    async def cleanup_leftovers(self, sessions_dir: Path, keep: set[str]) -> list[str]:
        """After an agent crash: unmount what sessions no longer running left mounted
        below `sessions_dir` (data-links and binds into their roots). Returns the
        mount points unmounted."""
        done = []
        base = await asyncio.to_thread(os.path.realpath, sessions_dir)
        for mount_point, fstype in await asyncio.to_thread(mount_points_under, sessions_dir):
            rel = Path(mount_point).relative_to(base)
            sid = rel.parts[0] if rel.parts else ""
            if sid in keep or len(rel.parts) < 2:
                continue
            under_data = rel.parts[1] == MOUNTS_DIRNAME or (
                rel.parts[1] == "root" and fstype.startswith("fuse")
            )
            binds = rel.parts[1] == "root" and len(rel.parts) > 2
            if not (under_data or binds):
                continue
            await unmount(mount_point, self.unmount_timeout)
            done.append(mount_point)
        if done:
            log.info("unmounted %d leftover data mount(s): %s", len(done), ", ".join(done))
        return done


def _probe_sync(path: str) -> str:
    """ "" when the mount answers, else why not. statfs is answered by the helper
    itself (no store round trip) and fails at once with ENOTCONN when it is gone."""
    if not is_mount_point(path):
        return "no longer mounted"
    try:
        os.statvfs(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "the mount helper ended (transport endpoint is not connected)"
        return f"the mount does not answer: {exc.strerror or exc}"
    return ""


def _prepare_dirs(mountpoint: Path, private: Path) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkdir's mode is masked by the umask and not applied to existing dirs.
    os.chmod(private, 0o700)
    os.chmod(private.parent, 0o700)


def _remove_unmounted(directory: Path) -> None:
    """Delete `directory` unless something is still mounted below it (a lazy unmount
    that has not finished): a delete must never walk into a bucket."""
    if not directory.exists() or mount_points_under(directory) or is_mount_point(directory):
        return
    shutil.rmtree(directory, ignore_errors=True)
