"""One session's runner (after Nomad's task runner): its pipelines and its tasks.

A runner owns everything of one session: its handle, the desired state the controller
last sent for it, the one operation in flight (start, stop, forget, ...), the watcher
of its tool, its disk watcher and its checkpointer. The manager decides *which*
operation a session needs; the runner carries it out.

Handles are persisted before each report so a restarted agent re-adopts running tools
without ever starting a duplicate, and every step of a start and a stop can be
interrupted by a crash (docs/contract-notes.md, "Stop order").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from agent import crash_points
from agent.checkpoints.content_store import checkpoint_session, store_refusal
from agent.checkpoints.store import RestoreCancelled, SavedCheckpoint
from agent.datalinks import DATA_DIR, STATE_FAILED, DataLinkError
from agent.errors import (
    AgentError,
    CheckpointError,
    RuntimeStartError,
    StartRefused,
    StartTimeout,
    VolumeError,
    VolumeGone,
)
from agent.host_mounts import detach_mounts_under_sync
from agent.runtime import BindMount, ExitStatus, RuntimeHandle, StartSpec, free_tcp_port
from agent.sessions.build import BuildFailed, EnvironmentBuild, end_orphaned_build
from agent.sessions.checkpointer import Checkpointer
from agent.sessions.context import SessionContext
from agent.sessions.disk import DiskWatcher, budget_message
from agent.sessions.handle import SessionHandle, SessionSpec, steps
from agent.sessions.report import (
    STEP_ANSWER,
    STEP_BUILD,
    STEP_CHECKPOINT,
    STEP_MOUNT,
    STEP_RELEASE,
    STEP_RESTORE,
    STEP_START,
    STEP_STOP,
    STEP_VOLUME,
    running_message,
)
from agent.volumes import VolumeInfo
from studios_shared.connect_contract import connect_version_problem, tag_version

__all__ = ["SessionRunner"]

log = logging.getLogger(__name__)

_LOG_LINES_IN_MESSAGE = 20
_CANCELLED = "start cancelled"


class _StartCancelled(Exception):
    """The controller no longer wants the start in progress (`SessionRunner.cancel_start`)."""


# References of the project's catalogue images (tagged `<tool>-[u<n>-]<connect>`).
_CATALOGUE_PREFIXES = ("studios/", "localhost/studios/")


class SessionRunner:
    def __init__(self, ctx: SessionContext, session_id: str) -> None:
        self.ctx = ctx
        self.session_id = session_id
        self.handle: SessionHandle | None = None
        # The controller's last word on this session (None: not in its desired set).
        self.desired: pb.SessionDesired | None = None
        self.disk = DiskWatcher(ctx, lambda: self.handle)
        self.checkpointer = Checkpointer(ctx, lambda: self.handle)
        # When an ended session whose data is not saved tries its checkpoint again.
        self.unsaved_retry_at = 0.0
        self._op: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # The volume release that follows a reported stop (see `stop`).
        self._release: asyncio.Task[None] | None = None
        # The generation whose start is in flight, whether it is to be abandoned, and the
        # step of it that may be cancelled at once (a build, waiting for the tool).
        self._starting: int | None = None
        self._cancel_start = False
        self._interruptible: asyncio.Task[Any] | None = None
        # Set to end the restore in flight: it runs in a worker thread, which a task's
        # cancel does not stop.
        self._restore_cancel: threading.Event | None = None

    # ------------------------------------------------------------ tasks

    @property
    def busy(self) -> bool:
        """Whether an operation is in flight (at most one per session)."""
        return self._op is not None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"session-{self.session_id}")
        self._op = task

        def done(t: asyncio.Task[None]) -> None:
            if self._op is t:
                self._op = None
            if not t.cancelled() and t.exception() is not None:
                log.error("session %s: operation failed", self.session_id, exc_info=t.exception())
            self.ctx.reconcile()

        task.add_done_callback(done)

    def cancel_start(self, generation: int) -> bool:
        """Abandon the start in flight when it is of `generation` or older; True if one is.

        The start ends at its next safe point: a build or the wait for the tool is cancelled
        at once (a build's process group is killed with it); a restore stops between files
        and downloaded ranges (the ranges in flight finish), and what it wrote is deleted
        with the volume. Nothing is checkpointed from a half-started volume; everything is
        released and the session reported `stopped`."""
        if self._starting is None or generation < self._starting:
            return False
        if not self._cancel_start:
            log.info(
                "session %s: cancelling the start of generation %d", self.session_id, self._starting
            )
            self._cancel_start = True
            if self._interruptible is not None:
                self._interruptible.cancel()
            if self._restore_cancel is not None:
                self._restore_cancel.set()
        return True

    def _check_cancel(self) -> None:
        if self._cancel_start:
            raise _StartCancelled(_CANCELLED)

    async def _unless_cancelled(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await `coro`, a step safe to cancel midway; _StartCancelled when the start is."""
        self._check_cancel()
        task = self._interruptible = asyncio.ensure_future(coro)
        try:
            return await task
        except asyncio.CancelledError:
            if self._cancel_start and task.cancelled() and not _current_cancelling():
                raise _StartCancelled(_CANCELLED) from None
            raise
        finally:
            self._interruptible = None

    async def wait_idle(self) -> None:
        while self._op is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._op)

    async def close(self) -> None:
        """Stop running the session's tasks; its tool is left for the next agent process."""
        if self._release is not None:
            await asyncio.wait({self._release}, timeout=30)
        # The agent's exit waits for its worker threads: a restore would hold it until it
        # had written everything, for a start the next agent process aborts anyway.
        if self._restore_cancel is not None:
            self._restore_cancel.set()
        tasks = [t for t in (self._op, self._watcher) if t is not None]
        tasks += self.checkpointer.cancel()
        for task in tasks:
            task.cancel()
        await self.disk.close()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _watch(self, h: SessionHandle) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self._watcher = asyncio.create_task(self._watch_tool(h), name=f"watch-{h.session_id}")
        self.disk.start(h)

    def _unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        self.disk.stop()

    async def _watch_tool(self, h: SessionHandle) -> None:
        status = await self.ctx.runtime.wait(h.runtime_handle())
        self._watcher = None
        if self.handle is h and h.status == "running" and not self.busy:
            self.spawn(self.after_exit(h, status))

    # ------------------------------------------------------------ recovery

    async def recover(self, h: SessionHandle) -> None:
        """Re-adopt a handle an earlier agent process left (`SessionManager.recover`)."""
        self.handle = h
        ctx = self.ctx
        if h.volume and h.status in ("running", "stopping") and not h.final_uri:
            # Re-attach (loop device, mount) what a host or agent crash detached; never
            # create: an empty volume in its place would be checkpointed over the data.
            try:
                await ctx.volumes.attach(h.volume)
            except Exception as exc:
                log.error("session %s: cannot re-attach its volume: %s", h.session_id, exc)
        if h.status == "running":
            if await ctx.runtime.recover(h.runtime_handle()):
                log.info("session %s: re-adopted running tool (pid %d)", h.session_id, h.pid)
                self._watch(h)
                self.checkpointer.start(h, initial=not h.checkpoint_uri)
            else:
                log.warning("session %s: tool exited while the agent was down", h.session_id)
                self.spawn(self.after_exit(h, ExitStatus(None, "exited while the agent was down")))
        elif h.status == "starting":
            self.spawn(self._abort_interrupted_start(h))
        elif h.status == "building":
            # Only a build ran (it comes before anything else of the session): it is
            # ended now and the manager starts the generation again when the controller
            # still wants it (SessionManager.reconcile), building anew.
            end_orphaned_build(h)
            h.message = "agent restarted during the environment build; building again"
            await ctx.save_and_report(h)
        elif h.status == "stopping":
            log.info("session %s: finishing a stop interrupted by an agent restart", h.session_id)
            self.spawn(self.stop(h))

    # ------------------------------------------------------------ data and volume

    def _root_exists(self, h: SessionHandle) -> bool:
        return bool(h.root_dir) and Path(h.root_dir).is_dir()

    async def _unmount_data(self, h: SessionHandle) -> None:
        """Binds into the session root, then the data-links' FUSE mounts; idempotent
        and never hangs (a store that went away ends in a lazy unmount)."""
        if h.root_dir:
            await asyncio.to_thread(detach_mounts_under_sync, h.root_dir)
        try:
            session_dir = self.ctx.state.session_dir(h.session_id)
            h.data_links = await self.ctx.datalinks.unmount_all(session_dir, h.data_links)
        except Exception:
            log.exception("session %s: unmounting data-links failed", h.session_id)

    async def _mount_data(self, h: SessionHandle, links: list[pb.DataLinkMount]) -> list[BindMount]:
        """Mount the data-links (a required one that fails raises DataLinkError) and
        check the file-system mounts; the bind mounts the runtime makes visible.

        `links` are the desired state's messages: the only place their keys are."""
        try:
            statuses = await self.ctx.datalinks.mount_all(
                self.ctx.state.session_dir(h.session_id), links
            )
        except DataLinkError as exc:
            h.data_links = list(exc.statuses)
            raise
        h.data_links = statuses
        binds = [
            BindMount(Path(s.host_path), f"{DATA_DIR}/{s.mount_name}", s.read_only)
            for s in statuses
            if s.host_path
        ]
        for fsm in h.spec.file_system_mounts:
            target = fsm.mount_path
            if not target.startswith("/") or ".." in target.split("/"):
                raise VolumeError(f"file-system mount {target!r}: the path must be absolute")
            # Only under a prefix the operator allows, whatever the controller sent; the
            # directory bound is the one checked (symlinks resolved).
            source, refusal = await asyncio.to_thread(self.ctx.host_path_refusal, fsm.host_path)
            if refusal is not None:
                raise VolumeError(f"file-system mount {target}: {refusal}")
            if not await asyncio.to_thread(Path(source).is_dir):
                raise VolumeError(
                    f"file-system mount {target}: host path {fsm.host_path} is not a directory "
                    "on this host"
                )
            binds.append(BindMount(Path(source), target, fsm.read_only))
        return binds

    async def _release_volume(self, h: SessionHandle) -> None:
        await self._unmount_data(h)
        volumes = self.ctx.volumes
        if h.volume:
            await volumes.release(h.volume)
        elif h.root_dir:
            await volumes.release(VolumeInfo("directory", h.root_dir, 0))
        if h.log_path:
            await asyncio.to_thread(Path(h.log_path).unlink, missing_ok=True)

    async def _has_data(self, h: SessionHandle) -> bool:
        """Whether the session has a volume to checkpoint, attached; raises VolumeGone
        when it should have one and it is not there (never checkpoint an empty stand-in)."""
        if h.volume:
            if not self.ctx.volumes.is_attached(h.volume):
                await self.ctx.volumes.attach(h.volume)
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
        h.status, h.unsaved, h.volume = "errored", False, None
        h.message = f"{before}the session volume was lost ({exc}); {kept}"

    async def _checkpoint_and_release(self, h: SessionHandle) -> bool:
        """Final checkpoint of an ended tool's data, then release; False keeps the data."""
        try:
            if not h.final_uri and await self._has_data(h):
                await self.checkpointer.final(h)
        except VolumeGone as exc:
            self._volume_lost(h, exc)
            await self._release_volume(h)
            return True
        except CheckpointError as exc:
            h.unsaved = True
            self.unsaved_retry_at = time.monotonic() + self.ctx.settings.unsaved_retry_seconds
            h.message += f"; final checkpoint failed, the session directory is kept: {exc}"
            return False
        h.unsaved = False
        await self._release_volume(h)
        h.volume = None
        return True

    # ------------------------------------------------------------ start

    async def start(self, d: pb.SessionDesired) -> None:
        self._starting, self._cancel_start = d.generation, False
        try:
            await self._start(d)
        finally:
            self._starting, self._cancel_start = None, False

    async def _start(self, d: pb.SessionDesired) -> None:
        ctx, sid = self.ctx, self.session_id
        prev = self.handle
        restore_uri = d.restore.uri
        # Only a checkpoint of this session's own store is restored (the controller checks
        # the same before it sends one): anything else errors the start, nothing restored.
        unsupported = _connect_refusal(d.spec.image)
        refusal = self._restore_refusal(d)
        if prev is not None and prev.unsaved and self._root_exists(prev):
            # The last generation's data was never checkpointed: save it before a fresh
            # volume replaces it, or refuse the start; no data is thrown away.
            try:
                saved = await self.checkpointer.final(prev)
            except CheckpointError as exc:
                prev.message = f"cannot start: the previous session data is not saved yet: {exc}"
                prev.generation = d.generation
                await ctx.save_and_report(prev)
                return
            await self._release_volume(prev)
            # The controller's restore point predates this save (it is the studio's own
            # latest checkpoint): what was just saved is newer.
            if not refusal and (not restore_uri or checkpoint_session(restore_uri) == sid):
                restore_uri = saved.uri
        spec = SessionSpec.from_pb(d.spec)
        h = SessionHandle(
            session_id=sid,
            generation=d.generation,
            status="building" if spec.conda_environment.strip() else "starting",
            runtime=ctx.runtime.name,
            spec=spec,
            restore_uri=restore_uri,
            root_dir=str(ctx.state.root_dir(sid)),
            log_path=str(ctx.state.log_path(sid)),
            # Fresh for every run, saved (handle.json) before the tool starts with it: an
            # agent restarted mid-run proxies with the secret its tool knows.
            proxy_secret=secrets.token_urlsafe(32),
            image=spec.image,
            progress=steps(
                *((STEP_BUILD,) if spec.conda_environment.strip() else ()),
                STEP_VOLUME,
                STEP_RESTORE,
                *((STEP_MOUNT,) if spec.has_mounts else ()),
                STEP_START,
                STEP_ANSWER,
            ),
            message="starting",
        )
        self.handle = h
        await ctx.save_and_report(h)
        crash_points.reached("start:starting-saved")
        log.info("session %s: starting generation %d (%s)", sid, h.generation, spec.image)
        step = STEP_VOLUME
        rh: RuntimeHandle | None = None
        try:
            if unsupported:
                step = h.progress[0].name
                raise StartRefused(unsupported)
            if refusal:
                step = STEP_RESTORE
                raise CheckpointError(refusal)
            if spec.conda_environment.strip():
                # First: a failed build leaves nothing else of the session behind.
                step = STEP_BUILD
                h.image = await self._unless_cancelled(EnvironmentBuild(ctx).run(h, spec.image))
                h.status, h.message = "starting", "starting"
                step = STEP_VOLUME
            self._check_cancel()
            h.set_step(step, "in_progress")
            await ctx.save_and_report(h)
            # Leftovers of an ended generation (a tool a crashed start left, its overlay,
            # its volume) are not this start's data; the tool goes first, it holds the rest.
            await ctx.runtime.reap(h.runtime_handle())
            await ctx.volumes.release(VolumeInfo(ctx.volumes.kind, h.root_dir, 0))
            restore_bytes = await self._restore_size(h) if h.restore_uri else 0
            size, over_cap = ctx.first_volume_size(spec, restore_bytes)
            if over_cap:
                raise VolumeError(over_cap)
            cap = ctx.disk_cap_for(spec)
            left = ctx.disk_budget_free(cap)
            if left < size:
                raise VolumeError(
                    budget_message(
                        h, size, restore_bytes, cap, left, ctx.settings.volume_size_bytes
                    )
                )
            vol = await ctx.volumes.prepare(Path(h.root_dir), size)
            h.volume = vol
            crash_points.reached("start:volume-prepared")
            h.set_step(step, "succeeded", f"{vol.kind} volume at {vol.path}")
            # A restore that outgrows the estimate grows the volume like a writer would.
            self.disk.start(h)

            step = STEP_RESTORE
            self._check_cancel()
            if h.restore_uri:
                h.set_step(step, "in_progress", h.restore_uri)
                await ctx.save_and_report(h)
                self._restore_cancel = threading.Event()
                try:
                    restore_warnings = await ctx.store_for(spec).restore(
                        h.restore_uri,
                        ctx.checkpoint_dir(h),
                        progress=ctx.progress_sink(h, step, "restored"),
                        cancel=self._restore_cancel,
                    )
                except RestoreCancelled as exc:
                    if not self._cancel_start:
                        raise
                    log.info("session %s: %s", sid, exc)
                    raise _StartCancelled(_CANCELLED) from None
                finally:
                    self._restore_cancel = None
                await crash_points.hold("start:restore-written")
                # A cancel after the restore abandons it here: the data it wrote goes
                # with the volume.
                self._check_cancel()
                h.set_step(step, "succeeded", f"restored {h.restore_uri}", restore_warnings)
                for warning in restore_warnings:
                    log.warning("session %s: restore of %s: %s", sid, h.restore_uri, warning)
                _full(h, step)
                crash_points.reached("start:restored")
            else:
                h.set_step(step, "succeeded", "nothing to restore (fresh session)")

            binds: list[BindMount] = []
            if spec.has_mounts:
                step = STEP_MOUNT
                h.set_step(step, "in_progress")
                await ctx.save_and_report(h)
                binds = await self._mount_data(h, list(d.spec.data_links))
                failed = sum(1 for s in h.data_links if s.state == STATE_FAILED)
                note = f", {failed} data-link(s) not mounted" if failed else ""
                h.set_step(step, "succeeded", f"{len(binds)} mount(s){note}")

            self._check_cancel()
            step = STEP_START
            h.set_step(step, "in_progress")
            h.port = free_tcp_port()
            await ctx.save_and_report(h)
            rh = await ctx.runtime.start(
                StartSpec(
                    session_id=sid,
                    image=h.image or spec.image,
                    tool=spec.tool,
                    environment=dict(spec.environment),
                    root_dir=Path(h.root_dir),
                    log_path=Path(h.log_path),
                    port=h.port,
                    generation=h.generation,
                    cpu=spec.cpu,
                    memory_mib=spec.memory_mib,
                    gpu=spec.gpu,
                    mounts=tuple(binds),
                    proxy_secret=h.proxy_secret,
                )
            )
            h.pid, h.create_time, h.runtime_data = rh.pid, rh.create_time, rh.data
            # Saved without an await in between: a cancelled start (agent shutdown) must
            # never leave a tool behind that no handle knows about.
            ctx.state.save_handle_json(h.session_id, h.to_json())
            crash_points.reached("start:tool-recorded")
            h.set_step(step, "succeeded", f"pid {rh.pid}")

            # Users never see the tool's port (operators do, in `studio-agent sessions`).
            step = STEP_ANSWER
            h.set_step(step, "in_progress")
            await ctx.save_and_report(h)
            await self._unless_cancelled(self._wait_for_answer(rh))
            crash_points.reached("start:answered")
            h.set_step(step, "succeeded", "answering")
        except _StartCancelled:
            await self._abandon_start(h, rh)
            return
        except BuildFailed as exc:
            # Nothing of the session exists yet (the build comes first).
            log.warning("session %s: %s", sid, exc)
            h.status, h.message = "buildFailed", str(exc)
            await ctx.save_and_report(h)
            return
        except Exception as exc:
            # Anything that goes wrong errors this start (never a half-started session).
            message = str(exc) if isinstance(exc, AgentError) else f"{step}: {exc}"
            log.warning("session %s: start failed: %s", sid, message)
            self._unwatch()
            h.set_step(step, "errored", message.splitlines()[0])
            if rh is not None:
                status = await ctx.runtime.poll(rh)
                if status is not None:
                    h.exited = True
                    h.exit_code = status.exit_code if status.exit_code is not None else -1
                await ctx.runtime.destroy(rh)
            await self._release_volume(h)
            h.status, h.message, h.volume = "errored", message, None
            await ctx.save_and_report(h)
            return
        h.status = "running"
        h.started_at = int(time.time())
        h.message = running_message(h)
        await ctx.save_and_report(h)
        log.info("session %s: running on port %d", sid, h.port)
        self._watch(h)
        # The first checkpoint of the run, then one per interval.
        self.checkpointer.start(h, initial=True)

    async def _abandon_start(self, h: SessionHandle, rh: RuntimeHandle | None) -> None:
        """Release everything a cancelled start made (a build's process, the tool, the
        mounts, the volume with whatever was restored into it) and report `stopped`.
        Until the report the handle still says starting: an agent killed meanwhile aborts
        the start as any interrupted one (`_abort_interrupted_start`)."""
        ctx = self.ctx
        log.info("session %s: start of generation %d cancelled", h.session_id, h.generation)
        self._unwatch()
        end_orphaned_build(h)
        if rh is not None:
            await ctx.runtime.destroy(rh)
        # A tool created but not yet recorded is found by its labels.
        await ctx.runtime.reap(h.runtime_handle())
        await self._release_volume(h)
        for step in h.progress:
            if step.status in ("in_progress", "pending"):
                step.status, step.message = "errored", _CANCELLED
        h.status, h.message, h.volume, h.unsaved = "stopped", _CANCELLED, None, False
        await ctx.save_and_report(h)

    def _restore_refusal(self, d: pb.SessionDesired) -> str:
        """Why the controller's restore point is not to be restored ("" when it may be)."""
        uri = d.restore.uri
        if not uri:
            return ""
        # The store `ctx.store_for` opens for this spec.
        base = d.spec.checkpoint_base_uri or str(self.ctx.state.default_checkpoint_dir)
        reason = store_refusal(uri, base)
        if not reason:
            return ""
        # Logged by the failed start, with this message.
        return f"restore URI {uri} is outside the session's checkpoint store {base}: {reason}"

    async def _restore_size(self, h: SessionHandle) -> int:
        try:
            return await self.ctx.store_for(h.spec).restored_size(h.restore_uri)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot read checkpoint {h.restore_uri}: {type(exc).__name__}: {exc}"
            ) from exc

    async def _wait_for_answer(self, rh: RuntimeHandle) -> None:
        runtime = self.ctx.runtime
        timeout = self.ctx.settings.start_timeout_seconds
        deadline = time.monotonic() + timeout
        while True:
            status = await runtime.poll(rh)
            if status is not None:
                code = "unknown" if status.exit_code is None else str(status.exit_code)
                raise RuntimeStartError(
                    _with_log(
                        f"tool exited with status {code} before answering",
                        await runtime.logs(rh, _LOG_LINES_IN_MESSAGE),
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
                        f"tool did not answer within {timeout:g} s",
                        await runtime.logs(rh, _LOG_LINES_IN_MESSAGE),
                    )
                )
            await asyncio.sleep(0.1)

    async def _abort_interrupted_start(self, h: SessionHandle) -> None:
        runtime = self.ctx.runtime
        if h.pid:
            await runtime.destroy(h.runtime_handle())
        # Killed between creating the tool and recording it: find it by its labels.
        await runtime.reap(h.runtime_handle())
        await self._release_volume(h)
        h.status, h.volume = "errored", None
        h.message = "agent restarted during start"
        for step in h.progress:
            if step.status == "in_progress":
                step.status, step.message = "errored", h.message
        await self.ctx.save_and_report(h)

    # ------------------------------------------------------------ ends

    async def after_exit(self, h: SessionHandle, status: ExitStatus) -> None:
        """A running tool ended on its own: ERRORED, and save what it left."""
        h.status = "errored"
        h.exited = True
        h.exit_code = status.exit_code if status.exit_code is not None else -1
        h.message = f"tool {status.message}"
        tail = await self.ctx.runtime.logs(h.runtime_handle(), _LOG_LINES_IN_MESSAGE)
        h.message = _with_log(h.message, tail)
        log.warning("session %s: %s", h.session_id, h.message.splitlines()[0])
        await self._unmount_data(h)
        await self._checkpoint_and_release(h)
        await self.ctx.save_and_report(h)

    async def stop(self, h: SessionHandle) -> None:
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
        ctx, sid = self.ctx, h.session_id
        self._unwatch()
        # A build an earlier agent process left (the session was never started).
        end_orphaned_build(h)
        if h.status != "stopping":
            h.status = "stopping"
            h.message = "stopping"
            h.progress = steps(STEP_STOP, STEP_CHECKPOINT, STEP_RELEASE)
            await ctx.save_and_report(h)
        crash_points.reached("stop:stopping-saved")
        log.info("session %s: stopping generation %d", sid, h.generation)
        if h.final_uri:
            h.set_step(STEP_STOP, "succeeded")
            h.set_step(STEP_CHECKPOINT, "succeeded", h.final_uri)
        else:
            h.set_step(STEP_STOP, "in_progress")
            if h.pid:
                status = await ctx.runtime.stop(h.runtime_handle(), ctx.settings.stop_grace_seconds)
                h.exited = True
                if status is not None and status.exit_code is not None:
                    h.exit_code = status.exit_code
            # The tool is gone: its mounts go now, whatever happens to the checkpoint.
            await self._unmount_data(h)
            h.set_step(STEP_STOP, "succeeded")
            h.set_step(STEP_CHECKPOINT, "in_progress")
            await ctx.save_and_report(h)
            crash_points.reached("stop:tool-stopped")
            try:
                if await self._has_data(h):
                    saved: SavedCheckpoint = await self.checkpointer.final(
                        h, ctx.progress_sink(h, STEP_CHECKPOINT, "saved")
                    )
                    h.set_step(STEP_CHECKPOINT, "succeeded", saved.uri, saved.warnings)
                    _full(h, STEP_CHECKPOINT)
                else:
                    h.set_step(STEP_CHECKPOINT, "succeeded", "nothing to save")
            except VolumeGone as exc:
                self._volume_lost(h, exc)
                h.set_step(STEP_CHECKPOINT, "errored", str(exc))
                await self._release_volume(h)
                await ctx.save_and_report(h)
                return
            except CheckpointError as exc:
                h.set_step(STEP_CHECKPOINT, "errored", str(exc))
                h.status, h.unsaved = "errored", True
                h.message = f"final checkpoint failed, the session directory is kept: {exc}"
                self.unsaved_retry_at = time.monotonic() + ctx.settings.unsaved_retry_seconds
                await ctx.save_and_report(h)
                return
        # The data is safe in the store and the handle says so: the studio is stopped now.
        # Releasing the volume (unmount and delete: ~0.6 s on XFS) follows in the same
        # operation, so a new start of this session waits for it; a crash before it ends
        # leaves an ended handle with a volume, which any start or the reaper releases.
        h.set_step(STEP_RELEASE, "in_progress")
        h.status, h.message, h.unsaved = "stopped", "stopped", False
        await ctx.save_and_report(h)
        log.info("session %s: stopped", sid)
        crash_points.reached("stop:reported")
        # Shielded, and waited for by `close`: an agent shut down right after a stop still
        # leaves nothing mounted.
        self._release = asyncio.create_task(self._release_volume(h), name=f"release-{sid}")
        await asyncio.shield(self._release)
        self._release = None
        crash_points.reached("stop:released")
        h.set_step(STEP_RELEASE, "succeeded")
        h.volume = None
        await ctx.save_and_report(h)

    async def retry_unsaved(self, h: SessionHandle) -> None:
        self.unsaved_retry_at = time.monotonic() + self.ctx.settings.unsaved_retry_seconds
        if await self._checkpoint_and_release(h):
            h.message += "; the session directory was saved later and released"
            await self.ctx.save_and_report(h)

    async def forget(self, *, keep_unsaved: bool) -> None:
        """End the session and drop everything of it, its handle last."""
        h = self.handle
        if h is not None and not h.ended:
            await self.stop(h)
        if h is not None and h.unsaved and keep_unsaved:
            # Not desired any more but holding unsaved data: keep it until it is saved.
            if not await self._checkpoint_and_release(h):
                await self.ctx.save_and_report(h)
                return
        self._unwatch()
        if h is not None:
            await self._unmount_data(h)
            if h.volume or self._root_exists(h):
                # Its loop device too: deleting the directory alone would leave it attached.
                await self._release_volume(h)
        await asyncio.to_thread(self.ctx.state.forget_session, self.session_id)
        self.handle = None
        log.info("session %s: forgotten", self.session_id)

    async def release_leftovers(self, h: SessionHandle) -> None:
        """What an ended generation left (its tool, overlay, volume): the reaper's call."""
        await self.ctx.runtime.reap(h.runtime_handle())
        await self._release_volume(h)
        h.volume = None
        await self.ctx.save_and_report(h)

    # ------------------------------------------------------------ accounting tick

    async def refresh(self) -> None:
        """The agent's periodic tick: volume usage and data-link health."""
        h = self.handle
        if h is None or h.status != "running":
            return
        if h.volume:
            await self.disk.check(h)
        if h.data_links and await self.ctx.datalinks.check(h.data_links):
            # A data-link whose helper died is reported failed; the session runs on.
            if h.status == "running":
                h.message = running_message(h)
                await self.ctx.save_and_report(h)

    def has_leftovers(self) -> bool:
        """Whether an ended session still has a volume directory or a mounted overlay."""
        h = self.handle
        if h is None:
            return False
        if h.volume:
            return True
        merged = str(h.runtime_data.get("merged") or "")
        return bool(h.root_dir) and (
            Path(h.root_dir).exists() or (bool(merged) and os.path.ismount(merged))
        )


def _connect_refusal(image: str) -> str:
    """Why the agent will not run a catalogue image ("" when it may): its tag's connect
    version is outside the window this agent speaks (the controller refuses the same at
    start; an older controller, or an operator's catalogue edit, may not)."""
    if not image.startswith(_CATALOGUE_PREFIXES):
        return ""
    version = tag_version(image)
    problem = connect_version_problem(version[2]) if version else None
    return f"image {image} is unsupported by this agent: {problem}" if problem else ""


def _current_cancelling() -> bool:
    """Whether the running task itself is being cancelled (an agent shutdown), as
    opposed to only the step `_unless_cancelled` cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _full(h: SessionHandle, name: str) -> None:
    step = h.step(name)
    if step is not None:
        step.percent = 100


def _with_log(message: str, tail: str) -> str:
    return f"{message}; last output:\n{tail}" if tail.strip() else message
