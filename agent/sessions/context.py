"""What every session runner of one agent shares: the host's pieces, settings and sinks.

A runner owns one session; the context is how it reaches what is not its own (the
runtime, the volume kind, the checkpoint stores, the controller link's sinks) and the
one figure that needs every session at once: how much of the disk budget is free.

Two limits of the operator's and the compute environment's that no desired state can
lift: host directories are bind-mounted only under a prefix the operator allows
(`host_path_refusal`, ``studio-agent serve --allow-host-path``, none by default), and a
session's volume grows at most to the compute environment's per-session cap
(`session_cap_for`), within its budget on the host.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from agent.checkpoints.content_store import ContentCheckpointStore, storage_options_for
from agent.checkpoints.store import CheckpointStore
from agent.datalinks import DataLinkMounter
from agent.runtime import Runtime
from agent.sessions.handle import SessionHandle, SessionSpec, save_handle
from agent.sessions.report import observed
from agent.state import StateDir
from agent.volumes import GIB, VolumeKind

__all__ = ["SessionContext", "SessionSettings", "normalised_absolute"]

_FS_RESERVE_BYTES = 64 * 1024**2
_VOLUME_ROUNDING = 64 * 1024**2


@dataclass
class SessionSettings:
    """The agent's settings for its sessions (the daemon fills them from its config)."""

    stop_grace_seconds: float = 30.0
    start_timeout_seconds: float = 60.0
    volume_size_bytes: int = 2 * GIB
    grow_step_bytes: int = 2 * GIB
    grow_below_free_bytes: int = 1 * GIB
    disk_cap_bytes: int = 30 * GIB
    # The accounting tick: usage, data-link health, retries, reconcile.
    watch_interval_seconds: float = 5.0
    # Interim checkpoints: one right after the tool answers, then one per interval.
    checkpoint_interval_seconds: float = 300.0
    unsaved_retry_seconds: float = 60.0
    reap_interval_seconds: float = 60.0
    s3_endpoint: str | None = None
    # Host directories that file-system mounts may lie under (`--allow-host-path`);
    # none: no file-system mount is made.
    allowed_host_paths: tuple[str, ...] = ()
    # Custom environments (agent.images.env_builder): the most a build may take, in time
    # and in bytes written to podman's storage, and the conda channels it may use (none:
    # conda packages are refused, pip and Debian packages still build).
    env_build_timeout_seconds: float = 1800.0
    env_build_disk_bytes: int = 8 * GIB
    conda_channels: tuple[str, ...] = ()


def normalised_absolute(path: str) -> bool:
    """Absolute, without '.', '..' or empty segments, no trailing '/' (except "/")."""
    if not path.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return False
    return path == "/" or all(s not in ("", ".", "..") for s in path.split("/")[1:])


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


