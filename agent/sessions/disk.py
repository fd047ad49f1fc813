"""A running session's disk: the fast free-space watcher and online growth.

A full-speed writer fills 1 GiB in 0.25-0.5 s, so a volume kind that can fill up
(`poll_seconds` set, xfs-loop polls every 0.1 s) gets a watcher per session that grows
the volume before the writer hits ENOSPC, within the compute environment's budget and
never beyond its per-session cap (sessionDiskCapGb, when it has one): a writer past the
cap gets ENOSPC, and the session's message says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from agent.errors import VolumeError
from agent.sessions.context import SessionContext
from agent.sessions.handle import SessionHandle
from agent.volumes import GIB

__all__ = ["DiskWatcher", "budget_message"]

log = logging.getLogger(__name__)

_EVENTS_KEPT = 50


class DiskWatcher:
    """One session's watcher; `check` is also called by the agent's accounting tick."""

    def __init__(self, ctx: SessionContext, current: Callable[[], SessionHandle | None]) -> None:
        self._ctx = ctx
        # The runner's live handle: a watcher of a replaced handle ends.
        self._current = current
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # Growth events, newest last (`studio-agent disk`).
        self.events: list[dict[str, Any]] = []

    def start(self, h: SessionHandle) -> None:
        self.stop()
        interval = self._ctx.volumes.poll_seconds
        if interval and h.volume:
            self._task = asyncio.create_task(self._watch(h, interval), name=f"disk-{h.session_id}")

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _watch(self, h: SessionHandle, interval: float) -> None:
        while self._current() is h and h.status in ("starting", "running") and h.volume:
            try:
                free = self._ctx.volumes.free_bytes(h.volume)
                if free is None or free < self._ctx.settings.grow_below_free_bytes:
                    await self.check(h)
            except Exception:
                log.exception("session %s: disk watcher failed", h.session_id)
            await asyncio.sleep(interval)

    async def check(self, h: SessionHandle) -> None:
        """Account the volume's use and grow it when free space runs low."""
        ctx, settings = self._ctx, self._ctx.settings
        async with self._lock:
            # Also while starting: a restore must be able to grow its volume too.
            if h.status not in ("starting", "running") or not h.volume:
                return
            before = (h.volume.size_bytes, h.volume.used_bytes)
            vol = await ctx.volumes.usage(h.volume)
            free = vol.size_bytes - vol.used_bytes
            live = ctx.volumes.free_bytes(vol)
            if live is not None:
                free = live
            message = ""
            if free < settings.grow_below_free_bytes:
                cap = ctx.disk_cap_for(h.spec)
                session_cap = ctx.session_cap_for(h.spec)
                room = session_cap - vol.size_bytes
                budget_free = ctx.disk_budget_free(cap)
                step = min(settings.grow_step_bytes, budget_free, room)
                if step > 0:
                    started = time.monotonic()
                    try:
                        vol = await ctx.volumes.grow(vol, step)
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
                        self.events.append(
                            {
                                "at": time.time(),
                                "fromBytes": before[0],
                                "toBytes": vol.size_bytes,
                                "freeBeforeBytes": free,
                                "seconds": round(took, 4),
                            }
                        )
                        del self.events[:-_EVENTS_KEPT]
                        ctx.on_volume_grown(self.events[-1])
                elif room <= 0 and session_cap < cap:
                    message = (
                        f"running; the volume is at the session's disk cap: "
                        f"{vol.size_bytes / GIB:.1f} GiB, and the compute environment lets "
                        f"one session grow to {session_cap / GIB:.0f} GiB (sessionDiskCapGb), "
                        "so it cannot grow (free space in the session, or ask for a larger cap)"
                    )
                else:
                    message = (
                        f"running; the volume is at the disk budget: {vol.size_bytes / GIB:.1f} "
                        f"GiB, and the compute environment's {cap / GIB:.0f} GiB on this host "
                        "are in use, so it cannot grow (stop and start again to reclaim space)"
                    )
            h.volume = vol
            changed = abs(vol.used_bytes - before[1]) > max(16 * 1024**2, before[1] // 100)
            if message and h.message != message:
                h.message = message
                log.warning("session %s: %s", h.session_id, message)
                await ctx.save_and_report(h)
            elif vol.size_bytes != before[0] or changed:
                await ctx.save_and_report(h)


def budget_message(
    h: SessionHandle, size: int, restore_bytes: int, cap: int, left: int, free_bytes: int
) -> str:
    """Why a start cannot have the volume it needs (`free_bytes`: a fresh volume's size)."""
    held = f"other sessions of this compute environment here hold {(cap - left) / GIB:.1f} GiB"
    budget = f"{left / GIB:.1f} GiB of its {cap / GIB:.0f} GiB disk budget on this host"
    if restore_bytes:
        return (
            f"cannot start: restoring checkpoint {h.restore_uri} needs a "
            f"{size / GIB:.1f} GiB volume ({restore_bytes / GIB:.1f} GiB of data plus "
            f"{free_bytes / GIB:.0f} GiB free), but only {budget} is left "
            f"({held})"
        )
    return f"cannot start: a session needs {size / GIB:.1f} GiB, but only {budget} is left ({held})"
