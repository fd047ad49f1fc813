"""The session manager: a level-triggered reconciler of desired against observed state.

The controller's desired state (`apply_desired`) and each runner's handle are compared
in `reconcile`; each session has at most one operation in flight (its runner's), and
every operation ends by reconciling again, so the manager converges whatever order
messages arrive in. Rules (docs/contract-notes.md):

- desired RUNNING with a generation not run yet -> start; an ended generation is
  never restarted; a generation still `building` with no operation in flight (its build
  was ended by an agent restart) -> start again, building anew;
- desired STOPPED -> SIGTERM, SIGKILL after the grace period, final checkpoint,
  CheckpointEvent(FINALIZED), then release the directory and report STOPPED; if the
  checkpoint fails, the directory is kept and the session is ERRORED;
- DELETED, or absent from a full desired set -> stop if needed, forget everything;
- STOPPED or DELETED while the generation is still starting (a cancel) -> the start is
  abandoned at its next safe point, everything of it released, STOPPED reported.

The manager owns the runners and what spans them (the disk budget, the reaper, the
accounting tick); everything of one session is its runner's (`runner.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from agent.datalinks import DataLinkMounter, backend_named
from agent.runtime import Runtime
from agent.sessions.context import SessionContext, SessionSettings
from agent.sessions.handle import SessionHandle, load_handles
from agent.sessions.report import observed
from agent.sessions.runner import SessionRunner
from agent.state import StateDir
from agent.volumes import VolumeKind

__all__ = ["SessionManager"]

log = logging.getLogger(__name__)

_REAPED_KEPT = 50


class SessionManager:
    def __init__(
        self,
        *,
        state: StateDir,
        runtime: Runtime,
        volumes: VolumeKind,
        settings: SessionSettings | None = None,
        datalinks: DataLinkMounter | None = None,
    ) -> None:
        self.state = state
        self.runtime = runtime
        self.volumes = volumes
        self.settings = settings or SessionSettings()
        self.context = SessionContext(
            state=state,
            runtime=runtime,
            volumes=volumes,
            # FUSE mounts of data-links (no backend: none can be mounted on this host).
            datalinks=datalinks or DataLinkMounter(backend_named("auto")),
            settings=self.settings,
            budget_used=self._budget_used,
        )
        self.context.reconcile = self.reconcile
        self._runners: dict[str, SessionRunner] = {}
        # Whether a full desired set arrived: only then is a session absent from it gone.
        self._have_full = False
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False
        # Orphans: tools labelled as this agent's that no live handle owns, and what ended
        # generations left (mounts, loop devices); looked for at start, then per interval.
        self._next_reap = 0.0
        self.reaped: list[dict[str, Any]] = []

    # Sinks set by the controller link (see SessionContext).
    @property
    def on_observed(self) -> Callable[[pb.SessionObserved], None]:
        return self.context.on_observed

    @on_observed.setter
    def on_observed(self, sink: Callable[[pb.SessionObserved], None]) -> None:
        self.context.on_observed = sink

    @property
    def on_checkpoint(self) -> Callable[[pb.CheckpointEvent], None]:
        return self.context.on_checkpoint

    @on_checkpoint.setter
    def on_checkpoint(self, sink: Callable[[pb.CheckpointEvent], None]) -> None:
        self.context.on_checkpoint = sink

    # ------------------------------------------------------------ queries

    def handles(self) -> list[SessionHandle]:
        return [r.handle for _, r in sorted(self._runners.items()) if r.handle is not None]

    def get(self, session_id: str) -> SessionHandle | None:
        runner = self._runners.get(session_id)
        return runner.handle if runner is not None else None

    def runner(self, session_id: str) -> SessionRunner | None:
        return self._runners.get(session_id)

    def inventory(self) -> pb.Inventory:
        return pb.Inventory(sessions=[observed(h) for h in self.handles()])

    def disk_cap_for(self, h: SessionHandle) -> int:
        return self.context.disk_cap_for(h.spec)

    def disk_budget_free(self, cap_bytes: int | None = None) -> int:
        return self.context.disk_budget_free(cap_bytes)

    def disk_events(self, session_id: str) -> list[dict[str, Any]]:
        """The volume growth of a session's runner, newest last."""
        runner = self._runners.get(session_id)
        return list(runner.disk.events) if runner is not None else []

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for h in self.handles():
            counts[h.status] = counts.get(h.status, 0) + 1
        return counts

    def _budget_used(self) -> int:
        return sum(h.volume.size_bytes for h in self.handles() if h.volume)

    def _runner_for(self, session_id: str) -> SessionRunner:
        runner = self._runners.get(session_id)
        if runner is None:
            runner = self._runners[session_id] = SessionRunner(self.context, session_id)
        return runner

    # ------------------------------------------------------------ lifecycle

    async def recover(self) -> None:
        """Re-adopt what an earlier agent process left; call once before `start`."""
        handles = await asyncio.to_thread(load_handles, self.state)
        # Data mounts of sessions that no longer run (an agent crash between a tool's
        # end and its unmount, a forgotten session): the others are handled below.
        live = {h.session_id for h in handles if h.status in ("running", "stopping", "starting")}
        try:
            await self.context.datalinks.cleanup_leftovers(self.state.sessions_dir, live)
        except Exception:
            log.exception("cleaning up leftover data-link mounts failed")
        for h in handles:
            await self._runner_for(h.session_id).recover(h)

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_loop(), name="sessions-ticker")

    async def close(self) -> None:
        """Stop managing; running tools are left running for the next agent process."""
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
        await asyncio.gather(*(r.close() for r in self._runners.values()))

    async def wait_idle(self) -> None:
        """Wait until no operation is in flight (tests, shutdown of a test agent)."""
        while any(r.busy for r in self._runners.values()):
            await asyncio.gather(*(r.wait_idle() for r in list(self._runners.values())))

    # ------------------------------------------------------------ desired state

    def apply_desired(self, full: bool, sessions: list[pb.SessionDesired]) -> None:
        if full:
            for runner in self._runners.values():
                runner.desired = None
            self._have_full = True
        for d in sessions:
            self._runner_for(d.session_id).desired = d
        self.reconcile()

    def reconcile(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        for sid in sorted(self._runners):
            runner = self._runners[sid]
            if runner.busy:
                d = runner.desired
                if d is not None and d.status != pb.DESIRED_STATUS_RUNNING:
                    # A start the controller no longer wants (a cancel, a delete): it is
                    # abandoned at its next safe point, then this reconciles again.
                    runner.cancel_start(d.generation)
                continue
            h, d = runner.handle, runner.desired
            if h is None and (d is None or d.status == pb.DESIRED_STATUS_DELETED):
                # Nothing left of it here and nothing to do for it.
                del self._runners[sid]
                continue
            if d is None:
                if self._have_full and h is not None:
                    runner.spawn(runner.forget(keep_unsaved=True))
                continue
            retry_unsaved = h is not None and h.ended and h.unsaved
            if d.status == pb.DESIRED_STATUS_DELETED:
                runner.spawn(runner.forget(keep_unsaved=False))
            elif d.status == pb.DESIRED_STATUS_RUNNING:
                if h is None or d.generation > h.generation:
                    if h is not None and not h.ended:
                        # A newer generation while an older one still runs: end it first.
                        runner.spawn(runner.stop(h))
                    else:
                        runner.spawn(runner.start(d))
                elif h is not None and h.status == "building" and d.generation == h.generation:
                    # A build an agent restart interrupted (nothing runs it now): again.
                    runner.spawn(runner.start(d))
                elif retry_unsaved and h is not None and now >= runner.unsaved_retry_at:
                    runner.spawn(runner.retry_unsaved(h))
            elif d.status == pb.DESIRED_STATUS_STOPPED and h is not None:
                if not h.ended and d.generation >= h.generation:
                    runner.spawn(runner.stop(h))
                elif retry_unsaved and now >= runner.unsaved_retry_at:
                    runner.spawn(runner.retry_unsaved(h))

    # ------------------------------------------------------------ accounting tick

    async def _tick_loop(self) -> None:
        while True:
            if time.monotonic() >= self._next_reap:
                self._next_reap = time.monotonic() + self.settings.reap_interval_seconds
                try:
                    await self.reap()
                except Exception:
                    log.exception("reaping orphaned tools and volumes failed")
            await asyncio.sleep(self.settings.watch_interval_seconds)
            for runner in list(self._runners.values()):
                try:
                    await runner.refresh()
                except Exception:
                    log.exception("session %s: disk accounting failed", runner.session_id)
            self.reconcile()

    # ------------------------------------------------------------ reaper

    async def reap(self) -> list[dict[str, Any]]:
        """Stop the tools labelled as this agent's sessions that no live handle owns, and
        release what ended generations left behind; never touches a session with an
        operation in flight or one whose data is not saved yet."""
        reaped: list[dict[str, Any]] = []
        for tool in await self.runtime.labelled_tools():
            runner = self._runners.get(tool.session_id)
            if runner is not None and runner.busy:
                continue
            h = runner.handle if runner is not None else None
            if h is not None and not h.ended and h.generation == tool.generation:
                continue
            await self.runtime.remove_labelled(tool)
            reaped.append(self._note_reaped(tool.session_id, tool.generation, tool.description))
        live: set[str] = set()
        for runner in list(self._runners.values()):
            h = runner.handle
            if h is None:
                continue
            if runner.busy or not h.ended or h.unsaved:
                live.add(h.root_dir)
                continue
            if await asyncio.to_thread(runner.has_leftovers):
                live.add(h.root_dir)  # released below, not swept behind its back
                if not runner.busy and runner.handle is h:
                    # An operation of the session, so a start of it waits for the release.
                    runner.spawn(self._release_leftovers(runner, h))
        for what in await self.volumes.sweep(self.state.sessions_dir, live):
            reaped.append(self._note_reaped("-", 0, what))
        return reaped

    async def _release_leftovers(self, runner: SessionRunner, h: SessionHandle) -> None:
        await runner.release_leftovers(h)
        self._note_reaped(h.session_id, h.generation, f"leftover volume {h.root_dir}")

    def _note_reaped(self, sid: str, generation: int, what: str) -> dict[str, Any]:
        log.warning(
            "reaped %s of session %s generation %d: no live session owns it", what, sid, generation
        )
        entry = {"at": int(time.time()), "sessionId": sid, "generation": generation, "what": what}
        self.reaped = [*self.reaped, entry][-_REAPED_KEPT:]
        return entry