class SessionContext:
    def __init__(
        self,
        *,
        state: StateDir,
        runtime: Runtime,
        volumes: VolumeKind,
        datalinks: DataLinkMounter,
        settings: SessionSettings,
        budget_used: Callable[[], int],
    ) -> None:
        self.state = state
        self.runtime = runtime
        self.volumes = volumes
        self.datalinks = datalinks
        self.settings = settings
        self._budget_used = budget_used
        self._stores: dict[str, CheckpointStore] = {}
        # Sinks set by the controller link; the checkpoint sink must persist the event
        # before it returns (the session directory is deleted right after).
        self.on_observed: Callable[[pb.SessionObserved], None] = lambda obs: None
        self.on_checkpoint: Callable[[pb.CheckpointEvent], None] = lambda ev: None
        # Set by the manager: every finished operation reconciles again.
        self.reconcile: Callable[[], None] = lambda: None
        # Set by the daemon's metrics (agent.metrics): a layer around each checkpoint
        # store (timings), and each volume growth as `DiskWatcher.events` records it.
        self.store_layer: Callable[[CheckpointStore], CheckpointStore] = lambda store: store
        self.on_volume_grown: Callable[[dict[str, Any]], None] = lambda event: None

    async def save_and_report(self, h: SessionHandle) -> None:
        # Persist first: a report must never get ahead of what a restart would find.
        await asyncio.to_thread(save_handle, self.state, h)
        self.on_observed(observed(h))

    async def save(self, h: SessionHandle) -> None:
        await asyncio.to_thread(save_handle, self.state, h)

    def report(self, h: SessionHandle) -> None:
        """Report without persisting: progress only, a restart finds the step as it was."""
        self.on_observed(observed(h))

    def store_for(self, spec: SessionSpec) -> CheckpointStore:
        base = spec.checkpoint_base_uri or str(self.state.default_checkpoint_dir)
        store = self._stores.get(base)
        if store is None:
            store = self._stores[base] = self.store_layer(
                ContentCheckpointStore(
                    base,
                    storage_options_for(base, self.settings.s3_endpoint),
                    tmp_dir=self.state.tmp_dir,
                )
            )
        return store

    def checkpoint_dir(self, h: SessionHandle) -> Path:
        """What checkpoints read and restores fill: the volume, or the overlay's upper
        directory on it (podman)."""
        return self.runtime.checkpoint_dir(Path(h.root_dir))

    def disk_cap_for(self, spec: SessionSpec) -> int:
        """The compute environment's cap on this host: its bootDiskSizeGb, else the default."""
        gb = spec.boot_disk_size_gb
        return gb * GIB if gb > 0 else self.settings.disk_cap_bytes

    def session_cap_for(self, spec: SessionSpec) -> int:
        """The most this session's volume may grow to: its compute environment's
        per-session cap (sessionDiskCapGb), never more than the budget on this host."""
        budget = self.disk_cap_for(spec)
        gb = spec.session_disk_cap_gb
        return min(budget, gb * GIB) if gb > 0 else budget

    def host_path_refusal(self, host_path: str) -> tuple[str, str | None]:
        """(the directory to bind, after symlinks; why it may not be, or None).

        Whatever the controller sent: the path, written normalised, must resolve
        (symlinks followed) under a prefix the operator allows, and neither lie in
        this agent's state directory nor hold it."""
        allowed = self.settings.allowed_host_paths
        if not normalised_absolute(host_path):
            return host_path, f"host path {host_path!r} is not a normalised absolute path"
        if not allowed:
            return host_path, (
                f"host path {host_path} is not allowed on this host: the agent allows no "
                "host paths (studio-agent serve --allow-host-path PREFIX)"
            )
        real = os.path.realpath(host_path)
        prefixes = [os.path.realpath(p) for p in allowed]
        if not any(_within(real, p) for p in prefixes):
            shown = host_path if real == host_path else f"{host_path} (that is {real})"
            return real, (
                f"host path {shown} is not under a prefix this agent allows "
                f"({', '.join(allowed)}; studio-agent serve --allow-host-path)"
            )
        state = os.path.realpath(self.state.root)
        if _within(real, state) or _within(state, real):
            return real, f"host path {host_path} is or holds the agent's state directory"
        return real, None

    def disk_budget_free(self, cap_bytes: int | None = None) -> int:
        cap = self.settings.disk_cap_bytes if cap_bytes is None else cap_bytes
        return cap - self._budget_used()

    def volume_size_for(self, restore_bytes: int) -> int:
        """A fresh session's volume, or one that holds a restore and still has the same
        free space: the data, the free space, and XFS's own share (log, inodes, free-space
        trees: about 1 % plus a few MiB at these sizes), rounded up to 64 MiB."""
        base = self.settings.volume_size_bytes
        if restore_bytes <= 0:
            return base
        need = restore_bytes + base
        need += need // 50 + _FS_RESERVE_BYTES
        return -(-need // _VOLUME_ROUNDING) * _VOLUME_ROUNDING

    def first_volume_size(self, spec: SessionSpec, restore_bytes: int) -> tuple[int, str | None]:
        """The volume a start prepares, never larger than the session's cap; and why
        there can be none (a checkpoint whose data alone is over the cap)."""
        size = self.volume_size_for(restore_bytes)
        cap = self.session_cap_for(spec)
        if size <= cap:
            return size, None
        need = restore_bytes + restore_bytes // 50 + _FS_RESERVE_BYTES
        if restore_bytes and need > cap:
            return size, (
                f"cannot start: the checkpoint holds {restore_bytes / GIB:.1f} GiB of data, "
                f"more than fits in this session's disk cap of {cap / GIB:.0f} GiB "
                "(sessionDiskCapGb of its compute environment)"
            )
        # Less free space than a fresh volume has, but all the cap allows; the watcher
        # grows it no further.
        return cap // _VOLUME_ROUNDING * _VOLUME_ROUNDING, None

    def progress_sink(
        self, h: SessionHandle, step_name: str, verb: str
    ) -> Callable[[int, int], None]:
        """Percent and bytes of a restore or checkpoint, on `step_name`, twice a second."""
        last = [0.0]

        def fn(done: int, total: int) -> None:
            step = h.step(step_name)
            if step is not None and step.status == "in_progress":
                step.percent = min(100, done * 100 // total) if total > 0 else -1
                step.message = f"{verb} {_mib(done)} of {_mib(total)}"
            now = time.monotonic()
            if now - last[0] >= 0.5 or (total and done >= total):
                last[0] = now
                self.report(h)

        return fn


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"
