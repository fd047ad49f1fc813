"""The session manager: a level-triggered reconciler of desired against observed state.

The controller's desired state (`apply_desired`) and the local handles are compared
in `reconcile`; each session has at most one operation (start, stop, forget, ...)
in flight, and every operation ends by reconciling again, so the manager converges
whatever order messages arrive in. Rules (docs/contract-notes.md):

- desired RUNNING with a generation not run yet -> start; an ended generation is
  never restarted;
- desired STOPPED -> SIGTERM, SIGKILL after the grace period, final checkpoint,
  CheckpointEvent(FINALIZED), then release the directory and report STOPPED; if the
  checkpoint fails, the directory is kept and the session is ERRORED;
- DELETED, or absent from a full desired set -> stop if needed, forget everything.

Handles are persisted before each report so `recover` can re-adopt running tools
after an agent restart without ever starting a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from agent import crash_points
from agent.checkpoints.content_store import LATEST, ContentCheckpointStore, storage_options_for
from agent.checkpoints.store import CheckpointStore, SavedCheckpoint
from agent.datalinks import (
    DATA_DIR,
    STATE_FAILED,
    DataLinkError,
    DataLinkMounter,
    MountStatus,
    backend_named,
    spec_json,
)
from agent.errors import (
    AgentError,
    CheckpointError,
    RuntimeStartError,
    StartTimeout,
    VolumeError,
    VolumeGone,
)
from agent.host_mounts import detach_mounts_under_sync
from agent.runtime import (
    BindMount,
    ExitStatus,
    Runtime,
    RuntimeHandle,
    StartSpec,
    free_tcp_port,
)
from agent.state import SessionHandle, StateDir
from agent.volumes import GIB, VolumeInfo, VolumeKind

__all__ = ["SessionManager"]

log = logging.getLogger(__name__)

_STATUS_TO_PB = {
    "starting": pb.SESSION_STATUS_STARTING,
    "running": pb.SESSION_STATUS_RUNNING,
    "stopping": pb.SESSION_STATUS_STOPPING,
    "stopped": pb.SESSION_STATUS_STOPPED,
    "errored": pb.SESSION_STATUS_ERRORED,
}
_STEP_TO_PB = {
    "pending": pb.STEP_STATUS_PENDING,
    "in_progress": pb.STEP_STATUS_IN_PROGRESS,
    "succeeded": pb.STEP_STATUS_SUCCEEDED,
    "errored": pb.STEP_STATUS_ERRORED,
}

STEP_VOLUME = "preparing the volume"
STEP_RESTORE = "restoring the checkpoint"
STEP_MOUNT = "mounting data"
STEP_START = "starting the tool"
STEP_ANSWER = "waiting for the tool to answer"
STEP_STOP = "stopping the tool"
STEP_CHECKPOINT = "writing the final checkpoint"
STEP_RELEASE = "releasing the volume"

_LOG_LINES_IN_MESSAGE = 20
_FS_RESERVE_BYTES = 64 * 1024**2
_VOLUME_ROUNDING = 64 * 1024**2
_UNSAVED_RETRY_SECONDS = 60.0


def _steps(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "status": "pending", "message": "", "warnings": [], "percent": -1}
        for n in names
    ]


def _set_step(h: SessionHandle, name: str, status: str, message: str = "") -> None:
    for step in h.progress:
        if step["name"] == name:
            step["status"] = status
            step["message"] = message
            return


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _with_log(message: str, tail: str) -> str:
    return f"{message}; last output:\n{tail}" if tail.strip() else message


def _session_of(uri: str) -> str:
    """The session id a checkpoint URI belongs to ("" when it cannot tell)."""
    parts = uri.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-3] == "manifests":
        return parts[-2]
    if uri.endswith(".tar.gz") and len(parts) >= 2:
        return parts[-2]
    return ""


def _has_leftovers(root_dir: str, merged: str) -> bool:
    """Whether an ended session still has a volume directory or a mounted overlay."""
    return bool(root_dir) and (
        Path(root_dir).exists() or (bool(merged) and os.path.ismount(merged))
    )


def _runtime_handle(h: SessionHandle) -> RuntimeHandle:
    return RuntimeHandle(
        session_id=h.session_id,
        pid=h.pid,
        create_time=h.create_time,
        port=h.port,
        root_dir=h.root_dir,
        log_path=h.log_path,
        data=dict(h.runtime_data),
    )


class SessionManager:
    def __init__(
        self,
        *,
        state: StateDir,
        runtime: Runtime,
        volumes: VolumeKind,
        stop_grace_seconds: float = 30.0,
        start_timeout_seconds: float = 60.0,
        volume_size_bytes: int = 2 * GIB,
        grow_step_bytes: int = 2 * GIB,
        grow_below_free_bytes: int = 1 * GIB,
        disk_cap_bytes: int = 30 * GIB,
        watch_interval_seconds: float = 5.0,
        checkpoint_interval_seconds: float = 300.0,
        unsaved_retry_seconds: float = _UNSAVED_RETRY_SECONDS,
        s3_endpoint: str | None = None,
        datalinks: DataLinkMounter | None = None,
        reap_interval_seconds: float = 60.0,
    ) -> None:
        self.state = state
        self.runtime = runtime
        self.volumes = volumes
        self.stop_grace_seconds = stop_grace_seconds
        self.start_timeout_seconds = start_timeout_seconds
        self.volume_size_bytes = volume_size_bytes
        self.grow_step_bytes = grow_step_bytes
        self.grow_below_free_bytes = grow_below_free_bytes
        self.disk_cap_bytes = disk_cap_bytes
        self.watch_interval_seconds = watch_interval_seconds
        # Interim checkpoints: one right after the tool answers, then one per interval.
        self.checkpoint_interval_seconds = checkpoint_interval_seconds
        self.unsaved_retry_seconds = unsaved_retry_seconds
        self.s3_endpoint = s3_endpoint
        # FUSE mounts of data-links (None: none can be mounted on this host).
        self.datalinks = datalinks or DataLinkMounter(backend_named("auto"))
        self._stores: dict[str, CheckpointStore] = {}
        self._handles: dict[str, SessionHandle] = {}
        self._desired: dict[str, pb.SessionDesired] = {}
        self._have_full = False
        self._ops: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        # Per running session on a volume kind that can fill up under a writer: a fast
        # free-space watcher (xfs-loop polls every 0.1 s); growth events for `disk`.
        self._disk_watchers: dict[str, asyncio.Task[None]] = {}
        self._volume_locks: dict[str, asyncio.Lock] = {}
        self.disk_events: dict[str, list[dict[str, Any]]] = {}
        # Per running session: the interim checkpoint loop, and the save it has in flight.
        self._checkpointers: dict[str, asyncio.Task[None]] = {}
        self._interim_saves: dict[str, asyncio.Task[None]] = {}
        self._unsaved_retry_at: dict[str, float] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False
        # Volume releases that follow a reported stop (see `_stop`).
        self._releases: set[asyncio.Task[None]] = set()
        # Orphans: tools labelled as this agent's that no live handle owns, and what ended
        # generations left (mounts, loop devices); looked for at start, then per interval.
        self.reap_interval_seconds = reap_interval_seconds
        self._next_reap = 0.0
        self.reaped: list[dict[str, Any]] = []
        # Sinks set by the controller link; the checkpoint sink must persist the event
        # before it returns (the session directory is deleted right after).
        self.on_observed: Callable[[pb.SessionObserved], None] = lambda obs: None
        self.on_checkpoint: Callable[[pb.CheckpointEvent], None] = lambda ev: None

    # ------------------------------------------------------------ queries

    def handles(self) -> list[SessionHandle]:
        return [self._handles[sid] for sid in sorted(self._handles)]

    def get(self, session_id: str) -> SessionHandle | None:
        return self._handles.get(session_id)

    def observed(self, h: SessionHandle) -> pb.SessionObserved:
        obs = pb.SessionObserved(
            session_id=h.session_id,
            generation=h.generation,
            status=_STATUS_TO_PB[h.status],
            message=h.message,
            runtime=h.runtime,
            tool_port=h.port,
            # What the tool sees as /: the merged overlay for podman.
            root_dir=h.runtime_data.get("merged") or h.root_dir,
            started_at=h.started_at,
            exited=h.exited,
            exit_code=h.exit_code,
        )
        for status in h.data_links:
            obs.data_links.append(MountStatus.from_json(status).to_pb())
        if h.volume:
            v = VolumeInfo.from_json(h.volume)
            obs.volume.CopyFrom(
                pb.Volume(
                    kind=v.kind, path=v.path, size_bytes=v.size_bytes, used_bytes=v.used_bytes
                )
            )
        for step in h.progress:
            obs.progress.append(
                pb.ProgressStep(
                    name=step["name"],
                    status=_STEP_TO_PB[step["status"]],
                    message=step["message"],
                    warnings=step["warnings"],
                    percent=step["percent"],
                )
            )
        return obs

    def inventory(self) -> pb.Inventory:
        return pb.Inventory(sessions=[self.observed(h) for h in self.handles()])

    def disk_cap_for(self, h: SessionHandle) -> int:
        """The compute environment's cap on this host: its bootDiskSizeGb, else the default."""
        gb = int(h.spec.get("boot_disk_size_gb") or 0)
        return gb * GIB if gb > 0 else self.disk_cap_bytes

    def disk_budget_free(self, cap_bytes: int | None = None) -> int:
        used = sum(int(h.volume.get("size_bytes", 0)) for h in self._handles.values() if h.volume)
        return (self.disk_cap_bytes if cap_bytes is None else cap_bytes) - used

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for h in self._handles.values():
            counts[h.status] = counts.get(h.status, 0) + 1
        return counts

    # ------------------------------------------------------------ lifecycle

    async def recover(self) -> None:
        """Re-adopt what an earlier agent process left; call once before `start`."""
        handles = await asyncio.to_thread(self.state.load_handles)
        # Data mounts of sessions that no longer run (an agent crash between a tool's
        # end and its unmount, a forgotten session): the others are handled below.
        live = {h.session_id for h in handles if h.status in ("running", "stopping", "starting")}
        try:
            await self.datalinks.cleanup_leftovers(self.state.sessions_dir, live)
        except Exception:
            log.exception("cleaning up leftover data-link mounts failed")
        for h in handles:
            self._handles[h.session_id] = h
            if h.volume and h.status in ("running", "stopping") and not h.final_uri:
                # Re-attach (loop device, mount) what a host or agent crash detached; never
                # create: an empty volume in its place would be checkpointed over the data.
                try:
                    await self.volumes.attach(VolumeInfo.from_json(h.volume))
                except Exception as exc:
                    log.error("session %s: cannot re-attach its volume: %s", h.session_id, exc)
            if h.status == "running":
                if await self.runtime.recover(_runtime_handle(h)):
                    log.info("session %s: re-adopted running tool (pid %d)", h.session_id, h.pid)
                    self._watch(h)
                    self._start_checkpointer(h, initial=not h.checkpoint_uri)
                else:
                    log.warning("session %s: tool exited while the agent was down", h.session_id)
                    self._spawn(
                        h.session_id,
                        self._after_exit(h, ExitStatus(None, "exited while the agent was down")),
                    )
            elif h.status == "starting":
                self._spawn(h.session_id, self._abort_interrupted_start(h))
            elif h.status == "stopping":
                log.info(
                    "session %s: finishing a stop interrupted by an agent restart", h.session_id
                )
                self._spawn(h.session_id, self._stop(h))

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_loop(), name="sessions-ticker")

    async def close(self) -> None:
        """Stop managing; running tools are left running for the next agent process."""
        self._closed = True
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=30)
        tasks = [
            *self._ops.values(),
            *self._watchers.values(),
            *self._checkpointers.values(),
            *self._interim_saves.values(),
        ]
        if self._ticker is not None:
            tasks.append(self._ticker)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def wait_idle(self) -> None:
        """Wait until no operation is in flight (tests, shutdown of a test agent)."""
        while self._ops:
            await asyncio.gather(*self._ops.values(), return_exceptions=True)

    # ------------------------------------------------------------ desired state

    def apply_desired(self, full: bool, sessions: list[pb.SessionDesired]) -> None:
        if full:
            self._desired = {}
            self._have_full = True
        for d in sessions:
            self._desired[d.session_id] = d
        self.reconcile()

    def reconcile(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        for sid in sorted(set(self._desired) | set(self._handles)):
            if sid in self._ops:
                continue
            h = self._handles.get(sid)
            d = self._desired.get(sid)
            if d is None:
                if self._have_full and h is not None:
                    self._spawn(sid, self._forget(sid, keep_unsaved=True))
                continue
            if d.status == pb.DESIRED_STATUS_DELETED:
                if h is not None:
                    self._spawn(sid, self._forget(sid, keep_unsaved=False))
            elif d.status == pb.DESIRED_STATUS_RUNNING:
                if h is None or d.generation > h.generation:
                    if h is not None and not h.ended:
                        # A newer generation while an older one still runs: end it first.
                        self._spawn(sid, self._stop(h))
                    else:
                        self._spawn(sid, self._start(d))
                elif h.ended and h.unsaved and now >= self._unsaved_retry_at.get(sid, 0):
                    self._spawn(sid, self._retry_unsaved(h))
            elif d.status == pb.DESIRED_STATUS_STOPPED and h is not None:
                if not h.ended and d.generation >= h.generation:
                    self._spawn(sid, self._stop(h))
                elif h.ended and h.unsaved and now >= self._unsaved_retry_at.get(sid, 0):
                    self._spawn(sid, self._retry_unsaved(h))

    # ------------------------------------------------------------ plumbing

    def _spawn(self, sid: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"session-{sid}")
        self._ops[sid] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._ops.get(sid) is t:
                del self._ops[sid]
            if not t.cancelled() and t.exception() is not None:
                log.error("session %s: operation failed", sid, exc_info=t.exception())
            if not self._closed:
                self.reconcile()

        task.add_done_callback(done)

    def _watch(self, h: SessionHandle) -> None:
        old = self._watchers.pop(h.session_id, None)
        if old is not None:
            old.cancel()
        self._watchers[h.session_id] = asyncio.create_task(
            self._watch_tool(h), name=f"watch-{h.session_id}"
        )
        old = self._disk_watchers.pop(h.session_id, None)
        if old is not None:
            old.cancel()
        if self.volumes.poll_seconds and h.volume:
            self._disk_watchers[h.session_id] = asyncio.create_task(
                self._watch_disk(h, self.volumes.poll_seconds), name=f"disk-{h.session_id}"
            )

    def _unwatch(self, sid: str) -> None:
        for watchers in (self._watchers, self._disk_watchers):
            task = watchers.pop(sid, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def _save_and_report(self, h: SessionHandle) -> None:
        # Persist first: a report must never get ahead of what a restart would find.
        await asyncio.to_thread(self.state.save_handle, h)
        self.on_observed(self.observed(h))

    def _store(self, h: SessionHandle) -> CheckpointStore:
        base = str(h.spec.get("checkpoint_base_uri") or self.state.default_checkpoint_dir)
        store = self._stores.get(base)
        if store is None:
            store = self._stores[base] = self._default_store(base)
        return store

    def _default_store(self, base_uri: str) -> CheckpointStore:
        return ContentCheckpointStore(
            base_uri,
            storage_options_for(base_uri, self.s3_endpoint),
            tmp_dir=self.state.tmp_dir,
        )

    def _progress(self, h: SessionHandle, step: str, verb: str) -> Callable[[int, int], None]:
        """A progress sink for a restore or checkpoint: percent and bytes on `step`."""
        last = [0.0]

        def fn(done: int, total: int) -> None:
            for s in h.progress:
                if s["name"] == step and s["status"] == "in_progress":
                    s["percent"] = min(100, done * 100 // total) if total > 0 else -1
                    s["message"] = f"{verb} {_mib(done)} of {_mib(total)}"
            now = time.monotonic()
            if now - last[0] >= 0.5 or (total and done >= total):
                last[0] = now
                # Progress only: not persisted, a restart finds the step as it was.
                self.on_observed(self.observed(h))

        return fn

    async def _save(
        self,
        h: SessionHandle,
        status: pb.CheckpointStatus,
        progress: Callable[[int, int], None] | None = None,
    ) -> SavedCheckpoint:
        """Write the session directory as a checkpoint and report it with `status`.

        Incremental against this run's previous checkpoint (or the one it restored)."""
        store = self._store(h)
        t0 = time.monotonic()
        try:
            parent = h.checkpoint_uri or h.restore_uri or LATEST
            saved = await store.save(
                h.session_id, self._checkpoint_dir(h), parent=parent, progress=progress
            )
        except CheckpointError:
            raise
        except Exception as exc:
            # An unusable store URI (unknown scheme, missing fsspec backend, ...) is a
            # failed checkpoint like any other: the directory is kept and it is reported.
            raise CheckpointError(f"cannot write checkpoint: {type(exc).__name__}: {exc}") from exc
        final = status == pb.CHECKPOINT_STATUS_FINALIZED
        crash_points.reached("final-checkpoint:committed" if final else "interim:committed")
        h.checkpoint_uri = saved.uri
        # The sink persists the event before we go on (the directory may be deleted next).
        self.on_checkpoint(
            pb.CheckpointEvent(
                session_id=h.session_id,
                generation=h.generation,
                key=saved.key,
                uri=saved.uri,
                status=status,
                size_bytes=saved.size_bytes,
                saved_at=saved.saved_at,
            )
        )
        if final:
            # Fsynced before the caller may release the volume: from here on a restarted
            # agent only finishes the release, it never checkpoints again.
            h.final_uri = saved.uri
            await asyncio.to_thread(self.state.save_handle, h)
            crash_points.reached("final-checkpoint:recorded")
        log.info(
            "session %s: %s checkpoint %s (%d bytes) in %.2f s",
            h.session_id,
            "final" if final else "interim",
            saved.uri,
            saved.size_bytes,
            time.monotonic() - t0,
        )
        return saved

    async def _final_checkpoint(
        self, h: SessionHandle, progress: Callable[[int, int], None] | None = None
    ) -> SavedCheckpoint:
        await self._stop_checkpointer(h.session_id)
        return await self._save(h, pb.CHECKPOINT_STATUS_FINALIZED, progress)

    # ------------------------------------------------------------ interim checkpoints

    def _running_message(self, h: SessionHandle) -> str:
        message = f"{h.spec.get('tool') or 'tool'} answering on port {h.port}"
        failed = [s["message"] for s in h.data_links if s.get("state") == STATE_FAILED]
        if failed:
            # Optional data-links that could not be mounted: the session runs without.
            message += "; not mounted: " + "; ".join(failed)
        return message

    def _start_checkpointer(self, h: SessionHandle, *, initial: bool) -> None:
        old = self._checkpointers.pop(h.session_id, None)
        if old is not None:
            old.cancel()
        self._checkpointers[h.session_id] = asyncio.create_task(
            self._checkpoint_loop(h, initial), name=f"checkpoint-{h.session_id}"
        )

    async def _stop_checkpointer(self, sid: str) -> None:
        """End the interim loop; a save in flight is finished, never torn."""
        task = self._checkpointers.pop(sid, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        saving = self._interim_saves.pop(sid, None)
        if saving is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await saving

    async def _checkpoint_loop(self, h: SessionHandle, initial: bool) -> None:
        sid = h.session_id
        delay = 0.0 if initial else self.checkpoint_interval_seconds
        while True:
            await asyncio.sleep(delay)
            delay = self.checkpoint_interval_seconds
            if self._handles.get(sid) is not h or h.status != "running":
                return
            task = asyncio.create_task(self._interim(h), name=f"interim-{sid}")
            self._interim_saves[sid] = task
            try:
                # Shielded: stopping the loop lets the save finish (_stop_checkpointer).
                await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session %s: interim checkpoint failed", sid)
            if self._interim_saves.get(sid) is task:
                del self._interim_saves[sid]

    async def _interim(self, h: SessionHandle) -> None:
        if not self._root_exists(h):
            return
        try:
            await self._save(h, pb.CHECKPOINT_STATUS_INTERIM)
        except CheckpointError as exc:
            log.warning("session %s: interim checkpoint failed: %s", h.session_id, exc)
            if h.status == "running":
                previous = (
                    f"the previous checkpoint {h.checkpoint_uri} stays valid"
                    if h.checkpoint_uri
                    else "no checkpoint of this run yet"
                )
                h.message = (
                    f"{self._running_message(h)}; warning: checkpoint refresh failed "
                    f"({exc}); {previous}; retrying in "
                    f"{self.checkpoint_interval_seconds:g} s"
                )
                await self._save_and_report(h)
            return
        if h.status == "running":
            if h.message != self._running_message(h):
                h.message = self._running_message(h)
                await self._save_and_report(h)
            else:
                await asyncio.to_thread(self.state.save_handle, h)

    async def _unmount_data(self, h: SessionHandle) -> None:
        """Binds into the session root, then the data-links' FUSE mounts; idempotent
        and never hangs (a store that went away ends in a lazy unmount)."""
        if h.root_dir:
            await asyncio.to_thread(detach_mounts_under_sync, h.root_dir)
        statuses = [MountStatus.from_json(s) for s in h.data_links]
        try:
            session_dir = self.state.session_dir(h.session_id)
            statuses = await self.datalinks.unmount_all(session_dir, statuses)
        except Exception:
            log.exception("session %s: unmounting data-links failed", h.session_id)
        h.data_links = [s.to_json() for s in statuses]

    async def _mount_data(self, h: SessionHandle, d: pb.SessionDesired) -> list[BindMount]:
        """Mount the data-links (a required one that fails raises DataLinkError) and
        check the file-system mounts; the bind mounts the runtime makes visible."""
        try:
            statuses = await self.datalinks.mount_all(
                self.state.session_dir(h.session_id), list(d.spec.data_links)
            )
        except DataLinkError as exc:
            h.data_links = [s.to_json() for s in exc.statuses]
            raise
        h.data_links = [s.to_json() for s in statuses]
        binds = [
            BindMount(Path(s.host_path), f"{DATA_DIR}/{s.mount_name}", s.read_only)
            for s in statuses
            if s.host_path
        ]
        for fsm in d.spec.file_system_mounts:
            target = fsm.mount_path
            if not target.startswith("/") or ".." in target.split("/"):
                raise VolumeError(f"file-system mount {target!r}: the path must be absolute")
            if not await asyncio.to_thread(Path(fsm.host_path).is_dir):
                raise VolumeError(
                    f"file-system mount {target}: host path {fsm.host_path} is not a directory "
                    "on this host"
                )
            binds.append(BindMount(Path(fsm.host_path), target, fsm.read_only))
        return binds

    async def _release(self, h: SessionHandle) -> None:
        await self._unmount_data(h)
        if h.volume:
            await self.volumes.release(VolumeInfo.from_json(h.volume))
        elif h.root_dir:
            await self.volumes.release(VolumeInfo("directory", h.root_dir, 0))
        if h.log_path:
            await asyncio.to_thread(Path(h.log_path).unlink, missing_ok=True)

    def _checkpoint_dir(self, h: SessionHandle) -> Path:
        """What checkpoints read and restores fill: the volume, or the overlay's upper
        directory on it (podman)."""
        return self.runtime.checkpoint_dir(Path(h.root_dir))

    def _root_exists(self, h: SessionHandle) -> bool:
        return bool(h.root_dir) and Path(h.root_dir).is_dir()

    # ------------------------------------------------------------ operations

    async def _start(self, d: pb.SessionDesired) -> None:
        sid = d.session_id
        prev = self._handles.get(sid)
        restore_uri = d.restore.uri
        if prev is not None and prev.unsaved and self._root_exists(prev):
            # The last generation's data was never checkpointed: save it before a fresh
            # volume replaces it, or refuse the start; no data is thrown away.
            try:
                saved = await self._final_checkpoint(prev)
            except CheckpointError as exc:
                prev.message = f"cannot start: the previous session data is not saved yet: {exc}"
                prev.generation = d.generation
                await self._save_and_report(prev)
                return
            await self._release(prev)
            # The controller's restore point predates this save (it is the studio's own
            # latest checkpoint): what was just saved is newer.
            if not restore_uri or _session_of(restore_uri) == sid:
                restore_uri = saved.uri
        spec = {
            "image": d.spec.image,
            "tool": d.spec.tool,
            "environment": dict(d.spec.environment),
            "checkpoint_base_uri": d.spec.checkpoint_base_uri,
            "boot_disk_size_gb": d.spec.boot_disk_size_gb,
            "studio_name": d.spec.studio_name,
            # Without the keys: credentials are never written to the handle.
            "data_links": spec_json(d.spec.data_links),
            "file_system_mounts": [
                {"host_path": m.host_path, "mount_path": m.mount_path, "read_only": m.read_only}
                for m in d.spec.file_system_mounts
            ],
        }
        h = SessionHandle(
            session_id=sid,
            generation=d.generation,
            status="starting",
            runtime=self.runtime.name,
            spec=spec,
            restore_uri=restore_uri,
            root_dir=str(self.state.root_dir(sid)),
            log_path=str(self.state.log_path(sid)),
            progress=_steps(
                STEP_VOLUME,
                STEP_RESTORE,
                *((STEP_MOUNT,) if d.spec.data_links or d.spec.file_system_mounts else ()),
                STEP_START,
                STEP_ANSWER,
            ),
            message="starting",
        )
        self._handles[sid] = h
        await self._save_and_report(h)
        crash_points.reached("start:starting-saved")
        log.info("session %s: starting generation %d (%s)", sid, h.generation, d.spec.image)
        step = STEP_VOLUME
        rh: RuntimeHandle | None = None
        try:
            _set_step(h, step, "in_progress")
            await self._save_and_report(h)
            # Leftovers of an ended generation (a tool a crashed start left, its overlay,
            # its volume) are not this start's data; the tool goes first, it holds the rest.
            await self.runtime.reap(_runtime_handle(h))
            await self.volumes.release(VolumeInfo(self.volumes.kind, h.root_dir, 0))
            restore_bytes = await self._restore_size(h) if h.restore_uri else 0
            size = self.volume_size_for(restore_bytes)
            cap = self.disk_cap_for(h)
            left = self.disk_budget_free(cap)
            if left < size:
                raise VolumeError(self._budget_message(h, size, restore_bytes, cap, left))
            vol = await self.volumes.prepare(Path(h.root_dir), size)
            h.volume = vol.to_json()
            crash_points.reached("start:volume-prepared")
            _set_step(h, step, "succeeded", f"{vol.kind} volume at {vol.path}")
            if self.volumes.poll_seconds:
                # A restore that outgrows the estimate grows the volume like a writer would.
                self._disk_watchers[sid] = asyncio.create_task(
                    self._watch_disk(h, self.volumes.poll_seconds), name=f"disk-{sid}"
                )

            step = STEP_RESTORE
            if h.restore_uri:
                _set_step(h, step, "in_progress", h.restore_uri)
                await self._save_and_report(h)
                store = self._store(h)
                await store.restore(
                    h.restore_uri,
                    self._checkpoint_dir(h),
                    progress=self._progress(h, step, "restored"),
                )
                for s in h.progress:
                    if s["name"] == step:
                        s["percent"] = 100
                _set_step(h, step, "succeeded", f"restored {h.restore_uri}")
                crash_points.reached("start:restored")
            else:
                _set_step(h, step, "succeeded", "nothing to restore (fresh session)")

            binds: list[BindMount] = []
            if d.spec.data_links or d.spec.file_system_mounts:
                step = STEP_MOUNT
                _set_step(h, step, "in_progress")
                await self._save_and_report(h)
                binds = await self._mount_data(h, d)
                failed = sum(1 for s in h.data_links if s["state"] == STATE_FAILED)
                note = f", {failed} data-link(s) not mounted" if failed else ""
                _set_step(h, step, "succeeded", f"{len(binds)} mount(s){note}")

            step = STEP_START
            _set_step(h, step, "in_progress")
            h.port = free_tcp_port()
            await self._save_and_report(h)
            rh = await self.runtime.start(
                StartSpec(
                    session_id=sid,
                    image=d.spec.image,
                    tool=d.spec.tool,
                    environment=dict(d.spec.environment),
                    root_dir=Path(h.root_dir),
                    log_path=Path(h.log_path),
                    port=h.port,
                    generation=h.generation,
                    cpu=d.spec.cpu,
                    memory_mib=d.spec.memory_mib,
                    gpu=d.spec.gpu,
                    mounts=tuple(binds),
                )
            )
            h.pid, h.create_time, h.runtime_data = rh.pid, rh.create_time, rh.data
            # Saved without an await in between: a cancelled start (agent shutdown) must
            # never leave a tool behind that no handle knows about.
            self.state.save_handle(h)
            crash_points.reached("start:tool-recorded")
            _set_step(h, step, "succeeded", f"pid {rh.pid}")

            step = STEP_ANSWER
            _set_step(h, step, "in_progress", f"port {h.port}")
            await self._save_and_report(h)
            await self._wait_for_answer(rh)
            crash_points.reached("start:answered")
            _set_step(h, step, "succeeded", f"answering on port {h.port}")
        except Exception as exc:
            # Anything that goes wrong errors this start (never a half-started session).
            message = str(exc) if isinstance(exc, AgentError) else f"{step}: {exc}"
            log.warning("session %s: start failed: %s", sid, message)
            self._unwatch(sid)
            _set_step(h, step, "errored", message.splitlines()[0])
            if rh is not None:
                status = await self.runtime.poll(rh)
                if status is not None:
                    h.exited = True
                    h.exit_code = status.exit_code if status.exit_code is not None else -1
                await self.runtime.destroy(rh)
            await self._release(h)
            h.status, h.message, h.volume = "errored", message, {}
            await self._save_and_report(h)
            return
        h.status = "running"
        h.started_at = int(time.time())
        h.message = self._running_message(h)
        await self._save_and_report(h)
        log.info("session %s: running on port %d", sid, h.port)
        self._watch(h)
        # The first checkpoint of the run, then one per interval (`interim`).
        self._start_checkpointer(h, initial=True)

    async def _restore_size(self, h: SessionHandle) -> int:
        store = self._store(h)
        try:
            return await store.restored_size(h.restore_uri)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot read checkpoint {h.restore_uri}: {type(exc).__name__}: {exc}"
            ) from exc

    def volume_size_for(self, restore_bytes: int) -> int:
        """A fresh session's volume, or one that holds a restore and still has the same
        free space: the data, the free space, and XFS's own share (log, inodes, free-space
        trees: about 1 % plus a few MiB at these sizes), rounded up to 64 MiB."""
        if restore_bytes <= 0:
            return self.volume_size_bytes
        need = restore_bytes + self.volume_size_bytes
        need += need // 50 + _FS_RESERVE_BYTES
        return -(-need // _VOLUME_ROUNDING) * _VOLUME_ROUNDING

    def _budget_message(
        self, h: SessionHandle, size: int, restore_bytes: int, cap: int, left: int
    ) -> str:
        held = f"other sessions of this compute environment here hold {(cap - left) / GIB:.1f} GiB"
        budget = f"{left / GIB:.1f} GiB of its {cap / GIB:.0f} GiB disk budget on this host"
        if restore_bytes:
            return (
                f"cannot start: restoring checkpoint {h.restore_uri} needs a "
                f"{size / GIB:.1f} GiB volume ({restore_bytes / GIB:.1f} GiB of data plus "
                f"{self.volume_size_bytes / GIB:.0f} GiB free), but only {budget} is left "
                f"({held})"
            )
        return (
            f"cannot start: a session needs {size / GIB:.1f} GiB, but only {budget} is "
            f"left ({held})"
        )

    async def _wait_for_answer(self, rh: RuntimeHandle) -> None:
        deadline = time.monotonic() + self.start_timeout_seconds
        while True:
            status = await self.runtime.poll(rh)
            if status is not None:
                code = "unknown" if status.exit_code is None else str(status.exit_code)
                raise RuntimeStartError(
                    _with_log(
                        f"tool exited with status {code} before answering on port {rh.port}",
                        await self.runtime.logs(rh, _LOG_LINES_IN_MESSAGE),
                    )
                )
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", rh.port), timeout=1.0
                )
            except (OSError, TimeoutError):
                pass
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            if time.monotonic() >= deadline:
                raise StartTimeout(
                    _with_log(
                        f"tool did not answer on port {rh.port} within "
                        f"{self.start_timeout_seconds:g} s",
                        await self.runtime.logs(rh, _LOG_LINES_IN_MESSAGE),
                    )
                )
            await asyncio.sleep(0.1)

    async def _watch_tool(self, h: SessionHandle) -> None:
        status = await self.runtime.wait(_runtime_handle(h))
        self._watchers.pop(h.session_id, None)
        current = self._handles.get(h.session_id)
        if current is h and h.status == "running" and h.session_id not in self._ops:
            self._spawn(h.session_id, self._after_exit(h, status))

    async def _after_exit(self, h: SessionHandle, status: ExitStatus) -> None:
        """A running tool ended on its own: ERRORED, and save what it left."""
        h.status = "errored"
        h.exited = True
        h.exit_code = status.exit_code if status.exit_code is not None else -1
        h.message = f"tool {status.message}"
        tail = await self.runtime.logs(_runtime_handle(h), _LOG_LINES_IN_MESSAGE)
        h.message = _with_log(h.message, tail)
        log.warning("session %s: %s", h.session_id, h.message.splitlines()[0])
        await self._unmount_data(h)
        await self._checkpoint_and_release(h)
        await self._save_and_report(h)

    async def _checkpoint_and_release(self, h: SessionHandle) -> bool:
        """Final checkpoint of an ended tool's data, then release; False keeps the data."""
        try:
            if not h.final_uri and await self._has_data(h):
                await self._final_checkpoint(h)
        except VolumeGone as exc:
            self._volume_lost(h, exc)
            await self._release(h)
            return True
        except CheckpointError as exc:
            h.unsaved = True
            self._unsaved_retry_at[h.session_id] = time.monotonic() + self.unsaved_retry_seconds
            h.message += f"; final checkpoint failed, the session directory is kept: {exc}"
            return False
        h.unsaved = False
        await self._release(h)
        h.volume = {}
        return True

    async def _has_data(self, h: SessionHandle) -> bool:
        """Whether the session has a volume to checkpoint, attached; raises VolumeGone
        when it should have one and it is not there (never checkpoint an empty stand-in)."""
        if h.volume:
            info = VolumeInfo.from_json(h.volume)
            if not self.volumes.is_attached(info):
                await self.volumes.attach(info)
            return True
        return self._root_exists(h)

    def _volume_lost(self, h: SessionHandle, exc: VolumeGone) -> None:
        restore_point = h.checkpoint_uri or h.restore_uri
        kept = (
            f"its last good checkpoint {restore_point} stays the restore point"
            if restore_point
            else "it had no checkpoint yet"
        )
        log.error("session %s: %s", h.session_id, exc)
        before = f"{h.message}; " if h.status == "errored" and h.message else ""
        h.status, h.unsaved, h.volume = "errored", False, {}
        h.message = f"{before}the session volume was lost ({exc}); {kept}"

    async def _abort_interrupted_start(self, h: SessionHandle) -> None:
        if h.pid:
            await self.runtime.destroy(_runtime_handle(h))
        # Killed between creating the tool and recording it: find it by its labels.
        await self.runtime.reap(_runtime_handle(h))
        await self._release(h)
        h.status, h.volume = "errored", {}
        h.message = "agent restarted during start"
        for step in h.progress:
            if step["status"] == "in_progress":
                step["status"], step["message"] = "errored", h.message
        await self._save_and_report(h)

    async def _stop(self, h: SessionHandle) -> None:
        """Stop a session; every step can be interrupted by an agent crash.

        Step order, and what a restarted agent does after a crash at each (the handle is
        fsynced at every arrow; `recover` finds status `stopping` and calls this again):

        1. status `stopping` saved          -> stops the tool (again; idempotent)
        2. tool stopped, data unmounted     -> checkpoints the attached volume
        3. final manifest committed         -> checkpoints again (same data: the volume
                                               is untouched until step 4)
        4. `final_uri` saved                -> skips the checkpoint, releases the volume
        5. status `stopped` saved, reported -> (ended) the reaper or the next start
                                               releases the volume
        6. volume released (idempotent), the handle saved without it

        The volume is released only after step 4, so no crash can make a restarted agent
        checkpoint a released (empty) volume over the run's final checkpoint.
        """
        sid = h.session_id
        self._unwatch(sid)
        if h.status != "stopping":
            h.status = "stopping"
            h.message = "stopping"
            h.progress = _steps(STEP_STOP, STEP_CHECKPOINT, STEP_RELEASE)
            await self._save_and_report(h)
        crash_points.reached("stop:stopping-saved")
        log.info("session %s: stopping generation %d", sid, h.generation)
        if h.final_uri:
            _set_step(h, STEP_STOP, "succeeded")
            _set_step(h, STEP_CHECKPOINT, "succeeded", h.final_uri)
        else:
            _set_step(h, STEP_STOP, "in_progress")
            if h.pid:
                status = await self.runtime.stop(_runtime_handle(h), self.stop_grace_seconds)
                h.exited = True
                if status is not None and status.exit_code is not None:
                    h.exit_code = status.exit_code
            # The tool is gone: its mounts go now, whatever happens to the checkpoint.
            await self._unmount_data(h)
            _set_step(h, STEP_STOP, "succeeded")
            _set_step(h, STEP_CHECKPOINT, "in_progress")
            await self._save_and_report(h)
            crash_points.reached("stop:tool-stopped")
            try:
                if await self._has_data(h):
                    saved = await self._final_checkpoint(
                        h, self._progress(h, STEP_CHECKPOINT, "saved")
                    )
                    _set_step(h, STEP_CHECKPOINT, "succeeded", saved.uri)
                    for s in h.progress:
                        if s["name"] == STEP_CHECKPOINT:
                            s["percent"] = 100
                else:
                    _set_step(h, STEP_CHECKPOINT, "succeeded", "nothing to save")
            except VolumeGone as exc:
                self._volume_lost(h, exc)
                _set_step(h, STEP_CHECKPOINT, "errored", str(exc))
                await self._release(h)
                await self._save_and_report(h)
                return
            except CheckpointError as exc:
                _set_step(h, STEP_CHECKPOINT, "errored", str(exc))
                h.status, h.unsaved = "errored", True
                h.message = f"final checkpoint failed, the session directory is kept: {exc}"
                self._unsaved_retry_at[sid] = time.monotonic() + self.unsaved_retry_seconds
                await self._save_and_report(h)
                return
        # The data is safe in the store and the handle says so: the studio is stopped now.
        # Releasing the volume (unmount and delete: ~0.6 s on XFS) follows in the same
        # operation, so a new start of this session waits for it; a crash before it ends
        # leaves an ended handle with a volume, which any start or the reaper releases.
        _set_step(h, STEP_RELEASE, "in_progress")
        h.status, h.message, h.unsaved = "stopped", "stopped", False
        await self._save_and_report(h)
        log.info("session %s: stopped", sid)
        crash_points.reached("stop:reported")
        # Shielded, and waited for by `close`: an agent shut down right after a stop still
        # leaves nothing mounted.
        release = asyncio.create_task(self._release(h), name=f"release-{sid}")
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)
        await asyncio.shield(release)
        crash_points.reached("stop:released")
        _set_step(h, STEP_RELEASE, "succeeded")
        h.volume = {}
        await self._save_and_report(h)

    async def _retry_unsaved(self, h: SessionHandle) -> None:
        self._unsaved_retry_at[h.session_id] = time.monotonic() + self.unsaved_retry_seconds
        if await self._checkpoint_and_release(h):
            h.message += "; the session directory was saved later and released"
            await self._save_and_report(h)

    async def _forget(self, sid: str, *, keep_unsaved: bool) -> None:
        h = self._handles.get(sid)
        if h is not None and not h.ended:
            await self._stop(h)
        if h is not None and h.unsaved and keep_unsaved:
            # Not desired any more but holding unsaved data: keep it until it is saved.
            if not await self._checkpoint_and_release(h):
                await self._save_and_report(h)
                return
        self._unwatch(sid)
        if h is not None:
            await self._unmount_data(h)
            if h.volume or self._root_exists(h):
                # Its loop device too: deleting the directory alone would leave it attached.
                await self._release(h)
        await asyncio.to_thread(self.state.forget_session, sid)
        self._handles.pop(sid, None)
        self._unsaved_retry_at.pop(sid, None)
        log.info("session %s: forgotten", sid)

    # ------------------------------------------------------------ disk watcher

    async def _tick_loop(self) -> None:
        while True:
            if time.monotonic() >= self._next_reap:
                self._next_reap = time.monotonic() + self.reap_interval_seconds
                try:
                    await self.reap()
                except Exception:
                    log.exception("reaping orphaned tools and volumes failed")
            await asyncio.sleep(self.watch_interval_seconds)
            try:
                await self._refresh_usage()
            except Exception:
                log.exception("disk accounting failed")
            self.reconcile()

    # ------------------------------------------------------------ reaper

    async def reap(self) -> list[dict[str, Any]]:
        """Stop the tools labelled as this agent's sessions that no live handle owns, and
        release what ended generations left behind; never touches a session with an
        operation in flight or one whose data is not saved yet."""
        reaped: list[dict[str, Any]] = []

        def note(sid: str, generation: int, what: str) -> None:
            reaped.append(self._note_reaped(sid, generation, what))

        for tool in await self.runtime.labelled_tools():
            sid = tool.session_id
            h = self._handles.get(sid)
            if sid in self._ops or (h and not h.ended and h.generation == tool.generation):
                continue
            await self.runtime.remove_labelled(tool)
            note(sid, tool.generation, tool.description)
        live: set[str] = set()
        for h in list(self._handles.values()):
            if h.session_id in self._ops or not h.ended or h.unsaved:
                live.add(h.root_dir)
                continue
            merged = str(h.runtime_data.get("merged") or "")
            if bool(h.volume) or await asyncio.to_thread(_has_leftovers, h.root_dir, merged):
                live.add(h.root_dir)  # released below, not swept behind its back
                if h.session_id not in self._ops and self._handles.get(h.session_id) is h:
                    # An operation of the session, so a start of it waits for the release.
                    self._spawn(h.session_id, self._release_leftovers(h))
        for what in await self.volumes.sweep(self.state.sessions_dir, live):
            note("-", 0, what)
        return reaped

    async def _release_leftovers(self, h: SessionHandle) -> None:
        await self.runtime.reap(_runtime_handle(h))
        await self._release(h)
        h.volume = {}
        await self._save_and_report(h)
        self._note_reaped(h.session_id, h.generation, f"leftover volume {h.root_dir}")

    def _note_reaped(self, sid: str, generation: int, what: str) -> dict[str, Any]:
        log.warning(
            "reaped %s of session %s generation %d: no live session owns it", what, sid, generation
        )
        entry = {"at": int(time.time()), "sessionId": sid, "generation": generation, "what": what}
        self.reaped = [*self.reaped, entry][-50:]
        return entry

    async def _refresh_usage(self) -> None:
        for h in list(self._handles.values()):
            if h.status == "running" and h.volume:
                await self._check_volume(h)
            if h.status == "running" and h.data_links:
                await self._check_data_links(h)

    async def _check_data_links(self, h: SessionHandle) -> None:
        """A data-link whose helper died is reported failed; the session runs on."""
        statuses = [MountStatus.from_json(s) for s in h.data_links]
        if await self.datalinks.check(statuses) and h.status == "running":
            h.data_links = [s.to_json() for s in statuses]
            h.message = self._running_message(h)
            await self._save_and_report(h)

    async def _watch_disk(self, h: SessionHandle, interval: float) -> None:
        """Fast per-session watcher: a full-speed writer fills 1 GiB in 0.25-0.5 s."""
        while (
            self._handles.get(h.session_id) is h
            and h.status in ("starting", "running")
            and h.volume
        ):
            try:
                free = self.volumes.free_bytes(VolumeInfo.from_json(h.volume))
                if free is None or free < self.grow_below_free_bytes:
                    await self._check_volume(h)
            except Exception:
                log.exception("session %s: disk watcher failed", h.session_id)
            await asyncio.sleep(interval)

    async def _check_volume(self, h: SessionHandle) -> None:
        lock = self._volume_locks.setdefault(h.session_id, asyncio.Lock())
        async with lock:
            # Also while starting: a restore must be able to grow its volume too.
            if h.status not in ("starting", "running") or not h.volume:
                return
            vol = VolumeInfo.from_json(h.volume)
            before = (vol.size_bytes, vol.used_bytes)
            vol = await self.volumes.usage(vol)
            free = vol.size_bytes - vol.used_bytes
            live = self.volumes.free_bytes(vol)
            if live is not None:
                free = live
            message = ""
            if free < self.grow_below_free_bytes:
                cap = self.disk_cap_for(h)
                step = min(self.grow_step_bytes, self.disk_budget_free(cap))
                if step > 0:
                    started = time.monotonic()
                    try:
                        vol = await self.volumes.grow(vol, step)
                    except VolumeError as exc:
                        message = f"running; the volume cannot grow: {exc}"
                    else:
                        took = time.monotonic() - started
                        log.info(
                            "session %s: volume grown to %d bytes in %.0f ms",
                            h.session_id,
                            vol.size_bytes,
                            took * 1000,
                        )
                        events = self.disk_events.setdefault(h.session_id, [])
                        events.append(
                            {
                                "at": time.time(),
                                "fromBytes": before[0],
                                "toBytes": vol.size_bytes,
                                "freeBeforeBytes": free,
                                "seconds": round(took, 4),
                            }
                        )
                        del events[:-50]
                else:
                    message = (
                        f"running; the volume is at the disk budget: {vol.size_bytes / GIB:.1f} "
                        f"GiB, and the compute environment's {cap / GIB:.0f} GiB on this host "
                        "are in use, so it cannot grow (stop and start again to reclaim space)"
                    )
            h.volume = vol.to_json()
            changed = abs(vol.used_bytes - before[1]) > max(16 * 1024**2, before[1] // 100)
            if message and h.message != message:
                h.message = message
                log.warning("session %s: %s", h.session_id, message)
                await self._save_and_report(h)
            elif vol.size_bytes != before[0] or changed:
                await self._save_and_report(h)
