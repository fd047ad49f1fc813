"""A session's checkpoints while it runs (interim) and when it stops (final).

Interim checkpoints run one right after the tool answers, then one per interval; each
is incremental against the run's previous checkpoint. A stop ends the loop but lets a
save in flight finish (it is shielded): a torn save would cost the whole interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from studios.agent.v1 import agent_pb2 as pb

from agent import crash_points
from agent.checkpoints.store import LATEST, SavedCheckpoint
from agent.errors import CheckpointError
from agent.sessions.context import SessionContext
from agent.sessions.handle import SessionHandle
from agent.sessions.report import running_message

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, ctx: SessionContext, current: Callable[[], SessionHandle | None]) -> None:
        self._ctx = ctx
        # The runner's live handle: a loop of a replaced or ended handle returns.
        self._current = current
        self._loop: asyncio.Task[None] | None = None
        self._saving: asyncio.Task[None] | None = None

    def start(self, h: SessionHandle, *, initial: bool) -> None:
        if self._loop is not None:
            self._loop.cancel()
        self._loop = asyncio.create_task(self._run(h, initial), name=f"checkpoint-{h.session_id}")

    async def stop(self) -> None:
        """End the interim loop; a save in flight is finished, never torn."""
        loop, self._loop = self._loop, None
        if loop is not None and loop is not asyncio.current_task():
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        saving, self._saving = self._saving, None
        if saving is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await saving

    def cancel(self) -> list[asyncio.Task[None]]:
        """Cancel without waiting (agent shutdown); the tasks to await."""
        tasks = [t for t in (self._loop, self._saving) if t is not None]
        for task in tasks:
            task.cancel()
        self._loop = self._saving = None
        return tasks

    async def save(
        self,
        h: SessionHandle,
        status: pb.CheckpointStatus,
        progress: Callable[[int, int], None] | None = None,
    ) -> SavedCheckpoint:
        """Write the session directory as a checkpoint and report it with `status`.

        Incremental against this run's previous checkpoint (or the one it restored)."""
        ctx = self._ctx
        t0 = time.monotonic()
        try:
            parent = h.checkpoint_uri or h.restore_uri or LATEST
            saved = await ctx.store_for(h.spec).save(
                h.session_id, ctx.checkpoint_dir(h), parent=parent, progress=progress
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
        ctx.on_checkpoint(
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
            h.final_uri, h.final_key = saved.uri, saved.key
            await ctx.save(h)
            crash_points.reached("final-checkpoint:recorded")
        log.info(
            "session %s: %s checkpoint %s (%d bytes) in %.2f s",
            h.session_id,
            "final" if final else "interim",
            saved.uri,
            saved.size_bytes,
            time.monotonic() - t0,
        )
        # Interim checkpoints repeat every interval, mostly with the same warnings (the
        # same sockets): a warning once, at the final one, which the stop step shows too.
        level = logging.WARNING if final else logging.INFO
        for warning in saved.warnings:
            log.log(level, "session %s: checkpoint %s: %s", h.session_id, saved.key, warning)
        return saved

    async def final(
        self, h: SessionHandle, progress: Callable[[int, int], None] | None = None
    ) -> SavedCheckpoint:
        await self.stop()
        return await self.save(h, pb.CHECKPOINT_STATUS_FINALIZED, progress)

    async def _run(self, h: SessionHandle, initial: bool) -> None:
        interval = self._ctx.settings.checkpoint_interval_seconds
        delay = 0.0 if initial else interval
        while True:
            await asyncio.sleep(delay)
            delay = interval
            if self._current() is not h or h.status != "running":
                return
            task = asyncio.create_task(self._interim(h), name=f"interim-{h.session_id}")
            self._saving = task
            try:
                # Shielded: stopping the loop lets the save finish (`stop`).
                await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session %s: interim checkpoint failed", h.session_id)
            if self._saving is task:
                self._saving = None

    async def _interim(self, h: SessionHandle) -> None:
        if not h.root_dir or not await asyncio.to_thread(Path(h.root_dir).is_dir):
            return
        ctx = self._ctx
        try:
            await self.save(h, pb.CHECKPOINT_STATUS_INTERIM)
        except CheckpointError as exc:
            log.warning("session %s: interim checkpoint failed: %s", h.session_id, exc)
            if h.status == "running":
                previous = (
                    f"the previous checkpoint {h.checkpoint_uri} stays valid"
                    if h.checkpoint_uri
                    else "no checkpoint of this run yet"
                )
                h.message = (
                    f"{running_message(h)}; warning: checkpoint refresh failed "
                    f"({exc}); {previous}; retrying in "
                    f"{ctx.settings.checkpoint_interval_seconds:g} s"
                )
                await ctx.save_and_report(h)
            return
        if h.status == "running":
            if h.message != running_message(h):
                h.message = running_message(h)
                await ctx.save_and_report(h)
            else:
                await ctx.save(h)
